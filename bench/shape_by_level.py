"""Where generated outlines break: the brain-shaped fraction by axial level, generated against real slices.

    python bench/shape_by_level.py --generated predictions/default_val [--generated predictions/other ...]
        [--by-subject] [--figure Images/realism/shape_by_level.png] [--run RUN_DIR]

Each --generated folder is a predict.py --out folder: its generated/sample_NNN.png files, and the level of each in
its generation.json (`levels.of_each`). Real rows: every slice of the training split and of the held-out splits of
the shared MNI volumes (skipped with a message when ../shared is absent), preprocessed with the config of --run
(default pretrained/), which should be the run the --generated folders sampled.
Rows are the fraction of slices that pass measures.brain_shaped in each band of levels (and the slice count), so a
sample set can be compared with the slices its prior learned from (training levels are what predict.py draws) as
well as with the held-out slices that predict.py's brain-shaped figure compares it with. --by-subject adds a row per
real subject, for how much the reference itself moves with the subjects a split happens to hold. --figure draws
each real subject's slices and each --generated folder's samples nearest a few low and high levels, each marked
with whether it passes, to see why they fail.
"""

import argparse
from pathlib import Path

from common import (LEVEL_FIFTH_HEADERS, LEVEL_FIFTHS, ROOT, SHARED_VOLUMES, band_cells, generated_slices,
                    nearest_levels, print_table)

import numpy as np

from cli import DEFAULT_CACHE
from dataset import load_slices
from figures import save_strips
from measures import brain_shaped
from rundir import load_run

FIGURE_LEVELS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.5, 0.8, 0.85, 0.9)


def row(name: str, images: np.ndarray, levels: np.ndarray, tissue: float) -> list[str]:
    shaped = np.array([brain_shaped(image, tissue) for image in images])
    return [name, *band_cells(shaped, levels, LEVEL_FIFTHS, 2, all_digits=3)]


def strip(name: str, images: np.ndarray, levels: np.ndarray, tissue: float) -> tuple[str, list]:
    """The slices of a set nearest each of FIGURE_LEVELS, captioned with their levels and brain_shaped outcome."""
    return name, [(images[i], f"{levels[i]:.2f} {'ok' if brain_shaped(images[i], tissue) else 'fails'}")
                  for i in nearest_levels(levels, FIGURE_LEVELS)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generated", type=Path, action="append", default=[],
                        help="a predict.py --out folder (repeatable)")
    parser.add_argument("--by-subject", action="store_true",
                        help="also a row for each real subject, under its split's row")
    parser.add_argument("--figure", type=Path, default=None,
                        help="also write a PNG: each real subject's slices and each --generated folder's samples "
                             "nearest a few levels, marked with whether they pass")
    parser.add_argument("--run", type=Path, default=ROOT / "pretrained",
                        help="the run whose preprocessing (intensity scaling, axial gain levelling, tissue "
                             "threshold) the real slices get (default: pretrained/)")
    args = parser.parse_args()
    if not SHARED_VOLUMES.is_dir():
        print(f"skipped: {SHARED_VOLUMES} is absent (the shared MNI volumes the real rows come from)")
        return
    config = load_run(args.run).config
    everything = load_slices(str(SHARED_VOLUMES), config, DEFAULT_CACHE, progress=False)
    tissue = config.tissue_intensity
    rows, strips = [], []
    for split in ("train", "validate", "test"):
        real = everything.select(split)
        rows.append(row(f"real {split} slices", real.images, real.levels, tissue))
        for subject in sorted(set(real.subjects)):
            mine = real.subjects == subject
            if args.by_subject:
                rows.append(row(f"  {subject} ({split})", real.images[mine], real.levels[mine], tissue))
            if args.figure:
                strips.append(strip(f"{subject} ({split})", real.images[mine], real.levels[mine], tissue))
    for folder in args.generated:
        images, levels = generated_slices(folder)
        rows.append(row(f"generated: {folder}", images, levels, tissue))
        if args.figure:
            strips.append(strip(f"generated: {folder.name}", images, levels, tissue))
    print(f"brain-shaped fraction (slice count) by axial level, tissue threshold {tissue}")
    print_table(["slices", "all", *(f"level {header}" for header in LEVEL_FIFTH_HEADERS)], rows)
    if args.figure:
        save_strips(args.figure, strips, "slices nearest each level, real subjects and generated sets: "
                                               f"brain-shaped at tissue threshold {tissue} (ok) or not (fails)")
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
