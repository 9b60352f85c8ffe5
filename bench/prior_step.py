"""What each of the priors' step optimizations buys: seconds per training step of each prior of a preset as
modules computes it today, and with one optimization undone at a time (and all of them at once), with how far
their logits differ.

    python bench/prior_step.py [--preset default] [--rounds 3] [--steps 4]

The optimizations (README, Performance):
- "input crop": modules.CausalConv2D crops its input before the convolution; undone, it convolves the whole grid
  and cuts its output, whose gradient (StridedSliceGrad) the step then computes;
- "TF dilation": with oneDNN on, a dilated CausalConv2D calls tf.nn.conv2d's dilated kernels; undone, it takes
  keras.ops.conv, which wraps a dilated convolution in SpaceToBatch / BatchToSpace;
- "one condition product": GatedPixelCNN.condition_terms multiplies the condition map by every block's condition
  kernels at once; undone, each block projects it twice, and the gradients add up in the map block by block.

With oneDNN on and in the precision train.py picks here, as train.py trains. Each round builds every variant of each
prior with the same random weights and times `steps` training steps of prior_batch_size random code grids of the
real shapes after one that traces, in an order that turns from round to round. Single steps on this host fall into
a fast and a slow band (about 1.5 and 2.6 s for the top prior, 2.9 and 5.1 s for the bottom one), and which band a
variant's steps fall into decides its median, so the table gives the fastest step beside it; "slower" is a variant's
fastest step over today's. train.py's real epochs are the figure to trust.
"""

import argparse
import contextlib
import os
from unittest import mock

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
from common import machine, median, print_table, random_code_grids, training_step_seconds  # noqa: E402


def crops_its_output(self, inputs):
    """CausalConv2D.call without the input crop: pad, convolve (keras.ops.conv), then cut the output window."""
    from keras import ops

    height, width = inputs.shape[1], inputs.shape[2]
    (pad_top, pad_bottom), (pad_left, pad_right) = self._padding()
    padded = ops.pad(inputs, [[0, 0], [pad_top, pad_bottom], [pad_left, pad_right], [0, 0]])
    outputs = ops.conv(padded, self.kernel, padding="valid", dilation_rate=self.dilation)
    row = self.origin[0] * self.dilation + pad_top
    col = self.origin[1] * self.dilation + pad_left
    return outputs[:, row:row + height, col:col + width] + self.bias


def per_block_condition_terms(self, condition):
    """GatedPixelCNN.condition_terms as two products per block."""
    return [(block.vertical_condition(condition), block.horizontal_condition(condition)) for block in self.blocks]


def undone(names):
    """A context in which the optimizations `names` are undone."""
    import modules

    patches = {"input crop": (modules.CausalConv2D, "call", crops_its_output),
               "TF dilation": (modules, "native_dilation", lambda dtype="float32": False),
               "one condition product": (modules.GatedPixelCNN, "condition_terms", per_block_condition_terms)}
    stack = contextlib.ExitStack()
    for name in names:
        stack.enter_context(mock.patch.object(*patches[name]))
    return stack


VARIANTS = {"today": (), "input crop undone": ("input crop",), "TF dilation undone": ("TF dilation",),
            "one condition product undone": ("one condition product",),
            "all undone": ("input crop", "TF dilation", "one condition product")}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default", help="the preset whose priors to time (default: default)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every variant (default 3)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant and round (default 4)")
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be at least 1")

    import numpy as np

    import modules
    from cli import resolved_precision
    from hyperparameters import make_config

    config = make_config(args.preset)
    precision = resolved_precision(config.prior_precision)
    rng = np.random.default_rng(0)
    codes = random_code_grids(config, config.prior_batch_size, rng)
    names = list(VARIANTS)
    rows = []
    for grid in config.code_grids:
        inputs = modules.grid_inputs(grid, codes, rng.random(config.prior_batch_size).astype("float32"))
        seconds, logits, weights = {name: [] for name in names}, {}, None
        for round_index in range(args.rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                with undone(VARIANTS[name]):
                    with modules.compute_precision(precision):
                        prior = modules.build_prior(config, grid)
                    if weights is None:
                        weights = prior.get_weights()
                    else:
                        prior.set_weights(weights)
                    logits[name] = np.asarray(prior(inputs), np.float32)
                    modules.compile_prior(prior, config.prior_learning_rate)
                    seconds[name] += training_step_seconds(prior, (inputs, inputs["codes"]), args.steps)
        for name in names:
            rows.append([f"{grid} ({codes[grid].shape[1]}x{codes[grid].shape[2]}, batch {config.prior_batch_size})",
                         name, f"{median(seconds[name]):.3f}", f"{min(seconds[name]):.3f}",
                         f"{min(seconds[name]) / min(seconds['today']):.2f}x",
                         f"{np.abs(logits[name] - logits['today']).max():.1e}"])
    print(f"prior training step, seconds ({args.rounds} x {args.steps} steps), preset {args.preset}, {precision}, "
          f"oneDNN {os.environ['TF_ENABLE_ONEDNN_OPTS']}; {machine()}")
    print_table(["prior", "variant", "median", "fastest", "slower (fastest)", "max logit difference"], rows)


if __name__ == "__main__":
    main()
