"""Generation speed: seconds to sample 64 slices (every code grid of the run) and decode them to 128x128 slices.

    python bench/generation.py [--run pretrained] [--num 64] [--repeats 5] [--threads N]

Baseline, as keras.io/examples/generative/pixelcnn samples: a Python loop over each grid's code positions (the
top grid first, then the bottom one given it), calling `model.predict` on the whole batch once per position and
drawing that position's code; a grid without a prior (the default's bottom grid) is drawn at random in both.
Project: modules.SliceGenerator (what predict.py uses), one compiled loop per grid with a prior that computes only
what the new position needs. Same weights, same batch, same levels, same process. The project
figure is the median of --repeats calls of one SliceGenerator after its first call, which traces the loops
(reported as 'first call': what a one-off modules.generate costs), with the share of it that the run's refiner
takes (the median of as many refinements of the decoded slices; none for a run without one). The baseline costs
one identical full `predict` per position (about 20 minutes for a 64x64 grid), so each grid is timed on its first
--baseline-positions positions and scaled to the grid. --threads N runs the whole process with N TensorFlow
threads per pool (the sampling loops are thousands of tiny ops, where splitting each op over the cores can cost
more than it saves). The table's header gives the share of CPU time the host's other tenants took meanwhile.
"""

import argparse
import time
from pathlib import Path

from common import ROOT, cpu_times, machine, median, print_table, steal_share

import keras
import numpy as np
import tensorflow as tf

from hyperparameters import make_config
from modules import VQVAE, Refiner, SliceGenerator, build_prior, prior_inputs, uniform_codes
from rundir import Run, RunDir, load_run


def baseline_seconds(run, levels, seed, positions):
    """Seconds of the example's loop for a whole sample: each grid timed on its first `positions` positions and
    scaled to all of them (every position costs the same full predict), plus the decoding."""
    rng = np.random.default_rng(seed)
    codes, seconds = {}, 0.0
    for grid in run.config.code_grids:
        side = run.config.grid_side(grid)
        if grid not in run.priors:  # a grid without a prior is drawn at random, as SliceGenerator draws it
            codes[grid] = uniform_codes(run.config, grid, len(levels), rng)
            continue
        prior = run.priors[grid]
        codes[grid] = np.zeros((len(levels), side, side), np.int32)
        inputs = prior_inputs(codes[grid], levels if prior.level_conditioned else None,
                              codes.get("top") if grid == "bottom" else None)
        timed_positions = min(positions, side * side)
        start = time.perf_counter()
        for position in range(timed_positions):
            row, col = divmod(position, side)
            logits = prior.predict(inputs, verbose=0)[:, row, col]
            probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
            probabilities /= probabilities.sum(axis=1, keepdims=True)
            codes[grid][:, row, col] = [rng.choice(len(p), p=p) for p in probabilities]
        seconds += (time.perf_counter() - start) * side * side / timed_positions
    return seconds + timed(lambda: run.vqvae.decode_codes(codes))


def timed(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def models(preset, run):
    if run is not None and RunDir(run).config_path.exists():
        loaded = load_run(run)
        if loaded.config.code_grids == make_config(preset).code_grids:
            return loaded, f"trained weights of {run}"
    config = make_config(preset)
    vqvae = VQVAE(config.to_dict())
    vqvae.build()
    refiner = Refiner(config.to_dict()) if config.refiner_epochs else None
    if refiner is not None:
        refiner.build()
    priors = {grid: build_prior(config, grid) for grid in config.prior_grids}
    return Run(config, vqvae, priors, refiner), "random weights"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "pretrained", help="run whose default-preset weights "
                        "to use when present (default: pretrained/); the speed does not depend on the weights")
    parser.add_argument("--num", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline-repeats", type=int, default=1)
    parser.add_argument("--baseline-positions", type=int, default=256,
                        help="positions the baseline loop is timed on, then scaled to the whole grid: every "
                             "position costs one identical full predict (default 256)")
    parser.add_argument("--presets", default="seed,default")
    parser.add_argument("--threads", type=int, default=0,
                        help="TensorFlow's intra-op and inter-op thread pools both set to this size, before any "
                             "op runs (default 0: TensorFlow's choice, as the scripts run)")
    args = parser.parse_args()
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    keras.utils.set_random_seed(0)
    before = cpu_times()
    rows = []
    for preset in args.presets.split(","):
        run, weights = models(preset, args.run if preset == "default" else None)
        levels = np.linspace(0.2, 0.8, args.num).astype(np.float32)
        generate = SliceGenerator(run)
        first = timed(lambda: generate(levels, 1.0, 0))
        ours = median([timed(lambda: generate(levels, 1.0, seed)) for seed in range(1, args.repeats + 1)])
        refining = "none"
        if generate.refiner is not None:
            decoded = generate(levels, 1.0, 0, refine=False)
            refining = f"{median([timed(lambda: generate.refined(decoded)) for _ in range(args.repeats)]):.3f}"
        sides = {grid: run.config.grid_side(grid) for grid in run.config.code_grids}
        base = median([baseline_seconds(run, levels, seed, args.baseline_positions)
                       for seed in range(args.baseline_repeats)])
        grids = " + ".join(f"{side}x{side}" + ("" if grid in run.priors else " (random)")
                           for grid, side in sides.items())
        scaled = any(sides[grid] ** 2 > args.baseline_positions for grid in run.priors)
        measured = f"first {args.baseline_positions} positions per grid, scaled" if scaled else "all"
        rows.append([preset, grids, weights, f"{base:.1f} ({measured})", f"{first:.2f}", f"{ours:.3f}", refining,
                     f"{base / ours:.0f}x"])
    threads = f"{args.threads} intra-op and inter-op threads" if args.threads else "TensorFlow's default threads"
    print(f"Generating {args.num} decoded slices, seconds; {machine()}; TensorFlow {tf.__version__}, {threads}; "
          f"{steal_share(before, cpu_times()):.0%} of the CPU time stolen by the host's other tenants meanwhile")
    print_table(["preset", "code grids", "weights", "baseline: predict per position", "OASISVQ first call",
                 f"OASISVQ (median of {args.repeats})", "of which refining", "speed-up"], rows)


if __name__ == "__main__":
    main()
