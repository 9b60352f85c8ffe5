"""The priors' training arithmetic, float32 against bfloat16 mixed precision: seconds per training step of each prior.

    python bench/precision.py [--preset default] [--rounds 3] [--steps 5]

With oneDNN on, as train.py runs on one device (TF_ENABLE_ONEDNN_OPTS=1 unless set). Each round times both
precisions, in an order that alternates from round to round, on random code grids of the real shapes with random
weights (the speed does not depend on them): `steps` training steps of prior_batch_size grids after one that traces.
Figures are medians over steps and rounds; the speed-up is float32 seconds over bfloat16 seconds. The last column
is the loss of one step in both precisions from the same weights on the same batch (how far bfloat16 moves it).
hyperparameters.prior_precision "auto" picks bfloat16 where the hardware computes it natively, from these figures.
"""

import argparse
import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
from common import machine, median, print_table, random_code_grids, training_step_seconds  # noqa: E402

PRECISIONS = ("float32", "bfloat16")


def prior_for(config, grid: str, precision: str, weights=None):
    import keras

    from modules import build_prior, compute_precision

    with compute_precision(precision):
        prior = build_prior(config, grid)
    if weights is not None:
        prior.set_weights(weights)
    prior.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=False,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return prior


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per prior, precision and round")
    args = parser.parse_args()

    import numpy as np

    from hyperparameters import make_config
    from modules import grid_inputs

    config = make_config(args.preset)
    rng = np.random.default_rng(0)
    batch = config.prior_batch_size
    codes = random_code_grids(config, batch, rng)
    rows = []
    for grid in config.code_grids:
        inputs = grid_inputs(grid, codes, rng.random(batch).astype("float32"))
        weights = prior_for(config, grid, "float32").get_weights()
        losses = {precision: float(prior_for(config, grid, precision, weights).test_on_batch(inputs, inputs["codes"]))
                  for precision in PRECISIONS}
        seconds = {precision: [] for precision in PRECISIONS}
        for round_index in range(args.rounds):
            for precision in PRECISIONS if round_index % 2 == 0 else PRECISIONS[::-1]:
                prior = prior_for(config, grid, precision, weights)
                seconds[precision] += training_step_seconds(prior, (inputs, inputs["codes"]), args.steps)
        single, mixed = median(seconds["float32"]), median(seconds["bfloat16"])
        rows.append([f"{grid} prior ({codes[grid].shape[1]}x{codes[grid].shape[2]}, batch {batch})", f"{single:.3f}",
                     f"{mixed:.3f}", f"{single / mixed:.2f}x",
                     f"{losses['float32']:.4f} / {losses['bfloat16']:.4f}"])
    print(f"prior training step, seconds (median of {args.rounds} x {args.steps}), preset {args.preset}, oneDNN "
          f"{os.environ['TF_ENABLE_ONEDNN_OPTS']}; {machine()}")
    print_table(["prior", "float32", "bfloat16", "speed-up", "loss float32 / bfloat16"], rows)


if __name__ == "__main__":
    main()
