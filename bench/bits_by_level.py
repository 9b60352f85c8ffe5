"""How well each prior of a run predicts real code grids, by axial level: bits per code on the training and the
validation slices of the shared MNI volumes, given each slice's level and given an unknown one.

    python bench/bits_by_level.py --run pretrained [--run runs/OTHER ...]

Each slice is encoded by the run's VQ-VAE and its code grid scored by the prior teacher-forced (the logits of every
code given the true codes before it: modules.bits_per_grid), over all positions of the grid, background included.
The table gives the mean over all slices and within each fifth of the levels, with the slice counts. The gap between
a band's training and validation figures is what the prior learned of the training subjects alone there; the gap
between "level" and "unknown level" is what the level tells it.
"""

import argparse
from pathlib import Path

from common import LEVEL_FIFTH_HEADERS, LEVEL_FIFTHS, SHARED_VOLUMES, band_cells, print_table

import numpy as np

from cli import DEFAULT_CACHE, UserError
from dataset import load_slices
from modules import bits_per_grid, encode_all, grid_inputs
from rundir import load_run


def run_rows(path: Path, run) -> list[list[str]]:
    """The table rows of the run loaded from `path`: each prior's bits per code on each split, given the level and
    not."""
    slices = load_slices(str(SHARED_VOLUMES), run.config, DEFAULT_CACHE, progress=False)
    rows = []
    for split in ("train", "validate"):
        subset = slices.select(split)
        levels = np.asarray(subset.levels, np.float32)
        codes = encode_all(run.vqvae, subset.images)
        for grid, prior in run.priors.items():
            for condition, given in (("level", levels), ("unknown level", np.full_like(levels, np.nan))):
                bits = bits_per_grid(prior, grid_inputs(grid, codes, given))
                rows.append([str(path), grid, split, condition, *band_cells(bits, levels, LEVEL_FIFTHS, 3)])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, action="append", required=True,
                        help="a run directory trained on the shared MNI volumes (repeat for several)")
    args = parser.parse_args()
    if not SHARED_VOLUMES.is_dir():
        print(f"skipped: {SHARED_VOLUMES} is absent (the shared MNI volumes the runs were trained on)")
        return
    try:
        runs = {path: load_run(path) for path in args.run}
    except UserError as error:
        parser.error(str(error))
    rows = [row for path, run in runs.items() for row in run_rows(path, run)]
    print_table(["run", "grid", "split", "given", "all", *LEVEL_FIFTH_HEADERS], rows)


if __name__ == "__main__":
    main()
