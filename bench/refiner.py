"""Whether an adversarial refiner draws the cortex that the top grid's expected decoding removes: a probe of a next
generation stage (predict.py does not refine yet).

    python bench/refiner.py [--run pretrained] [--split validate] [--num 256] [--seed 0] [--steps 8000]
        [--batch-size 16] [--l1-weight 0] [--outline-weight 0] [--figure PATH]

A run decoding a sampled top grid as expected codebook vectors (top_decoding_temperature) draws smooth slices with
the layout right and no cortex, which even real top codes lose when so decoded (bench/realism_by_grid.py). A
refiner learns the missing detail from pairs, as pix2pix does (Isola et al., 2017): its input is a training slice's
real top codes decoded as predict.py decodes a sampled grid (each position's codebook vectors weighted by the top
prior's teacher-forced softmax at the run's top_decoding_temperature, under uniformly random bottom codes; two
draws of them per slice), its target the slice itself, both left-right flipped at random. The refiner, a small
U-Net (two stride-2 levels, three dilated residual blocks at a quarter of the size, its output added to its input),
trains for --steps against a spectrally normalized conditional patch discriminator (which sees the input beside the
slice) with the hinge loss, feature matching of the discriminator's layers against the real pair's (pix2pixHD,
Wang et al., 2018), an L1 term on 4x4-pixel means that holds the layout, and --l1-weight times the full-resolution
L1 (which pulls towards the mean of the slices a layout could be, the blur the refiner is to undo), and
--outline-weight times how far it falls below the run's tissue threshold where the real slice is above it (drawn
sulci must not cut the brain's outline into pieces: the brain-shaped check); bfloat16 mixed precision where the
CPU computes it natively (cli.resolved_precision). Then --num slices sampled at the real
held-out slices' levels (as realism_by_grid.py's sampled row), and the held-out slices' own top codes decoded as
expected vectors, each refined and not, are scored beside the real slices with realism_by_grid.py's measures.
--figure draws the rows at a few levels. With oneDNN on (as train.py trains; TF_ENABLE_ONEDNN_OPTS=1 unless set),
a step takes about 0.4 s on 2 cores with AMX.
"""

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as train.py trains: its convolutions run 2.8x faster here
from common import (ROOT, SCORE_HEADERS, expected_top_decoding, machine, print_table, save_rows_figure,  # noqa: E402
                    score_rows, two_level_run_and_held_out_slices)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers  # noqa: E402

from cli import resolved_precision  # noqa: E402
from modules import SliceGenerator, compute_precision, encode_all  # noqa: E402

FIGURE_LEVELS = (0.3, 0.4, 0.45, 0.5, 0.55, 0.65)
LAYOUT_WEIGHT = 50.0  # the L1 of 4x4 means
FEATURE_WEIGHT = 10.0  # feature matching
LEARNING_RATE = 2e-4  # both networks, Adam with beta_1 0.5 as in pix2pix


def refiner_network(width: int = 32) -> keras.Model:
    """(b, 128, 128, 1) smooth slices -> (b, 128, 128, 1) slices with detail: input + a U-Net's residual."""
    image = layers.Input((128, 128, 1))
    full = layers.Conv2D(width, 3, padding="same", activation="relu")(image)
    half = layers.Conv2D(2 * width, 4, 2, padding="same", activation="relu")(full)
    x = layers.Conv2D(4 * width, 4, 2, padding="same", activation="relu")(half)
    for dilation in (1, 2, 4):  # a view across a quarter of the slice at 32x32
        branch = layers.Conv2D(4 * width, 3, padding="same", dilation_rate=dilation, activation="relu")(x)
        x = layers.ReLU()(layers.Add()([x, layers.Conv2D(4 * width, 3, padding="same")(branch)]))
    for skip, filters in ((half, 2 * width), (full, width)):  # nearest upsampling: no checkerboard
        x = layers.Concatenate()([layers.UpSampling2D()(x), skip])
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
    residual = layers.Conv2D(1, 3, padding="same", dtype="float32")(x)
    return keras.Model(image, layers.Add(dtype="float32")([image, residual]), name="refiner")


def patch_discriminator() -> keras.Model:
    """(b, 128, 128, 2) input beside slice -> [(b, 16, 16, 1) realness scores, each layer's features (float32)]."""
    pair = layers.Input((128, 128, 2))
    x, features = pair, []
    for filters, stride in ((64, 2), (128, 2), (256, 2), (256, 1)):
        x = layers.LeakyReLU(0.2)(layers.SpectralNormalization(layers.Conv2D(filters, 4, stride, padding="same"))(x))
        features.append(keras.ops.cast(x, "float32"))
    score = layers.SpectralNormalization(layers.Conv2D(1, 3, padding="same"))(x)
    return keras.Model(pair, [keras.ops.cast(score, "float32"), *features], name="patch_discriminator")


def smooth_layouts(run, generator, images, levels, rng) -> np.ndarray:
    """The slices' real top codes decoded as predict.py decodes a sampled top grid, under random bottom codes."""
    codes = encode_all(run.vqvae, images)
    bottom = rng.integers(0, run.config.num_codes, codes["bottom"].shape)
    return expected_top_decoding(run, generator, codes, levels, bottom)


