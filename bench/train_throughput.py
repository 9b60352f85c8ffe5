"""VQ-VAE training throughput (images/s): the project's trainer against the Keras VQ-VAE example's way.

    python bench/train_throughput.py [--images 640] [--repeats 3]
                                     [--presets seed,seed:ssim_loss_weight=0,default,default:ssim_loss_weight=0]

Baseline, as keras.io/examples/generative/vq_vae trains: a Model subclass with a plain train_step around the
same encoder/decoder, the example's quantizer (codebook loss through add_loss), fit on NumPy arrays. Project:
modules.VQVAE (EMA codebook, dead-code restarts, SSIM, perplexity and code usage reported every step, and SSIM in
the loss of both presets) fed by dataset.make_tf_dataset. Same model size, batch, images and process. A round builds
both trainers anew, runs one warm-up epoch of each (tracing) and times one more, step by step; rounds alternate
which trainer goes first. Throughput is the batch size over the median step time of all timed steps, so a rare
stall (a step over 3x the median; counted in the last columns) does not decide the ratio; the epoch figure
(images over the median epoch time, stalls included) is printed beside it. The `:ssim_loss_weight=0` rows train
on the baseline's loss (MSE), separating what the trainer costs from what the SSIM loss term costs.
"""

import argparse
import time

from common import machine, median, print_table

import keras
import numpy as np
import tensorflow as tf

from dataset import make_tf_dataset
from hyperparameters import make_config
from modules import VQVAE, build_decoder, build_encoder


class ExampleQuantizer(keras.layers.Layer):
    """The Keras example's VectorQuantizer: codebook + commitment loss via add_loss, straight-through output."""

    def __init__(self, num_embeddings, embedding_dim, beta=0.25, **kwargs):
        super().__init__(**kwargs)
        self.embedding_dim, self.num_embeddings, self.beta = embedding_dim, num_embeddings, beta
        self.embeddings = self.add_weight(shape=(embedding_dim, num_embeddings), initializer="random_uniform",
                                          name="embeddings")

    def call(self, x):
        flattened = tf.reshape(x, [-1, self.embedding_dim])
        similarity = tf.matmul(flattened, self.embeddings)
        distances = (tf.reduce_sum(flattened ** 2, axis=1, keepdims=True) + tf.reduce_sum(self.embeddings ** 2, 0)
                     - 2 * similarity)
        encodings = tf.one_hot(tf.argmin(distances, axis=1), self.num_embeddings)
        quantized = tf.reshape(tf.matmul(encodings, self.embeddings, transpose_b=True), tf.shape(x))
        commitment = tf.reduce_mean((tf.stop_gradient(quantized) - x) ** 2)
        codebook = tf.reduce_mean((quantized - tf.stop_gradient(x)) ** 2)
        self.add_loss(self.beta * commitment + codebook)
        return x + tf.stop_gradient(quantized - x)


class ExampleTrainer(keras.Model):
    def __init__(self, config, train_variance, **kwargs):
        super().__init__(**kwargs)
        self.train_variance = train_variance
        inputs = keras.Input((config.image_size, config.image_size, 1))
        quantized = ExampleQuantizer(config.num_codes, config.latent_dim)(build_encoder(config)(inputs))
        self.vqvae = keras.Model(inputs, build_decoder(config)(quantized))
        self.total_loss_tracker = keras.metrics.Mean(name="total_loss")

    def train_step(self, x):
        with tf.GradientTape() as tape:
            reconstructions = self.vqvae(x)
            reconstruction_loss = tf.reduce_mean((x - reconstructions) ** 2) / self.train_variance
            total_loss = reconstruction_loss + sum(self.vqvae.losses)
        grads = tape.gradient(total_loss, self.vqvae.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.vqvae.trainable_variables))
        self.total_loss_tracker.update_state(total_loss)
        return {"loss": self.total_loss_tracker.result()}


