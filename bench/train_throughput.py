"""VQ-VAE training throughput (images/s): the project's trainer against the Keras VQ-VAE example's way.

    python bench/train_throughput.py [--images 320] [--repeats 3]
                                     [--presets seed,seed:ssim_loss_weight=0,default,default:ssim_loss_weight=0]

Baseline, as keras.io/examples/generative/vq_vae trains: a Model subclass with a plain train_step around the
same encoder/decoder, the example's quantizer (codebook loss through add_loss), fit on NumPy arrays, TensorFlow's
default settings. Project: modules.VQVAE (EMA codebook, dead-code restarts, SSIM, perplexity and code usage
reported every step, SSIM in the loss of both presets) fed by dataset.make_tf_dataset, with the TensorFlow settings
every script applies (cli.configure_tensorflow: the BFC CPU allocator); the middle column runs it with TensorFlow's
defaults, separating the trainer's code from that setting. Same model size, batch and images.

Each trainer runs in its own fresh process (so no trainer inherits another's memory or threads), builds its model,
runs one warm-up epoch (tracing) and times one more step by step; a round runs the three processes, in an order
that rotates from round to round. Throughput is the batch size over the median step time of all timed steps, so a
rare stall (a step over 3x the median; counted in the last column) does not decide the ratio. The
`:ssim_loss_weight=0` rows train on the baseline's loss (MSE), separating what the trainer costs from what the SSIM
loss term costs.
"""

import argparse
import json
import os
import subprocess
import sys
import time

from common import machine, median, print_table

TRAINERS = ("baseline", "project-tf-defaults", "project")


def keras_example_model(config, train_variance: float):
    """The baseline: the Keras example's quantizer and trainer around the project's encoder and decoder (built in the
    child process, after its TensorFlow settings)."""
    import keras
    import tensorflow as tf

    from modules import build_decoder, build_encoder

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
            distances = (tf.reduce_sum(flattened ** 2, axis=1, keepdims=True)
                         + tf.reduce_sum(self.embeddings ** 2, 0) - 2 * similarity)
            encodings = tf.one_hot(tf.argmin(distances, axis=1), self.num_embeddings)
            quantized = tf.reshape(tf.matmul(encodings, self.embeddings, transpose_b=True), tf.shape(x))
            commitment = tf.reduce_mean((tf.stop_gradient(quantized) - x) ** 2)
            codebook = tf.reduce_mean((quantized - tf.stop_gradient(x)) ** 2)
            self.add_loss(self.beta * commitment + codebook)
            return x + tf.stop_gradient(quantized - x)

    class ExampleTrainer(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            inputs = keras.Input((config.image_size, config.image_size, 1))
            quantized = ExampleQuantizer(config.num_codes, config.latent_dim)(build_encoder(config)(inputs))
            self.vqvae = keras.Model(inputs, build_decoder(config)(quantized))
            self.total_loss_tracker = keras.metrics.Mean(name="total_loss")

        def train_step(self, x):
            with tf.GradientTape() as tape:
                reconstructions = self.vqvae(x)
                reconstruction_loss = tf.reduce_mean((x - reconstructions) ** 2) / train_variance
                total_loss = reconstruction_loss + sum(self.vqvae.losses)
            grads = tape.gradient(total_loss, self.vqvae.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, self.vqvae.trainable_variables))
            self.total_loss_tracker.update_state(total_loss)
            return {"loss": self.total_loss_tracker.result()}

    return ExampleTrainer()


