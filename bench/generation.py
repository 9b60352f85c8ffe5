"""Generation speed: seconds to sample 64 code grids with the PixelCNN and decode them to 128x128 slices.

    python bench/generation.py [--run pretrained] [--num 64] [--repeats 5]

Baseline, as keras.io/examples/generative/pixelcnn samples: a Python loop over the g*g code positions, calling
`model.predict` on the whole batch once per position and drawing that position's code. Project:
modules.sampler_for(prior), one compiled loop that computes only what the new position needs. Same weights, same
batch, same process. The project figure is the median of --repeats runs after one run that traces the loop
(reported as 'first call'). The baseline costs one identical full `predict` per position (about 20 minutes for a
64x64 grid), so it is timed on the first --baseline-positions positions and scaled to the grid.
"""

import argparse
import time
from pathlib import Path

from common import ROOT, machine, median, print_table

import keras
import numpy as np
import tensorflow as tf

from hyperparameters import make_config
from modules import VQVAE, build_prior, load_run, sampler_for


def baseline_sample(prior, vqvae, num, grid, seed, positions):
    """The example's loop over the first `positions` positions (all g*g of them for a full sample)."""
    codes = np.zeros((num, grid, grid), np.int32)
    rng = np.random.default_rng(seed)
    for position in range(positions):
        row, col = divmod(position, grid)
        logits = prior.predict(codes, verbose=0)[:, row, col]
        probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        codes[:, row, col] = [rng.choice(len(p), p=p) for p in probabilities]
    if positions == grid * grid:
        return np.asarray(vqvae.decode_codes(codes))


def project_sample(sampler, vqvae, num, seed):
    return np.asarray(vqvae.decode_codes(sampler.sample(num, 1.0, seed)))


def timed(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def models(preset, run):
    if run is not None and (run / "config.json").exists():
        config, vqvae, priors = load_run(run)
        prior = priors["bottom"]
        if config.code_grid == make_config(preset).code_grid:
            return config, vqvae, prior, f"trained weights of {run}"
    config = make_config(preset)
    vqvae, prior = VQVAE(config.to_dict()), build_prior(config)
    vqvae.build()
    return config, vqvae, prior, "random weights"


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
    args = parser.parse_args()
    rows = []
    for preset in args.presets.split(","):
        config, vqvae, prior, weights = models(preset, args.run if preset == "default" else None)
        grid = config.code_grid
        sampler = sampler_for(prior)
        first = timed(lambda: project_sample(sampler, vqvae, args.num, 0))
        ours = median([timed(lambda: project_sample(sampler, vqvae, args.num, seed))
                       for seed in range(1, args.repeats + 1)])
        positions = min(grid * grid, args.baseline_positions)
        base = median([timed(lambda: baseline_sample(prior, vqvae, args.num, grid, seed, positions))
                       for seed in range(args.baseline_repeats)]) * grid * grid / positions
        measured = "all" if positions == grid * grid else f"{positions} of {grid * grid}, scaled"
        rows.append([preset, f"{grid}x{grid}", weights, f"{base:.1f} ({measured})", f"{first:.2f}", f"{ours:.3f}",
                     f"{base / ours:.0f}x"])
    print(f"Generating {args.num} decoded slices, seconds; {machine()}; TensorFlow {tf.__version__}")
    print_table(["preset", "code grid", "weights", "baseline: predict per position", "OASISVQ first call",
                 f"OASISVQ (median of {args.repeats})", "speed-up"], rows)


if __name__ == "__main__":
    keras.utils.set_random_seed(0)
    main()
