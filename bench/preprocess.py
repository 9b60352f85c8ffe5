"""Preprocessing time for the 11 shared OASIS-1 volumes (../shared/data/oasis1-mni-volumes), cold cache.

    python bench/preprocess.py [--repeats 3]

Each run reads every volume with nibabel, reorients, scales, drops empty slices and resizes to 128x128 into a
fresh temporary cache. Baseline: one process (workers=1); project: the default process pool. Reports the median
seconds, slices/s, and the projection to all 436 OASIS-1 sessions (T88 volumes are 176x208x176, about the same
size as these 176-192x224x192 volumes).
"""

import argparse
import sys
import tempfile
import time

from common import SHARED_VOLUMES, machine, median, print_table

from dataset import load_slices
from hyperparameters import make_config

OASIS1_SESSIONS = 436


def run(workers):
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        slices = load_slices(str(SHARED_VOLUMES), make_config(), cache, progress=False, workers=workers)
        return time.perf_counter() - start, len(slices), len(set(slices.sources))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not SHARED_VOLUMES.is_dir():
        sys.exit(f"{SHARED_VOLUMES} is not here; this benchmark needs the shared OASIS-1 volumes")
    rows = []
    baseline = None
    for label, workers in (("1 process (baseline)", 1), ("process pool (default)", None)):
        results = [run(workers) for _ in range(args.repeats)]
        seconds = median([result[0] for result in results])
        slices, volumes = results[0][1], results[0][2]
        baseline = baseline or seconds
        rows.append([label, volumes, slices, f"{seconds:.2f}", f"{slices / seconds:.0f}",
                     f"{seconds / volumes * OASIS1_SESSIONS / 60:.1f}", f"{baseline / seconds:.2f}"])
    print(f"Preprocessing the shared volumes, cold cache, median of {args.repeats}; {machine()}")
    print_table(["mode", "volumes", "slices", "seconds", "slices/s", "projected minutes for 436 sessions",
                 "speed-up"], rows)


if __name__ == "__main__":
    main()