def step_timer():
    """A Keras callback that records the wall seconds of every training step (on a CPU the step runs synchronously
    between the two calls) in its `seconds`."""
    import keras

    class StepTimes(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds = []

        def on_train_batch_begin(self, batch, logs=None):
            self.begin = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.seconds.append(time.perf_counter() - self.begin)

    return StepTimes()


def child(trainer: str, spec: str, count: int) -> dict:
    """Runs in a fresh process: warm-up epoch, then one timed epoch; returns its epoch and step seconds."""
    if trainer == "project":
        from cli import configure_tensorflow
        configure_tensorflow()
    import keras
    import numpy as np

    from dataset import make_tf_dataset
    from hyperparameters import make_config
    from modules import VQVAE

    preset, *overrides = spec.split(":")
    config = make_config(preset, overrides)
    keras.utils.set_random_seed(0)
    images = np.random.default_rng(0).random((count, 128, 128, 1)).astype("float32")
    if trainer == "baseline":
        model = keras_example_model(config, float(images.var()))
        model.compile(optimizer=keras.optimizers.Adam(config.learning_rate), jit_compile=False)

        def fit_epoch(callbacks):
            model.fit(images, epochs=1, batch_size=config.batch_size, verbose=0, callbacks=callbacks)
    else:
        model = VQVAE(config.to_dict())
        model.build()
        model.compile(optimizer=keras.optimizers.Adam(config.learning_rate), jit_compile=False)
        dataset = make_tf_dataset(images[..., 0], config.batch_size, shuffle=True, seed=0)

        def fit_epoch(callbacks):
            model.fit(dataset, epochs=1, verbose=0, shuffle=False, callbacks=callbacks)  # the dataset shuffles

    fit_epoch([])
    steps = step_timer()
    begin = time.perf_counter()
    fit_epoch([steps])
    full_batches = count // config.batch_size  # a last, smaller batch would bias the median
    return {"epoch": time.perf_counter() - begin, "steps": steps.seconds[:full_batches]}


def run_child(trainer: str, spec: str, count: int) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "TF_CPU_ALLOCATOR_USE_BFC"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    result = subprocess.run([sys.executable, __file__, "--child", trainer, spec, str(count)], env=env,
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=320, help="images per timed epoch (default 320)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds, each running every trainer once in a fresh "
                        "process (default 3)")
    parser.add_argument("--presets", default="seed,seed:ssim_loss_weight=0,default,default:ssim_loss_weight=0",
                        help="comma-separated presets, each optionally PRESET:KEY=VALUE:KEY=VALUE (default "
                             "seed,seed:ssim_loss_weight=0,default,default:ssim_loss_weight=0)")
    parser.add_argument("--child", nargs=3, metavar=("TRAINER", "SPEC", "IMAGES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        trainer, spec, count = args.child
        print(json.dumps(child(trainer, spec, int(count))))
        return
    import tensorflow as tf

    from hyperparameters import make_config

    rows = []
    for spec in args.presets.split(","):
        preset, *overrides = spec.split(":")
        batch = make_config(preset, overrides).batch_size
        steps = {trainer: [] for trainer in TRAINERS}
        for round_index in range(args.repeats):
            shift = round_index % len(TRAINERS)
            for trainer in TRAINERS[shift:] + TRAINERS[:shift]:
                steps[trainer] += run_child(trainer, spec, args.images)["steps"]
        speeds = {trainer: batch / median(seconds) for trainer, seconds in steps.items()}
        stalls = []
        for trainer in TRAINERS:
            slow = [step for step in steps[trainer] if step > 3 * median(steps[trainer])]
            stalls.append(f"{len(slow)}")
        rows.append([spec, batch, *(f"{speeds[trainer]:.1f}" for trainer in TRAINERS),
                     f"**{speeds['project'] / speeds['baseline']:.2f}**",
                     f"{speeds['project-tf-defaults'] / speeds['baseline']:.2f}",
                     " / ".join(stalls) + f" of {len(steps['baseline'])}"])
    print(f"VQ-VAE training throughput, images/s = batch / median step time; {args.repeats} rounds, each trainer in "
          f"a fresh process timing one epoch of {args.images} images after a warm-up epoch; {machine()}; "
          f"TensorFlow {tf.__version__}")
    print_table(["preset", "batch", "baseline (Keras example)", "OASISVQ, TF defaults", "OASISVQ (as the scripts run)",
                 "ratio", "ratio, TF defaults", "stalled steps (baseline / TF defaults / OASISVQ)"], rows)


if __name__ == "__main__":
    main()
