"""The training arithmetic, float32 against bfloat16 mixed precision: seconds per training step of the VQ-VAE and
of each prior.

    python bench/precision.py [--preset default] [--rounds 3] [--steps 5]

With oneDNN on, as train.py runs on one device (TF_ENABLE_ONEDNN_OPTS=1 unless set). Each round times both
precisions, in an order that alternates from round to round, with random weights on random inputs of the real shapes
(the speed does not depend on them): `steps` training steps of a batch (batch_size images, prior_batch_size code
grids) after one that traces. Figures are medians over steps and rounds; the speed-up is float32 seconds over
bfloat16 seconds. The last column is the loss of one evaluation step in both precisions from the same weights on the
same batch (how far bfloat16 moves it). hyperparameters.vqvae_precision and prior_precision "auto" pick bfloat16
where the hardware computes it natively, from these figures.
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


def vqvae_for(config, precision: str, weights=None):
    import keras

    from modules import VQVAE, compute_precision

    with compute_precision(precision):
        model = VQVAE(config.to_dict(), dtype="float32")  # as train.py builds it
        model.build()
    if weights is not None:
        model.set_weights(weights)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=False)
    return model


def timed_row(name: str, build, batch, rounds: int, steps: int) -> list[str]:
    """One table row: `build(precision, weights)` makes a compiled model, `batch` is what one step trains on."""
    weights = build("float32", None).get_weights()
    arguments = batch if isinstance(batch, tuple) else (batch,)
    losses = {precision: build(precision, weights).evaluate(*arguments, verbose=0, return_dict=True)["loss"]
              for precision in PRECISIONS}
    seconds = {precision: [] for precision in PRECISIONS}
    for round_index in range(rounds):
        for precision in PRECISIONS if round_index % 2 == 0 else PRECISIONS[::-1]:
            seconds[precision] += training_step_seconds(build(precision, weights), batch, steps)
    single, mixed = median(seconds["float32"]), median(seconds["bfloat16"])
    return [name, f"{single:.3f}", f"{mixed:.3f}", f"{single / mixed:.2f}x",
            f"{losses['float32']:.4f} / {losses['bfloat16']:.4f}"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model, precision and round")
    args = parser.parse_args()

    import numpy as np

    from hyperparameters import make_config
    from modules import grid_inputs

    config = make_config(args.preset)
    rng = np.random.default_rng(0)
    images = rng.random((config.batch_size, config.image_size, config.image_size, 1)).astype("float32")
    rows = [timed_row(f"VQ-VAE ({config.image_size}x{config.image_size}, batch {config.batch_size})",
                      lambda precision, weights: vqvae_for(config, precision, weights), images, args.rounds,
                      args.steps)]
    batch = config.prior_batch_size
    codes = random_code_grids(config, batch, rng)
    for grid in config.code_grids:
        inputs = grid_inputs(grid, codes, rng.random(batch).astype("float32"))
        rows.append(timed_row(f"{grid} prior ({codes[grid].shape[1]}x{codes[grid].shape[2]}, batch {batch})",
                              lambda precision, weights: prior_for(config, grid, precision, weights),
                              (inputs, inputs["codes"]), args.rounds, args.steps))
    print(f"training step, seconds (median of {args.rounds} x {args.steps}), preset {args.preset}, oneDNN "
          f"{os.environ['TF_ENABLE_ONEDNN_OPTS']}; {machine()}")
    print_table(["model", "float32", "bfloat16", "speed-up", "loss float32 / bfloat16"], rows)


if __name__ == "__main__":
    main()
