"""Trains the VQ-VAE on the training split, then the PixelCNN prior on the code grids of that split.

    python train.py                                         # default preset on the official OASIS-1 download
    python train.py --data ../shared/data/oasis1-mni-volumes --out runs/mni
    python train.py --resume --out runs/mni                 # continue an interrupted run

The run directory receives config.json, vqvae.keras and pixelcnn.keras (best epoch by validation, weights only),
history_vqvae.csv, history_prior.csv, curve plots and summary.json; checkpoints/ holds the last completed epoch of
each phase (with optimizer state) so that --resume never redoes a finished epoch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from datetime import datetime
from pathlib import Path

from cli import UserError, add_config_args, add_data_args, quiet_tensorflow, run_main
from hyperparameters import Config, make_config

PHASES = ("vqvae", "prior")
PROCESS_START = time.time()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train the VQ-VAE, then the PixelCNN prior over its codes.")
    add_data_args(parser, default_data="oasis", default_split="train")
    add_config_args(parser)
    parser.add_argument("--out", type=Path, default=None,
                        help="run directory to write (default: runs/<timestamp>)")
    parser.add_argument("--epochs", type=int, help="VQ-VAE epochs (default: the preset's)")
    parser.add_argument("--prior-epochs", type=int, help="PixelCNN epochs (default: the preset's)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted run in --out from its last completed epoch")
    parser.add_argument("--strategy", default="auto", choices=["auto", "one", "mirrored", "multiworker"],
                        help="tf.distribute strategy: auto (mirrored when several GPUs are visible), one device, "
                             "mirrored (all local GPUs), multiworker (machines listed in TF_CONFIG)")
    parser.add_argument("--tensorboard", action="store_true", help="also write TensorBoard logs to RUN_DIR/logs")
    parser.add_argument("--verbose", type=int, choices=[0, 1, 2], default=None,
                        help="Keras output: 0 silent, 1 progress bars, 2 one line per epoch "
                             "(default: 1 on a terminal, else 2)")
    return parser


def resolve_config(args) -> Config:
    overrides = list(args.overrides)
    for flag, key in ((args.epochs, "epochs"), (args.prior_epochs, "prior_epochs"), (args.seed, "seed")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    try:
        return make_config(args.preset, overrides)
    except ValueError as error:
        raise UserError(str(error)) from None


def make_strategy(name: str):
    import tensorflow as tf

    if name == "multiworker":
        if "TF_CONFIG" not in os.environ:
            raise UserError("--strategy multiworker needs the TF_CONFIG environment variable (see README)")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored" or (name == "auto" and len(tf.config.list_logical_devices("GPU")) > 1):
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def is_chief(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().jobs


class RunState:
    """`checkpoints/state.json`: which epochs of which phase are complete, and their history rows."""

    def __init__(self, run_dir: Path, writer: bool):
        self.path = run_dir / "checkpoints" / "state.json"
        self.writer = writer
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {
            "history": {phase: [] for phase in PHASES}}

    def epochs_done(self, phase: str) -> int:
        return len(self.data["history"][phase])

    def save(self) -> None:
        from dataset import atomic_write_text

        if self.writer:
            atomic_write_text(self.path, json.dumps(self.data, indent=1))


def epoch_checkpointer(phase, run_dir, state, writer, monitor, mode):
    """A callback that, after each epoch, saves the last checkpoint, the best weights and the history, atomically."""
    import keras

    from dataset import atomic_write_text
    from modules import save_model, weights_only_copy

    class EpochCheckpoint(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.diverged = False
            self.epoch_start = time.perf_counter()

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch_start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs = {key: float(value) for key, value in (logs or {}).items()}
            if not all(math.isfinite(value) for value in logs.values()):
                self.diverged = True
                self.model.stop_training = True
                return
            seconds = time.perf_counter() - self.epoch_start
            # elapsed: wall time since this process started (data loading and tracing included), for time-to-quality
            row = {"epoch": epoch + 1, **logs, "seconds": round(seconds, 2),
                   "elapsed": round(time.time() - PROCESS_START, 2)}
            history = state.data["history"][phase]
            best = [r[monitor] for r in history if monitor in r]
            improved = monitor in logs and (not best or (logs[monitor] > max(best) if mode == "max"
                                                         else logs[monitor] < min(best)))
            if writer:
                if improved or not (run_dir / f"{phase_file(phase)}.keras").exists():
                    save_model(weights_only_copy(self.model), run_dir / f"{phase_file(phase)}.keras")
                save_model(self.model, run_dir / "checkpoints" / f"{phase}_last.keras")
            history.append(row)
            state.save()
            if writer:
                write_history(run_dir / f"history_{phase}.csv", history, atomic_write_text)

        def on_batch_end(self, batch, logs=None):
            if logs and "loss" in logs and not math.isfinite(float(logs["loss"])):
                self.diverged = True
                self.model.stop_training = True

    return EpochCheckpoint()


def phase_file(phase: str) -> str:
    return "vqvae" if phase == "vqvae" else "pixelcnn"


def write_history(path: Path, rows: list[dict], write_text) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = [",".join(columns)] + [",".join(str(row.get(key, "")) for key in columns) for row in rows]
    write_text(path, "\n".join(lines) + "\n")


def plot_history(run_dir: Path, state: RunState) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {"vqvae": [("loss", "loss"), ("ssim", "SSIM"), ("perplexity", "code perplexity")],
              "prior": [("bits_per_code", "bits per code")]}
    for phase, metrics in panels.items():
        rows = state.data["history"][phase]
        if not rows:
            continue
        figure, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.2), squeeze=False)
        epochs = [row["epoch"] for row in rows]
        for axis, (key, title) in zip(axes[0], metrics):
            for prefix, label in (("", "train"), ("val_", "validation")):
                values = [row.get(prefix + key) for row in rows]
                if any(value is not None for value in values):
                    axis.plot(epochs, values, label=label)
            axis.set_title(title)
            axis.set_xlabel("epoch")
            axis.legend()
            axis.grid(alpha=0.3)
        figure.tight_layout()
        tmp = run_dir / f".{phase}_curves.tmp.png"
        figure.savefig(tmp, dpi=100)
        os.replace(tmp, run_dir / f"{phase}_curves.png")
        plt.close(figure)


def prepare_run_dir(args, config: Config, writer: bool) -> Path:
    from dataset import atomic_write_text

    run_dir = args.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    config_path = run_dir / "config.json"
    if args.resume:
        if not config_path.exists():
            raise UserError(f"--resume: {config_path} does not exist; there is no run to resume in {run_dir}")
        try:
            saved = json.loads(config_path.read_text())
        except ValueError:
            raise UserError(f"--resume: {config_path} is not valid JSON; the run directory is damaged") from None
        if saved != config.to_dict():
            changed = sorted(key for key in set(saved) | set(config.to_dict())
                             if saved.get(key) != config.to_dict().get(key))
            raise UserError(f"--resume: the command line gives other hyperparameters than {config_path} "
                            f"({', '.join(changed)}); repeat the original flags or start a new --out")
        return run_dir
    if config_path.exists():
        raise UserError(f"--out {run_dir} already holds a run; use --resume to continue it or choose another --out")
    if writer:
        try:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"--out {run_dir}: cannot create it ({error.strerror}); choose a writable folder") \
                from None
        if not os.access(run_dir, os.W_OK):
            raise UserError(f"--out {run_dir}: not writable; choose a writable folder")
        atomic_write_text(config_path, config.to_json())
    return run_dir


def train_vqvae(config, strategy, train_images, validate_images, run_dir, state, writer, verbose, callbacks):
    import keras

    from dataset import make_tf_dataset
    from modules import VQVAE

    done = state.epochs_done("vqvae")
    if done >= config.epochs:
        return None
    steps = math.ceil(len(train_images) / config.batch_size)
    with strategy.scope():
        last = run_dir / "checkpoints" / "vqvae_last.keras"
        if done and last.exists():
            model = keras.saving.load_model(last, safe_mode=True)
        else:
            model = VQVAE(config.to_dict(), name="vqvae")
            model.build()
            rate = config.learning_rate
            if config.lr_schedule == "cosine":
                rate = keras.optimizers.schedules.CosineDecay(rate, config.epochs * steps, alpha=config.lr_floor)
            model.compile(optimizer=keras.optimizers.Adam(rate), jit_compile=False)
    train = make_tf_dataset(train_images, config.batch_size, shuffle=True, seed=config.seed)
    validate = make_tf_dataset(validate_images, config.batch_size, shuffle=False) if len(validate_images) else None
    checkpoint = epoch_checkpointer("vqvae", run_dir, state, writer, "val_ssim" if validate else "ssim", "max")
    model.fit(train, validation_data=validate, epochs=config.epochs, initial_epoch=done, verbose=verbose, shuffle=False,
              callbacks=[checkpoint, *callbacks])
    return checkpoint


def bits_metric(codes, logits):
    from modules import bits_per_code
    return bits_per_code(logits, codes)


bits_metric.__name__ = "bits_per_code"


def train_prior(config, strategy, train_codes, validate_codes, run_dir, state, writer, verbose, callbacks):
    import keras
    import tensorflow as tf

    from modules import PixelCNN

    done = state.epochs_done("prior")
    if done >= config.prior_epochs:
        return None
    with strategy.scope():
        last = run_dir / "checkpoints" / "prior_last.keras"
        if done and last.exists():
            model = keras.saving.load_model(last, safe_mode=True, custom_objects={"bits_per_code": bits_metric})
        else:
            model = PixelCNN(config.to_dict(), name="pixelcnn")
            model.build()
            model.compile(optimizer=keras.optimizers.Adam(config.prior_learning_rate),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          metrics=[bits_metric], jit_compile=False)
    train = tf.data.Dataset.from_tensor_slices((train_codes, train_codes)).cache().shuffle(
        len(train_codes), seed=config.seed).batch(config.prior_batch_size).prefetch(tf.data.AUTOTUNE)
    validate = None
    if len(validate_codes):
        validate = tf.data.Dataset.from_tensor_slices((validate_codes, validate_codes)).batch(
            config.prior_batch_size)
    checkpoint = epoch_checkpointer("prior", run_dir, state, writer,
                                    "val_bits_per_code" if validate else "bits_per_code", "min")
    model.fit(train, validation_data=validate, epochs=config.prior_epochs, initial_epoch=done, verbose=verbose, shuffle=False,
              callbacks=[checkpoint, *callbacks])
    return checkpoint


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = resolve_config(args)
    quiet_tensorflow()
    import keras
    import tensorflow as tf

    strategy = make_strategy(args.strategy)  # before any other TensorFlow op (multi-worker needs that)
    writer = is_chief(strategy)
    run_dir = prepare_run_dir(args, config, writer)
    if not writer:  # non-chief workers write into a scratch folder that nobody reads
        import tempfile
        run_dir = Path(tempfile.mkdtemp(prefix="oasisvq-worker-"))
        (run_dir / "checkpoints").mkdir()
        (run_dir / "config.json").write_text(config.to_json())

    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    verbose = args.verbose if args.verbose is not None else (1 if sys.stdout.isatty() else 2)

    from dataset import atomic_write_text, load_slices

    slices = load_slices(args.data, config, args.cache, args.oasis_url, args.discs, args.delete_archives,
                         args.strict, progress=verbose == 1)
    train_set, validate_set = slices.select("train"), slices.select("validate")
    if not len(train_set):
        raise UserError(f"--data {args.data}: the train split is empty; it needs at least one subject")
    print(f"run {run_dir}: {len(train_set)} training slices ({len(set(train_set.subjects))} subjects), "
          f"{len(validate_set)} validation slices ({len(set(validate_set.subjects))} subjects), "
          f"preset {args.preset}, {strategy.num_replicas_in_sync} replica(s)", flush=True)
    state = RunState(run_dir, writer)
    callbacks = [keras.callbacks.TensorBoard(run_dir / "logs")] if args.tensorboard and writer else []
    wall_start = time.time()

    def finish_phase(checkpoint, phase):
        plot_history(run_dir, state) if writer else None
        if checkpoint is not None and checkpoint.diverged:
            print(f"error: the {phase} loss became NaN or infinite; training stopped. The last good checkpoint "
                  f"is kept in {run_dir}; lower the learning rate (--set ...) and resume or retrain.",
                  file=sys.stderr)
            return False
        return True

    try:
        checkpoint = train_vqvae(config, strategy, train_set.images, validate_set.images, run_dir, state, writer,
                                 verbose, callbacks)
        if not finish_phase(checkpoint, "VQ-VAE"):
            return 1
        from modules import encode_all

        vqvae = keras.saving.load_model(run_dir / "vqvae.keras", safe_mode=True)
        train_codes = encode_all(vqvae, train_set.images)
        validate_codes = encode_all(vqvae, validate_set.images)
        checkpoint = train_prior(config, strategy, train_codes, validate_codes, run_dir, state, writer, verbose,
                                 callbacks)
        if not finish_phase(checkpoint, "PixelCNN"):
            return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: completed epochs are saved; continue with "
              f"python train.py --resume --out {run_dir} (and the same flags)", file=sys.stderr)
        return 130

    history = state.data["history"]
    best_vq = max(history["vqvae"], key=lambda row: row.get("val_ssim", row.get("ssim", 0)))
    best_prior = min(history["prior"], key=lambda row: row.get("val_bits_per_code", row.get("bits_per_code", 99)))
    summary = {
        "preset": args.preset, "seed": config.seed, "data": str(args.data), "data_fingerprint": slices.fingerprint(),
        "slices": {split: len(slices.select(split)) for split in ("train", "validate", "test")},
        "subjects": {split: sorted(set(slices.select(split).subjects)) for split in ("train", "validate", "test")},
        "vqvae": {"epochs": len(history["vqvae"]), "best_epoch": best_vq["epoch"],
                  **{key: best_vq[key] for key in best_vq if key.startswith(("val_", "ssim", "loss"))}},
        "prior": {"epochs": len(history["prior"]), "best_epoch": best_prior["epoch"],
                  **{key: best_prior[key] for key in best_prior if "bits" in key}},
        "wall_seconds": {phase: sum(row["seconds"] for row in history[phase]) for phase in PHASES},
        "this_session_seconds": round(time.time() - wall_start, 1),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "tensorflow": tf.__version__, "keras": keras.__version__,
                    "replicas": strategy.num_replicas_in_sync},
    }
    if writer:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    print(f"done: validation SSIM {best_vq.get('val_ssim', float('nan')):.4f} (epoch {best_vq['epoch']}), prior "
          f"{best_prior.get('val_bits_per_code', float('nan')):.3f} bits/code; wrote {run_dir}")
    return 0


if __name__ == "__main__":
    run_main(main)
