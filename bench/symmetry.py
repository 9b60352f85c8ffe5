"""How left-right symmetric generated slices are, against real slices of the same levels.

    python bench/symmetry.py --generated predictions/default_val [--generated predictions/other ...]

Each --generated folder is a predict.py --out folder (its samples and their levels). Real rows: every slice of the
training, validate and test splits of the shared MNI volumes (skipped with a message when ../shared is absent),
preprocessed with pretrained/'s config. Each cell is the mean measures.mirror_asymmetry of the slices in a band of
axial levels (the layout's: blurred by 2 pixels; lower is more symmetric; slice counts in brackets):
atlas-registered heads are nearly mirror images of themselves about the midline, so a sample whose ventricle is one
lopsided cavity scores above the real slices of its level. Levels 0.3-0.55 hold the lateral ventricles.
"""

import argparse
from pathlib import Path

from common import ROOT, SHARED_VOLUMES, band_cells, generated_slices, print_table

import numpy as np

from cli import DEFAULT_CACHE
from dataset import load_slices
from measures import mirror_asymmetry
from rundir import load_run

BANDS = [(0.0, 0.3), (0.3, 0.55), (0.55, 0.8), (0.8, 1.0)]


def row(name: str, images: np.ndarray, levels: np.ndarray, tissue: float) -> list[str]:
    return [name, *band_cells(mirror_asymmetry(images, tissue), levels, BANDS, 4)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generated", type=Path, action="append", default=[],
                        help="a predict.py --out folder (repeatable)")
    args = parser.parse_args()
    if not SHARED_VOLUMES.is_dir():
        print(f"skipped: {SHARED_VOLUMES} is absent (the shared MNI volumes the real rows come from)")
        return
    config = load_run(ROOT / "pretrained", need_prior=False).config
    everything = load_slices(str(SHARED_VOLUMES), config, DEFAULT_CACHE, progress=False)
    tissue = config.tissue_intensity
    rows = []
    for split in ("train", "validate", "test"):
        real = everything.select(split)
        rows.append(row(f"real {split} slices", real.images, real.levels, tissue))
    rows += [row(f"generated: {folder}", *generated_slices(folder), tissue) for folder in args.generated]
    print(f"mirror asymmetry of the layout (slice count) by axial level, tissue threshold {tissue}, blur 2 pixels, "
          "mirror shifts up to 3 pixels")
    print_table(["slices", "all", *(f"level {low:.2f}-{high:.2f}" for low, high in BANDS)], rows)


if __name__ == "__main__":
    main()