def train_refiner(inputs: np.ndarray, targets: np.ndarray, tissue: float, args) -> keras.Model:
    """The refiner after args.steps adversarial steps on (draws, n, h, w) inputs and their (n, h, w) targets;
    `tissue`: the run's tissue threshold, for the outline term."""
    with compute_precision(resolved_precision("auto")):
        refiner, critic = refiner_network(), patch_discriminator()
    optimizers = [keras.optimizers.Adam(LEARNING_RATE, beta_1=0.5) for _ in range(2)]

    def means(x):
        return tf.nn.avg_pool2d(x, 4, 4, "VALID")

    @tf.function
    def step(smooth, real):
        with tf.GradientTape() as refiner_tape, tf.GradientTape() as critic_tape:
            refined = refiner(smooth, training=True)
            real_score, *real_features = critic(tf.concat([smooth, real], -1), training=True)
            fake_score, *fake_features = critic(tf.concat([smooth, refined], -1), training=True)
            critic_loss = tf.reduce_mean(tf.nn.relu(1 - real_score)) + tf.reduce_mean(tf.nn.relu(1 + fake_score))
            matching = tf.add_n([tf.reduce_mean(tf.abs(fake - tf.stop_gradient(true)))
                                 for fake, true in zip(fake_features, real_features)])
            refiner_loss = (-tf.reduce_mean(fake_score) + FEATURE_WEIGHT * matching
                            + LAYOUT_WEIGHT * tf.reduce_mean(tf.abs(means(refined) - means(real)))
                            + args.l1_weight * tf.reduce_mean(tf.abs(refined - real))
                            + args.outline_weight * tf.reduce_mean(tf.nn.relu(tissue - refined)
                                                                   * tf.cast(real > tissue, tf.float32)))
        for tape, loss, model, optimizer in ((refiner_tape, refiner_loss, refiner, optimizers[0]),
                                             (critic_tape, critic_loss, critic, optimizers[1])):
            optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return critic_loss, refiner_loss

    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    for number in range(1, args.steps + 1):
        picks, draws = rng.integers(0, len(targets), args.batch_size), rng.integers(0, len(inputs), args.batch_size)
        smooth, real = inputs[draws, picks][..., None], targets[picks][..., None]
        flipped = rng.random(args.batch_size) < 0.5
        smooth[flipped], real[flipped] = smooth[flipped, :, ::-1], real[flipped, :, ::-1]
        critic_loss, refiner_loss = step(tf.constant(smooth), tf.constant(real))
        if number % 500 == 0 or number == args.steps:
            print(f"step {number}/{args.steps}: critic {float(critic_loss):.3f}, refiner {float(refiner_loss):.3f}, "
                  f"{(time.perf_counter() - start) / number:.2f} s a step", flush=True)
    return refiner


def refine(refiner, slices: np.ndarray, batch_size: int = 64) -> np.ndarray:
    return np.clip(np.concatenate([np.asarray(refiner(slices[start:start + batch_size, ..., None]), np.float32)[..., 0]
                                   for start in range(0, len(slices), batch_size)]), 0.0, 1.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "pretrained",
                        help="a two-level run that decodes its top grid as expected vectors (default: pretrained/)")
    parser.add_argument("--split", default="validate", choices=["validate", "test"],
                        help="the held-out split the samples are scored against (default: validate)")
    parser.add_argument("--num", type=int, default=256, help="slices per row (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="draws the real slices, the samples and the training")
    parser.add_argument("--steps", type=int, default=8000, help="training steps of the refiner (default: 8000)")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per step (default: 16)")
    parser.add_argument("--l1-weight", type=float, default=0.0,
                        help="weight of the full-resolution L1 with the real slice (default: 0)")
    parser.add_argument("--outline-weight", type=float, default=0.0,
                        help="weight of how far the refined slice falls below the tissue threshold where the real "
                             "slice is above it (default: 0)")
    parser.add_argument("--figure", type=Path, default=None, help="also write a PNG of the rows at a few levels")
    args = parser.parse_args()
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--num", args.num)):
        if value < 1:
            parser.error(f"{flag} must be at least 1")
    for flag, value in (("--l1-weight", args.l1_weight), ("--outline-weight", args.outline_weight)):
        if value < 0:
            parser.error(f"{flag} must be 0 or more")
    loaded = two_level_run_and_held_out_slices(parser, args, "trains and scores on")
    if loaded is None:
        return
    run, real = loaded
    if not run.config.top_decoding_temperature:
        parser.error(f"--run {args.run} decodes the drawn top codes (top_decoding_temperature 0): nothing to refine")
    keras.utils.set_random_seed(args.seed)
    generator, rng = SliceGenerator(run), np.random.default_rng([args.seed, 1])
    train = real.train
    inputs = np.stack([smooth_layouts(run, generator, train.images, train.levels, rng) for _ in range(2)])
    start = time.perf_counter()
    refiner = train_refiner(inputs, train.images, run.config.tissue_intensity, args)
    seconds = time.perf_counter() - start
    layouts = smooth_layouts(run, generator, real.slices, real.levels, rng)
    sampled = generator.many(real.levels, 1.0, args.seed)
    temperature = f"t {run.config.top_decoding_temperature:g}"
    rows = {
        f"real {args.split} slices (control)": (real.slices, real.subjects),
        f"real top codes as expected vectors ({temperature}), random bottom": (layouts, real.subjects),
        "the same, refined": (refine(refiner, layouts), real.subjects),
        "sampled (both grids, as predict.py)": (sampled, None),
        "sampled, refined": (refine(refiner, sampled), None),
    }
    table = score_rows(rows, real, run.config.tissue_intensity, args.seed)
    print(f"refiner: {args.steps} steps of {args.batch_size} pairs from {len(train.images)} training slices in "
          f"{seconds:.0f} s; {len(real.slices)} slices per row at the levels of the real {args.split} slices, run "
          f"{args.run}, seed {args.seed}; {machine()}")
    print_table(SCORE_HEADERS, table)
    if args.figure:
        save_rows_figure(args.figure, rows, real.levels, FIGURE_LEVELS,
                         f"refined and not at the {args.split} slices' levels, run {args.run.name}, seed {args.seed}, "
                         f"{args.steps} steps")


if __name__ == "__main__":
    main()
