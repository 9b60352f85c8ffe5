"""Where generated outlines break: the brain-shaped fraction by axial level, generated against real slices.

    python bench/shape_by_level.py --generated predictions/default_val [--generated predictions/other ...]
        [--by-subject]

Each --generated folder is a predict.py --out folder: its generated/sample_NNN.png files, and the level of each in
its generation.json (`levels.of_each`). Real rows: every slice of the training split and of the held-out splits of
the shared MNI volumes (skipped with a message when ../shared is absent), preprocessed with pretrained/'s config.
Rows are the fraction of slices that pass measures.brain_shaped in each band of levels (and the slice count), so a
sample set can be compared with the slices its prior learned from (training levels are what predict.py draws) as
well as with the held-out slices that predict.py's brain-shaped figure compares it with. --by-subject adds a row per
real subject, for how much the reference itself moves with the subjects a split happens to hold.
"""

import argparse
import json
from pathlib import Path

from common import ROOT, SHARED_VOLUMES, print_table

import numpy as np
from PIL import Image

from cli import DEFAULT_CACHE
from dataset import load_slices
from measures import brain_shaped
from rundir import load_run

BANDS = [(0.0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1.0)]


def generated_slices(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images, levels) of a predict.py --out folder, in sample order."""
    levels = json.loads((folder / "generation.json").read_text())["levels"].get("of_each")
    if levels is None:
        raise SystemExit(f"{folder}/generation.json has no per-sample levels (an older predict.py wrote it); "
                         "run predict.py into it again")
    files = sorted((folder / "generated").glob("sample_*.png"))
    images = np.stack([np.asarray(Image.open(path), np.float32) / 255 for path in files])
    return images, np.array([np.nan if level is None else level for level in levels], np.float32)


def row(name: str, images: np.ndarray, levels: np.ndarray, tissue: float) -> list[str]:
    shaped = np.array([brain_shaped(image, tissue) for image in images])
    cells = [name, f"{shaped.mean():.3f} ({len(images)})"]
    for low, high in BANDS:
        inside = (levels >= low) & ((levels < high) | (high == 1.0) & (levels <= high))
        cells.append(f"{shaped[inside].mean():.2f} ({inside.sum()})" if inside.any() else "-")
    return cells


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generated", type=Path, action="append", default=[],
                        help="a predict.py --out folder (repeatable)")
    parser.add_argument("--by-subject", action="store_true",
                        help="also a row for each real subject, under its split's row")
    args = parser.parse_args()
    if not SHARED_VOLUMES.is_dir():
        print(f"skipped: {SHARED_VOLUMES} is absent (the shared MNI volumes the real rows come from)")
        return
    config = load_run(ROOT / "pretrained").config
    everything = load_slices(str(SHARED_VOLUMES), config, DEFAULT_CACHE, progress=False)
    rows = []
    for split in ("train", "validate", "test"):
        real = everything.select(split)
        rows.append(row(f"real {split} slices", real.images, real.levels, config.tissue_intensity))
        for subject in sorted(set(real.subjects)) if args.by_subject else ():
            mine = real.subjects == subject
            rows.append(row(f"  {subject} ({split})", real.images[mine], real.levels[mine], config.tissue_intensity))
    for folder in args.generated:
        rows.append(row(f"generated: {folder}", *generated_slices(folder), config.tissue_intensity))
    print(f"brain-shaped fraction (slice count) by axial level, tissue threshold {config.tissue_intensity}")
    print_table(["slices", "all", *(f"level {low:.1f}-{high:.1f}" for low, high in BANDS)], rows)


if __name__ == "__main__":
    main()
