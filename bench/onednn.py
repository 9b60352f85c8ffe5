"""TensorFlow's oneDNN CPU kernels off and on: seconds per training step of each model, and to generate 64 slices.

    python bench/onednn.py [--preset default] [--rounds 2]

TF_ENABLE_ONEDNN_OPTS is read when TensorFlow starts, so each setting runs in its own fresh process, and a round
runs both, in an order that alternates from round to round. Each child times, on random data of the real shapes
and with random weights (the speed does not depend on them): a VQ-VAE training step (batch_size images), a
training step of each prior (prior_batch_size code grids), a training step of the refiner and its critic
(refiner_batch_size pairs, when the preset trains one), and a steady-state SliceGenerator call for 64 slices
(after the call that traces the loops). Figures are medians over steps and rounds. cli.configure_tensorflow turns
oneDNN on for train.py on one device and off everywhere else, from these figures.
"""

import argparse
import json
import os
import subprocess
import sys

from common import machine, median, print_table, random_code_grids, training_step_seconds

TASKS = {"vqvae": "VQ-VAE training step", "prior_top": "top prior training step",
         "prior": "bottom prior training step", "refiner": "refiner training step", "generate": "generate 64 slices"}


def child(preset: str) -> dict:
    """Runs in a fresh process: {task: [seconds, ...]}."""
    import time

    import keras
    import numpy as np

    from hyperparameters import make_config
    from modules import VQVAE, AdversarialRefiner, SliceGenerator, build_prior, compile_refiner, grid_inputs
    from rundir import Run

    config = make_config(preset)
    rng = np.random.default_rng(0)

    vqvae = VQVAE(config.to_dict())
    vqvae.build()
    vqvae.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=False)
    images = rng.random((config.batch_size, config.image_size, config.image_size, 1)).astype("float32")
    seconds = {"vqvae": training_step_seconds(vqvae, images)}
    batch = config.prior_batch_size
    codes = random_code_grids(config, batch, rng)
    priors = {}
    for grid in config.code_grids:
        priors[grid] = build_prior(config, grid)
        priors[grid].compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=False,
                             loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        inputs = grid_inputs(grid, codes, rng.random(batch).astype("float32"))
        task = "prior" if grid == "bottom" else "prior_top"
        seconds[task] = training_step_seconds(priors[grid], (inputs, inputs["codes"]))
    if config.refiner_epochs:
        refiner = AdversarialRefiner(config.to_dict())
        refiner.build()
        compile_refiner(refiner, config.refiner_learning_rate)
        size = config.image_size
        pairs = rng.random((config.refiner_batch_size, size, size, 2)).astype("float32")
        seconds["refiner"] = training_step_seconds(refiner, pairs)
    generate = SliceGenerator(Run(config, vqvae, priors))
    levels = np.linspace(0.2, 0.8, 64).astype("float32")
    generate(levels, 1.0, 0)
    seconds["generate"] = []
    for seed in range(1, 4):
        start = time.perf_counter()
        generate(levels, 1.0, seed)
        seconds["generate"].append(time.perf_counter() - start)
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.preset)))
        return
    seconds = {setting: {task: [] for task in TASKS} for setting in ("0", "1")}
    for round_index in range(args.rounds):
        for setting in ("0", "1") if round_index % 2 == 0 else ("1", "0"):
            env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": setting}
            output = subprocess.run([sys.executable, __file__, "--child", "--preset", args.preset], env=env,
                                    check=True, capture_output=True, text=True).stdout
            for task, values in json.loads(output.strip().splitlines()[-1]).items():
                seconds[setting][task] += values
    rows = []
    for task, label in TASKS.items():
        if not seconds["0"][task]:  # a single-grid preset has no top prior
            continue
        off, on = median(seconds["0"][task]), median(seconds["1"][task])
        rows.append([label, f"{off:.3f}", f"{on:.3f}", f"{off / on:.2f}x"])
    print(f"oneDNN off and on, seconds (median), preset {args.preset}, {args.rounds} round(s); {machine()}")
    print_table(["task", "oneDNN off", "oneDNN on", "speed-up with oneDNN"], rows)


if __name__ == "__main__":
    main()
