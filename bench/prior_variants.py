"""What a prior's recipe costs in training: seconds per training step of one grid's prior, the preset's against
variants of it, in the precision train.py picks on this machine.

    python bench/prior_variants.py --variant prior_filters=56 --variant prior_residual_blocks=6
    python bench/prior_variants.py --grid top --variant top_prior_filters=96 --rounds 3 --steps 5

Each --variant is a comma-separated list of KEY=VALUE overrides, as train.py's --set takes them. Each round times
the preset and every variant, in an order that rotates from round to round, on random code grids of the real
shapes with fresh random weights (the speed does not depend on them): `steps` training steps of prior_batch_size
grids after one that traces. Figures are medians over steps and rounds; "vs preset" is a variant's seconds over the
preset's, which is how much longer its phase of train.py takes per epoch.
"""

import argparse
import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
from common import machine, median, print_table, random_code_grids, training_step_seconds  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default", help="the baseline preset (default: default)")
    parser.add_argument("--grid", choices=("top", "bottom"), default="bottom", help="which prior (default bottom)")
    parser.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE...]",
                        help="overrides of the preset to time beside it (repeatable)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every recipe (default 3)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per recipe and round (default 5)")
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be at least 1")

    import numpy as np

    from cli import resolved_precision
    from hyperparameters import make_config
    from modules import build_prior, compile_prior, compute_precision, grid_inputs

    try:
        recipes = {"preset": make_config(args.preset)}
        recipes.update({variant: make_config(args.preset, variant.split(",")) for variant in args.variant})
    except ValueError as error:
        parser.error(str(error))
    rng = np.random.default_rng(0)
    batch = recipes["preset"].prior_batch_size
    inputs = grid_inputs(args.grid, random_code_grids(recipes["preset"], batch, rng),
                         rng.random(batch).astype("float32"))
    precision = resolved_precision(recipes["preset"].prior_precision)
    seconds = {name: [] for name in recipes}
    names = list(recipes)
    for round_index in range(args.rounds):
        for name in names[round_index % len(names):] + names[:round_index % len(names)]:
            with compute_precision(precision):
                prior = compile_prior(build_prior(recipes[name], args.grid), recipes[name].prior_learning_rate)
            seconds[name] += training_step_seconds(prior, (inputs, inputs["codes"]), args.steps)
    base = median(seconds["preset"])
    rows = [[name, f"{median(values):.3f}", f"{min(values):.3f}-{max(values):.3f}", f"{median(values) / base:.2f}x"]
            for name, values in seconds.items()]
    print(f"{args.grid} prior training step, seconds (median of {args.rounds} x {args.steps}), batch {batch}, "
          f"preset {args.preset}, {precision}; {machine()}")
    print_table(["recipe", "step s", "range", "vs preset"], rows)


if __name__ == "__main__":
    main()
