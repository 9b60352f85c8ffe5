"""Realism figures' cost: seconds to score 64 and 256 generated slices, each measure apart and in total.

    python bench/realism.py [--run pretrained] [--sizes 64,256] [--repeats 3]

On the shared MNI volumes' validate split (two held-out subjects; skipped with a message when ../shared is absent):
the run generates the largest size once (not timed), then every measure predict.py reports is timed on the first N
generated slices, against N real held-out slices and N training slices (the classifier tests' reference), drawn as
predict.py draws them (dataset.draw_real_slices), and all 1,182 training slices
(nearest SSIM, level check), as predict.py --num N computes them; the level check is timed whether or not the run
is level-conditioned (predict.py skips it for a run that is not). Each figure is the median of --repeats runs in
this process, after one untimed run of the smallest size that compiles and traces what the measures use. The
load average is printed before and after: another job on the cores slows every row.
"""

import argparse
import os
import time
from pathlib import Path

from common import ROOT, SHARED_VOLUMES, machine, median, print_table

import numpy as np

import measures
from cli import DEFAULT_CACHE
from dataset import RealSlices, draw_real_slices, load_slices
from modules import SliceGenerator, prior_bits_per_code
from rundir import load_run


def measure_steps(run, generated, levels, drawn: RealSlices, seed: int = 0) -> dict:
    """{measure: function} of every realism measure of predict.py, for N generated slices (asked for at `levels`)
    and N `drawn` real slices."""
    tissue, train, reference, reference_subjects = (run.config.tissue_intensity, drawn.train, drawn.reference,
                                                    drawn.reference_subjects)
    real, real_levels, real_subjects = drawn.slices, drawn.levels, drawn.subjects
    return {
        "brain-shaped fraction": lambda: [measures.brain_shaped_fraction(images, tissue)
                                          for images in (generated, real)],
        "pairwise SSIM (diversity)": lambda: [measures.mean_off_diagonal(measures.pairwise_ssim(images, images))
                                              for images in (generated, real)],
        "nearest-training SSIM": lambda: [measures.nearest_ssim(images, train.images) for images in (generated, real)],
        "classifier AUC and its control": lambda: [
            measures.classifier_auc(generated, reference, None, reference_subjects, seed=seed),
            measures.classifier_auc(real, reference, real_subjects, reference_subjects, seed=seed)],
        "level check": lambda: measures.level_mae(train.images, train.levels, {
            "generated": (generated, levels), "real": (real, real_levels)}, seed=seed),
        "prior bits per code": lambda: prior_bits_per_code(run, real, real_levels),
    }


def time_steps(steps: dict) -> dict:
    times = {}
    for name, step in steps.items():
        start = time.perf_counter()
        step()
        times[name] = time.perf_counter() - start
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "pretrained", help="run that generates the slices "
                        "(default: pretrained/); the timings hardly depend on it")
    parser.add_argument("--sizes", default="64,256", help="numbers of generated slices to score (default: 64,256)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not SHARED_VOLUMES.is_dir():
        print(f"skipped: {SHARED_VOLUMES} is absent (the shared MNI volumes this benchmark scores against)")
        return
    sizes = sorted(int(size) for size in args.sizes.split(","))
    run = load_run(args.run)
    slices = load_slices(str(SHARED_VOLUMES), run.config, DEFAULT_CACHE, progress=False)
    train = slices.select("train")
    rng = np.random.default_rng(0)
    levels = rng.choice(train.levels[np.isfinite(train.levels)], sizes[-1]).astype(np.float32)
    generated = SliceGenerator(run).many(levels, 1.0, 0)

    def steps_for(size: int) -> dict:
        return measure_steps(run, generated[:size], levels[:size], draw_real_slices(slices, "validate", size, rng))

    time_steps(steps_for(sizes[0]))  # compiles and traces what the measures use: not kept
    load_before = os.getloadavg()[0]
    rows = {}
    for size in sizes:
        rounds = [time_steps(steps_for(size)) for _ in range(args.repeats)]
        rows[size] = {name: median([times[name] for times in rounds]) for name in rounds[0]}
        rows[size]["total"] = median([sum(times.values()) for times in rounds])
    print(f"Scoring N generated slices against N real validate slices and {len(train)} training slices, seconds, "
          f"median of {args.repeats}; {machine()}; load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after")
    print_table(["measure", *(f"N = {size}" for size in sizes)],
                [[name, *(f"{rows[size][name]:.1f}" for size in sizes)] for name in rows[sizes[-1]]])


if __name__ == "__main__":
    main()