class StepTimes(keras.callbacks.Callback):
    """Wall seconds of every training step (the step runs synchronously between the two callbacks on a CPU)."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_train_batch_begin(self, batch, logs=None):
        self.begin = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.seconds.append(time.perf_counter() - self.begin)


def timed_epoch(make_fit_epoch):
    """(epoch seconds, step seconds) of one epoch of a freshly built trainer, after a warm-up epoch (tracing)."""
    fit_epoch = make_fit_epoch()
    fit_epoch([])
    steps = StepTimes()
    begin = time.perf_counter()
    fit_epoch([steps])
    return time.perf_counter() - begin, steps.seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=640, help="images per timed epoch (default 640)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds, each building both trainers anew and timing "
                        "one epoch of each (default 3)")
    parser.add_argument("--presets", default="seed,seed:ssim_loss_weight=0,default,default:ssim_loss_weight=0",
                        help="comma-separated presets, each optionally PRESET:KEY=VALUE:KEY=VALUE (default "
                             "seed,seed:ssim_loss_weight=0,default,default:ssim_loss_weight=0)")
    args = parser.parse_args()
    images = np.random.default_rng(0).random((args.images, 128, 128, 1)).astype("float32")
    rows = []
    for spec in args.presets.split(","):
        preset, *overrides = spec.split(":")
        config = make_config(preset, overrides)
        dataset = make_tf_dataset(images[..., 0], config.batch_size, shuffle=True, seed=0)
        full_batches = args.images // config.batch_size

        def baseline_epoch():
            trainer = ExampleTrainer(config, float(images.var()))
            trainer.compile(optimizer=keras.optimizers.Adam(config.learning_rate), jit_compile=False)
            return lambda callbacks: trainer.fit(images, epochs=1, batch_size=config.batch_size, verbose=0,
                                                 callbacks=callbacks)

        def project_epoch():
            trainer = VQVAE(config.to_dict())
            trainer.build()
            trainer.compile(optimizer=keras.optimizers.Adam(config.learning_rate), jit_compile=False)
            return lambda callbacks: trainer.fit(dataset, epochs=1, verbose=0, shuffle=False,  # it shuffles itself
                                                 callbacks=callbacks)

        epochs = {"baseline": [], "project": []}
        steps = {"baseline": [], "project": []}
        order = [("baseline", baseline_epoch), ("project", project_epoch)]
        for round_index in range(args.repeats):
            for name, make in order[::-1] if round_index % 2 else order:
                keras.utils.set_random_seed(round_index)
                seconds, step_seconds = timed_epoch(make)
                epochs[name].append(seconds)
                steps[name] += step_seconds[:full_batches]  # a last, smaller batch would bias the median
        base, ours = (config.batch_size / median(steps[name]) for name in ("baseline", "project"))
        base_epoch, ours_epoch = (args.images / median(epochs[name]) for name in ("baseline", "project"))
        stalls = []
        for name in ("baseline", "project"):
            slow = [step for step in steps[name] if step > 3 * median(steps[name])]
            stalls.append(f"{len(slow)} of {len(steps[name])}, {sum(slow):.1f} s")
        rows.append([spec, config.batch_size, f"{base:.1f}", f"{ours:.1f}", f"**{ours / base:.2f}**",
                     f"{base_epoch:.1f}", f"{ours_epoch:.1f}", f"{ours_epoch / base_epoch:.2f}", *stalls])
    print(f"VQ-VAE training throughput, images/s; {args.repeats} rounds of one timed epoch of {args.images} images "
          f"per trainer, each freshly built; {machine()}; TensorFlow {tf.__version__}")
    print_table(["preset", "batch", "baseline, per step", "OASISVQ, per step", "ratio", "baseline, per epoch",
                 "OASISVQ, per epoch", "epoch ratio", "baseline stalls", "OASISVQ stalls"], rows)


if __name__ == "__main__":
    main()
