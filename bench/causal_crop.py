"""Where modules.CausalConv2D crops: its input before the convolution (modules, today) against its output after it
(the layout before): seconds per training step of each prior of a preset, and how far their logits differ.

    python bench/causal_crop.py [--preset default] [--rounds 3] [--steps 4]

With oneDNN on and in the precision train.py picks here, as train.py trains. Each round builds both layouts of each
prior with the same random weights and times `steps` training steps of prior_batch_size random code grids of the
real shapes after one that traces, in an order that alternates from round to round. Single steps on this host fall
into a fast and a slow band (about 1.5 and 2.6 s for the top prior, 2.9 and 5.1 s for the bottom one, whatever the
layout), and which band a model's steps fall into decides the median, so the table gives the fastest step beside
it; "speed-up" is the output-cropping layout's seconds over the input-cropping one's, of medians and of fastest
steps. train.py's real epochs are the figure to trust (README, Performance).
"""

import argparse
import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
from common import machine, median, print_table, random_code_grids, training_step_seconds  # noqa: E402

LAYOUTS = ("crops its output", "crops its input")


def crops_its_output(self, inputs):
    """CausalConv2D.call as it was: pad, convolve, then cut the output window."""
    from keras import ops

    height, width = inputs.shape[1], inputs.shape[2]
    (pad_top, pad_bottom), (pad_left, pad_right) = self._padding()
    padded = ops.pad(inputs, [[0, 0], [pad_top, pad_bottom], [pad_left, pad_right], [0, 0]])
    outputs = ops.conv(padded, self.kernel, padding="valid", dilation_rate=self.dilation)
    row = self.origin[0] * self.dilation + pad_top
    col = self.origin[1] * self.dilation + pad_left
    return outputs[:, row:row + height, col:col + width] + self.bias


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default", help="the preset whose priors to time (default: default)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both layouts (default 3)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per layout and round (default 4)")
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be at least 1")

    import keras
    import numpy as np

    import modules
    from cli import resolved_precision
    from hyperparameters import make_config

    config = make_config(args.preset)
    precision = resolved_precision(config.prior_precision)
    rng = np.random.default_rng(0)
    codes = random_code_grids(config, config.prior_batch_size, rng)
    calls = dict(zip(LAYOUTS, (crops_its_output, modules.CausalConv2D.call)))
    rows = []
    for grid in config.code_grids:
        inputs = modules.grid_inputs(grid, codes, rng.random(config.prior_batch_size).astype("float32"))
        seconds, logits, weights = {layout: [] for layout in LAYOUTS}, {}, None
        for round_index in range(args.rounds):
            for layout in LAYOUTS if round_index % 2 == 0 else LAYOUTS[::-1]:
                modules.CausalConv2D.call = calls[layout]
                with modules.compute_precision(precision):
                    prior = modules.build_prior(config, grid)
                if weights is None:
                    weights = prior.get_weights()
                else:
                    prior.set_weights(weights)
                logits[layout] = np.asarray(prior(inputs), np.float32)
                modules.compile_prior(prior, config.prior_learning_rate)
                seconds[layout] += training_step_seconds(prior, (inputs, inputs["codes"]), args.steps)
        modules.CausalConv2D.call = calls[LAYOUTS[1]]
        slow, fast = median(seconds[LAYOUTS[0]]), median(seconds[LAYOUTS[1]])
        rows.append([f"{grid} ({codes[grid].shape[1]}x{codes[grid].shape[2]}, batch {config.prior_batch_size})",
                     *(f"{median(seconds[layout]):.3f} (fastest {min(seconds[layout]):.3f})" for layout in LAYOUTS),
                     f"{slow / fast:.2f}x / {min(seconds[LAYOUTS[0]]) / min(seconds[LAYOUTS[1]]):.2f}x",
                     f"{np.abs(logits[LAYOUTS[0]] - logits[LAYOUTS[1]]).max():.1e}"])
    print(f"prior training step, seconds (median of {args.rounds} x {args.steps}), preset {args.preset}, {precision}, "
          f"oneDNN {os.environ['TF_ENABLE_ONEDNN_OPTS']}; {machine()}")
    print_table(["prior", *(f"CausalConv2D {layout}" for layout in LAYOUTS), "speed-up, median / fastest",
                 "max logit difference"], rows)


if __name__ == "__main__":
    main()
