"""Trains the VQ-VAE on the training split, then the PixelCNN prior on the code grids of that split.

    python train.py                                         # default preset on the official OASIS-1 download
    python train.py --data ../shared/data/oasis1-mni-volumes --out runs/mni
    python train.py --resume --out runs/mni                 # continue an interrupted run
    python train.py --data ... --vqvae-from runs/mni --out runs/mni-prior2   # a new prior on a trained VQ-VAE

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
import signal
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import numpy as np

from cli import UserError, add_config_args, add_data_args, configure_tensorflow, run_main
from hyperparameters import Config, make_config, vqvae_differences

PHASES = ("vqvae", "prior_top", "prior")  # a single-grid run has no prior_top epochs
PRIOR_PHASES = {"top": "prior_top", "bottom": "prior"}
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
    parser.add_argument("--vqvae-from", type=Path, default=None, metavar="RUN_DIR",
                        help="reuse the finished VQ-VAE of RUN_DIR and train only a new PixelCNN prior; RUN_DIR must "
                             "have the same hyperparameters except prior_* and temperature, and the same --data")
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
    for flag, keys in ((args.epochs, ["epochs"]), (args.prior_epochs, ["prior_epochs", "top_prior_epochs"]),
                       (args.seed, ["seed"])):
        if flag is not None:
            overrides += [f"{key}={flag}" for key in keys]
    try:
        config = make_config(args.preset, overrides)
    except ValueError as error:
        raise UserError(str(error)) from None
    for key in ("epochs", "prior_epochs", "top_prior_epochs", "batch_size", "prior_batch_size"):
        if getattr(config, key) < 1:
            raise UserError(f"{key} is {getattr(config, key)}; it must be at least 1")
    if not math.isfinite(config.learning_rate) or not math.isfinite(config.prior_learning_rate):
        raise UserError("learning_rate and prior_learning_rate must be finite numbers")
    return config


def tf_config() -> dict:
    """The cluster of --strategy multiworker, from the TF_CONFIG environment variable; UserError when unusable."""
    if not os.environ.get("TF_CONFIG"):
        raise UserError("--strategy multiworker needs the TF_CONFIG environment variable (see README)")
    try:
        spec = json.loads(os.environ["TF_CONFIG"])
        kind, index = spec["task"]["type"], int(spec["task"]["index"])
        if not 0 <= index < len(spec["cluster"][kind]):
            raise IndexError(index)
    except (ValueError, KeyError, TypeError, IndexError):
        raise UserError('TF_CONFIG must look like {"cluster": {"worker": ["host:port", ...]}, "task": {"type": '
                        '"worker", "index": I}} with this task in the cluster (see README)') from None
    return spec


def writes_run_dir(args) -> bool:
    """False for a multi-worker non-chief, known from TF_CONFIG before TensorFlow starts (see is_chief)."""
    if args.strategy != "multiworker":
        return True
    spec = tf_config()
    kind, index = spec["task"]["type"], int(spec["task"]["index"])
    return kind == "chief" or (kind == "worker" and index == 0 and "chief" not in spec["cluster"])


def make_strategy(name: str):
    import tensorflow as tf

    if name == "multiworker":
        tf_config()
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


def shard_by_data(dataset):
    """Under tf.distribute each worker keeps its share of every global batch (DATA sharding). The datasets here are
    in-memory arrays with no files to shard, where the default AUTO policy warns and falls back to DATA."""
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def fit_under_strategy(model, strategy, sample) -> None:
    """Two workarounds for Keras 3 (3.15) fit and evaluate under tf.distribute, on this model instance:
    - Keras builds the model's metrics from the first batch after averaging it over the replicas with
      strategy.reduce, which fails when that batch splits unevenly (the shapes differ) and, across workers, for
      (x, y) pairs (it reduces one tensor at a time): `sample`, one local batch, builds them instead;
    - across workers it reduces each step's logs with strategy.reduce("MEAN", value, axis=0), which fails on
      scalars ("Invalid reduction dimension 0", tensorflow/tensorflow#72388): a batch axis of length one makes that
      the mean over replicas. (Epoch logs are read from the metrics, whose totals are summed over all replicas.)"""
    import keras
    import tensorflow as tf

    if not isinstance(strategy, (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy)):
        return
    build = model._maybe_symbolic_build
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: build(data_batch=sample)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and strategy.extended._in_multi_worker_mode():
        for name in ("train_step", "test_step"):
            def step(data, original=getattr(model, name)):
                return keras.tree.map_structure(lambda value: keras.ops.reshape(value, (1,)), original(data))
            setattr(model, name, step)


def worker_scratch(run_dir: Path, resume: bool, config: Config) -> Path:
    """A non-chief worker's run directory: a temporary folder that nobody reads, removed at exit. The worker trains
    in step with the chief and saves what the chief saves (it reads its best VQ-VAE back to encode the prior's
    codes). To resume it starts from a copy of the chief's committed files, so --out must be visible to every
    worker at the same path (a shared filesystem)."""
    import shutil
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="oasisvq-worker-"))
    (scratch / "checkpoints").mkdir()
    if not resume:
        (scratch / "config.json").write_text(config.to_json())
        return scratch
    names = ["config.json", "vqvae.keras", "pixelcnn.keras", "pixelcnn_top.keras", "checkpoints/state.json",
             "checkpoints/vqvae_last.keras", "checkpoints/prior_last.keras"]
    state_path = run_dir / "checkpoints" / "state.json"
    if state_path.exists():
        names += [f"checkpoints/{name}" for name in json.loads(state_path.read_text()).get("checkpoint", {}).values()]
    for name in names:
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, scratch / name)
    return scratch


class RunState:
    """`checkpoints/state.json`, the commit record of a run: the history rows of each phase's completed epochs, the
    checkpoint file that holds the last of them, and which epoch the best-model file holds.

    An epoch counts as done only once state.json names it. Its checkpoint (`checkpoints/<phase>_epochNNN.keras`,
    with optimizer state) is written before that and the best-model file after, so a kill at any moment leaves
    either the old epoch or the new one complete; `repair_best` finishes an interrupted best-model write on resume.
    """

    def __init__(self, run_dir: Path, writer: bool):
        self.run_dir = run_dir
        self.path = run_dir / "checkpoints" / "state.json"
        self.writer = writer
        self.data = {"history": {phase: [] for phase in PHASES}, "checkpoint": {}, "best_saved": {}}
        if self.path.exists():
            try:
                stored = json.loads(self.path.read_text())
                if not isinstance(stored.get("history"), dict):
                    raise ValueError("no history")
            except (ValueError, AttributeError):
                raise UserError(f"--resume: {self.path} is damaged; the run cannot be resumed, start a new "
                                f"--out") from None
            self.data.update(stored)
            for phase in PHASES:
                self.data["history"].setdefault(phase, [])
            self.data.setdefault("checkpoint", {})
            self.data.setdefault("best_saved", {})

    def epochs_done(self, phase: str) -> int:
        return len(self.data["history"][phase])

    def checkpoint_path(self, phase: str) -> Path:
        """The committed last-epoch checkpoint (`<phase>_last.keras` in runs made before epoch-named ones)."""
        name = self.data["checkpoint"].get(phase, f"{phase}_last.keras")
        return self.run_dir / "checkpoints" / name

    def best_epoch(self, phase: str, monitor: str, mode: str) -> int | None:
        rows = [row for row in self.data["history"][phase] if monitor in row]
        if not rows:
            return None
        pick = max if mode == "max" else min
        return pick(rows, key=lambda row: row[monitor])["epoch"]

    def save(self) -> None:
        from dataset import atomic_write_text

        if self.writer:
            atomic_write_text(self.path, json.dumps(self.data, indent=1))


def is_temporary(path: Path) -> bool:
    """A half-written file of an atomic write (dataset.atomic_write, modules.save_model, the curve plots)."""
    return path.name.startswith(".") and ".tmp" in path.name


def clean_stale_files(run_dir: Path, state: RunState) -> list[str]:
    """Deletes what a killed process left behind: temporary files, and epoch checkpoints state.json does not name.
    None of them is ever read: a resume trusts only files that state.json commits."""
    removed = []
    committed = {state.checkpoint_path(phase).name for phase in PHASES if state.epochs_done(phase)}
    for folder in (run_dir, run_dir / "checkpoints"):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            stale = is_temporary(path) or (
                folder.name == "checkpoints" and path.suffix == ".keras" and path.name not in committed)
            if stale and path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path.name)
    return removed


@contextmanager
def sigint_deferred():
    """Holds back Ctrl-C while an epoch is being committed, then raises it: an interrupt never splits an epoch's
    files. (Only the main thread can install signal handlers; elsewhere this does nothing.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous != signal.SIG_IGN:
                raise KeyboardInterrupt


def weights_are_finite(model) -> bool:
    import numpy as np

    return all(np.isfinite(weight).all() for weight in model.get_weights())


def epoch_checkpointer(phase, run_dir, state, writer, monitor, mode):
    """A callback that commits each finished epoch (see RunState), or stops training when it is not finite."""
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
            if self.diverged or not all(math.isfinite(value) for value in logs.values()) \
                    or not weights_are_finite(self.model):
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
            best_path = run_dir / f"{phase_file(phase)}.keras"
            with sigint_deferred():
                checkpoint = run_dir / "checkpoints" / f"{phase}_epoch{epoch + 1:03d}.keras"
                previous = state.checkpoint_path(phase)
                if writer:
                    save_model(self.model, checkpoint)
                history.append(row)
                state.data["checkpoint"][phase] = checkpoint.name
                state.save()  # the commit: from here on, this epoch is done
                if writer:
                    if improved or not best_path.exists():
                        save_model(weights_only_copy(self.model), best_path)
                        state.data["best_saved"][phase] = epoch + 1
                        state.save()
                    write_history(run_dir / f"history_{phase}.csv", history, atomic_write_text)
                    if previous != checkpoint:
                        previous.unlink(missing_ok=True)

        def on_batch_end(self, batch, logs=None):
            if logs and "loss" in logs and not math.isfinite(float(logs["loss"])):
                self.diverged = True
                self.model.stop_training = True

    return EpochCheckpoint()


def load_checkpoint(state: RunState, phase: str, custom_objects=None):
    """The committed last-epoch model of `phase` (with its optimizer); UserError when it is missing or damaged."""
    import keras

    path = state.checkpoint_path(phase)
    if not path.exists():
        raise UserError(f"--resume: {path} is missing, but {state.path.name} records "
                        f"{state.epochs_done(phase)} completed {phase} epoch(s); the run cannot be resumed, "
                        f"start a new --out")
    try:
        return keras.saving.load_model(path, safe_mode=True, custom_objects=custom_objects)
    except Exception as error:  # Keras raises many types for truncated or foreign files
        raise UserError(f"--resume: {path} cannot be loaded ({type(error).__name__}); the checkpoint is damaged, "
                        f"start a new --out") from None


def needs_repair(state: RunState, phase: str, monitor: str, mode: str) -> bool:
    """Whether a kill interrupted a best-model write: the committed last epoch is the best one, but the best-model
    file does not hold it yet."""
    best = state.best_epoch(phase, monitor, mode)
    return state.writer and best is not None and best == state.epochs_done(phase) and (
        state.data["best_saved"].get(phase) != best
        or not (state.run_dir / f"{phase_file(phase)}.keras").exists())


def repair_best(state: RunState, phase: str, model, monitor: str, mode: str) -> None:
    """Finishes an interrupted best-model write (see needs_repair) from the committed checkpoint `model`."""
    from modules import save_model, weights_only_copy

    if needs_repair(state, phase, monitor, mode):
        save_model(weights_only_copy(model), state.run_dir / f"{phase_file(phase)}.keras")
        state.data["best_saved"][phase] = state.epochs_done(phase)
        state.save()


def phase_file(phase: str) -> str:
    return {"vqvae": "vqvae", "prior_top": "pixelcnn_top", "prior": "pixelcnn"}[phase]


def write_history(path: Path, rows: list[dict], write_text) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = [",".join(columns)] + [",".join(str(row.get(key, "")) for key in columns) for row in rows]
    write_text(path, "\n".join(lines) + "\n")


def plot_history(run_dir: Path, state: RunState) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {"vqvae": [("loss", "loss"), ("ssim", "SSIM"), ("perplexity", "code perplexity")],
              "prior_top": [("bits_per_code", "top prior, bits per code")],
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


def check_run_dir(args, config: Config) -> Path:
    """The run directory, checked before TensorFlow starts: --resume needs a run made with the same
    hyperparameters; a new run needs a folder that holds no run and can be created."""
    if args.resume and args.out is None:
        raise UserError("--resume needs --out RUN_DIR, the run directory to continue")
    run_dir = args.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    config_path = run_dir / "config.json"
    if args.resume:
        if not config_path.exists():
            raise UserError(f"--resume: {config_path} does not exist; there is no run to resume in {run_dir}")
        try:
            saved = Config.from_dict(json.loads(config_path.read_text())).to_dict()
        except (ValueError, TypeError, AttributeError, OSError):
            raise UserError(f"--resume: {config_path} is not a valid config; the run directory is damaged") \
                from None
        if saved != config.to_dict():
            changed = sorted(key for key in set(saved) | set(config.to_dict())
                             if saved.get(key) != config.to_dict().get(key))
            raise UserError(f"--resume: the command line gives other hyperparameters than {config_path} "
                            f"({', '.join(changed)}); repeat the original flags or start a new --out")
        return run_dir
    if writes_run_dir(args) and config_path.exists():  # a later non-chief may find the chief's run on a shared disk
        raise UserError(f"--out {run_dir} already holds a run; use --resume to continue it or choose another --out")
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise UserError(f"--out {run_dir}: {existing} is a file, not a folder; choose another --out")
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {run_dir}: {existing} is not writable; choose a writable folder")
    return run_dir


def check_vqvae_source(source: Path, config: Config) -> None:
    """UserError unless `source` (--vqvae-from) is a run whose VQ-VAE phase finished with `config`'s VQ-VAE and data
    hyperparameters (everything but prior_* and temperature)."""
    for path in (source / "config.json", source / "vqvae.keras", source / "checkpoints" / "state.json"):
        if not path.is_file():
            raise UserError(f"--vqvae-from {source}: {path} is missing; give a run directory made by train.py whose "
                            f"VQ-VAE phase finished")
    try:
        saved = json.loads((source / "config.json").read_text())
        done = len(json.loads((source / "checkpoints" / "state.json").read_text())["history"]["vqvae"])
    except (ValueError, KeyError, TypeError, OSError):
        raise UserError(f"--vqvae-from {source}: its config.json or checkpoints/state.json cannot be read; the run "
                        f"directory is damaged") from None
    differ = vqvae_differences(saved, config.to_dict())
    if differ:
        raise UserError(f"--vqvae-from {source}: its VQ-VAE was trained with other hyperparameters "
                        f"({', '.join(differ)}); give the same --preset and --set values except prior_*")
    if done < config.epochs:
        raise UserError(f"--vqvae-from {source}: its VQ-VAE finished {done} of {config.epochs} epochs; finish it "
                        f"first with python train.py --resume --out {source}")


def adopt_vqvae(source: Path, run_dir: Path, state: "RunState", writer: bool, fingerprint: str, data) -> None:
    """Copies the finished VQ-VAE phase of `source` (best model, last checkpoint, history) into this run and commits
    it in state.json, so that training goes straight to the prior; UserError if `source` saw other data."""
    import shutil

    from dataset import atomic_write, atomic_write_text

    stored = json.loads((source / "checkpoints" / "state.json").read_text())
    if stored.get("data_fingerprint") != fingerprint:
        raise UserError(f"--vqvae-from {source}: its VQ-VAE was trained on other slices ({stored.get('data')}) "
                        f"than --data {data}; give the same --data")
    checkpoint = stored["checkpoint"]["vqvae"]
    if writer:
        for name in ("vqvae.keras", f"checkpoints/{checkpoint}"):
            with open(source / name, "rb") as original:
                atomic_write(run_dir / name, lambda out: shutil.copyfileobj(original, out))
    state.data["history"]["vqvae"] = stored["history"]["vqvae"]
    state.data["checkpoint"]["vqvae"] = checkpoint
    state.data["best_saved"]["vqvae"] = stored["best_saved"].get("vqvae")
    state.data["data_fingerprint"] = stored["data_fingerprint"]
    state.data["data"] = stored["data"]
    state.data["vqvae_from"] = str(source)
    state.save()
    if writer:
        write_history(run_dir / "history_vqvae.csv", state.data["history"]["vqvae"], atomic_write_text)


def create_run_dir(run_dir: Path, resume: bool, config: Config, writer: bool) -> None:
    from dataset import atomic_write_text

    if resume or not writer:
        return
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"--out {run_dir}: cannot create it ({error.strerror}); choose a writable folder") from None
    if not os.access(run_dir, os.W_OK):
        raise UserError(f"--out {run_dir}: not writable; choose a writable folder")
    atomic_write_text(run_dir / "config.json", config.to_json())


def resume_phase(state, phase, total_epochs, monitor, mode, strategy, custom_objects=None):
    """(model, finished) for a phase about to train: its last checkpoint (None before the first epoch), after
    rewriting a best model that a kill left behind; finished when all its epochs are already done."""
    done = state.epochs_done(phase)
    if done >= total_epochs and not needs_repair(state, phase, monitor, mode):
        return None, True
    model = None
    if done:
        with strategy.scope():
            model = load_checkpoint(state, phase, custom_objects=custom_objects)
        repair_best(state, phase, model, monitor, mode)
    return model, done >= total_epochs


def learning_rate(rate: float, schedule: str, floor: float, epochs: int, examples: int, batch_size: int):
    """`rate` itself ("constant"), or a cosine decay from it to floor * rate over all steps of all epochs."""
    import keras

    if schedule == "constant":
        return rate
    steps = math.ceil(examples / batch_size)
    return keras.optimizers.schedules.CosineDecay(rate, epochs * steps, alpha=floor)


def train_vqvae(config, strategy, train_images, validate_images, run_dir, state, writer, verbose, callbacks):
    import keras

    from dataset import make_tf_dataset
    from modules import VQVAE

    done = state.epochs_done("vqvae")
    monitor = "val_ssim" if len(validate_images) else "ssim"
    model, finished = resume_phase(state, "vqvae", config.epochs, monitor, "max", strategy)
    if finished:
        return None
    with strategy.scope():
        if not done:
            model = VQVAE(config.to_dict(), name="vqvae")
            model.build()
            rate = learning_rate(config.learning_rate, config.lr_schedule, config.lr_floor, config.epochs,
                                 len(train_images), config.batch_size)
            model.compile(optimizer=keras.optimizers.Adam(rate), jit_compile=False)
    fit_under_strategy(model, strategy, train_images[:1, ..., None])
    train = make_tf_dataset(train_images, config.batch_size, shuffle=True, seed=config.seed)
    train = shard_by_data(random_flips(train, config.seed) if config.flip_augment else train)
    validate = None
    if len(validate_images):
        validate = shard_by_data(make_tf_dataset(validate_images, config.batch_size, shuffle=False))
    checkpoint = epoch_checkpointer("vqvae", run_dir, state, writer, monitor, "max")
    model.fit(train, validation_data=validate, epochs=config.epochs, initial_epoch=done, verbose=verbose, shuffle=False,
              callbacks=[checkpoint, *callbacks])
    return checkpoint


def random_flips(batches, seed: int):
    """Each image of each (b, h, w, 1) batch left-right flipped with probability 1/2, seeded and drawn anew each
    epoch: the scans are atlas-registered and nearly symmetric, so a flipped slice is a plausible new one."""
    import tensorflow as tf

    def flip(images, draw):
        chosen = tf.random.stateless_uniform(tf.shape(images)[:1], seed=tf.stack([draw, 0])) < 0.5
        return tf.where(chosen[:, None, None, None], tf.reverse(images, axis=[2]), images)

    draws = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    return tf.data.Dataset.zip(batches, draws).map(flip)


def bits_metric(codes, logits):
    """Bits per code of each code grid in the batch: Keras averages them over grids, so batches split unevenly over
    replicas (or leaving one without grids) still give the mean over all grids."""
    import keras
    import numpy as np

    nll = keras.losses.sparse_categorical_crossentropy(codes, logits, from_logits=True)
    return keras.ops.mean(nll, axis=(1, 2)) / np.log(2.0)


bits_metric.__name__ = "bits_per_code"


def prior_dataset(config: Config, grid: str, codes: dict, levels, flipped: dict | None = None):
    """A tf.data pipeline of (prior_inputs, codes) batches for the prior of `grid`. With `flipped` (the codes of the
    left-right flipped slices) it is a training pipeline: shuffled, each grid drawn flipped or not at random, and
    a `prior_level_dropout` share shown with an unknown level (NaN); all seeded, and drawn anew each epoch."""
    import tensorflow as tf

    from modules import prior_inputs

    columns = prior_inputs(codes[grid], np.asarray(levels, np.float32), codes["top"] if grid == "bottom" and
                           "top" in codes else None)
    dataset = tf.data.Dataset.from_tensor_slices(columns)
    if flipped is not None:
        mirrored = prior_inputs(flipped[grid], None, flipped["top"] if "top" in columns else None)
        dataset = tf.data.Dataset.zip(dataset, tf.data.Dataset.from_tensor_slices(mirrored)).cache().shuffle(
            len(levels), seed=config.seed, reshuffle_each_iteration=True)
        draws = tf.data.Dataset.random(seed=config.seed, rerandomize_each_iteration=True)
        dataset = tf.data.Dataset.zip(dataset, draws).map(
            lambda pair, draw: augment(pair, draw, config.prior_flip, config.prior_level_dropout))
    return shard_by_data(dataset.map(lambda inputs: (inputs, inputs["codes"])).batch(config.prior_batch_size)
                         .prefetch(tf.data.AUTOTUNE))


def augment(pair, draw, flip: bool, level_dropout: float):
    """One training grid from (its inputs, its flipped slice's inputs) and a random int64 `draw`."""
    import tensorflow as tf

    inputs, mirrored = pair
    chosen = dict(inputs)
    if flip:
        use_mirror = tf.equal(draw % 2, 1)
        for key in mirrored:
            chosen[key] = tf.where(use_mirror, mirrored[key], inputs[key])
    hide = tf.cast((draw // 2) % 10000, tf.float32) < level_dropout * 10000
    chosen["levels"] = tf.where(hide, tf.constant(np.nan, tf.float32), inputs["levels"])
    return chosen


def train_prior(config, strategy, grid, train, validate, run_dir, state, writer, verbose, callbacks):
    """Trains the prior of code grid `grid` on `train` = {"codes", "flipped", "levels"} (codes by grid), validated
    on `validate` = {"codes", "levels"}; returns its epoch checkpointer, or None when it had already finished."""
    import keras

    from modules import build_prior

    phase = PRIOR_PHASES[grid]
    epochs = config.top_prior_epochs if grid == "top" else config.prior_epochs
    done = state.epochs_done(phase)
    has_validation = len(validate["levels"]) > 0
    monitor = "val_bits_per_code" if has_validation else "bits_per_code"
    model, finished = resume_phase(state, phase, epochs, monitor, "min", strategy,
                                   custom_objects={"bits_per_code": bits_metric})
    if finished:
        return None
    with strategy.scope():
        if not done:
            model = build_prior(config, grid)
            rate = learning_rate(config.prior_learning_rate, config.prior_lr_schedule, config.lr_floor,
                                 epochs, len(train["levels"]), config.prior_batch_size)
            model.compile(optimizer=keras.optimizers.Adam(rate),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          metrics=[bits_metric], jit_compile=False)
    training = prior_dataset(config, grid, train["codes"], train["levels"], train["flipped"])
    sample = next(iter(prior_dataset(config, grid, train["codes"], train["levels"])))
    fit_under_strategy(model, strategy, ({k: v[:1] for k, v in sample[0].items()}, sample[1][:1]))
    validation = prior_dataset(config, grid, validate["codes"], validate["levels"]) if has_validation else None
    checkpoint = epoch_checkpointer(phase, run_dir, state, writer, monitor, "min")
    model.fit(training, validation_data=validation, epochs=epochs, initial_epoch=done, verbose=verbose,
              shuffle=False, callbacks=[checkpoint, *callbacks])
    return checkpoint


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = resolve_config(args)
    run_dir = check_run_dir(args, config)  # bad flags fail fast, before TensorFlow starts
    if args.vqvae_from is not None:
        check_vqvae_source(args.vqvae_from, config)
    configure_tensorflow()
    import keras
    import tensorflow as tf

    strategy = make_strategy(args.strategy)  # before any other TensorFlow op (multi-worker needs that)
    writer = is_chief(strategy)
    create_run_dir(run_dir, args.resume, config, writer)
    # a non-chief worker writes all its files into a scratch folder that nobody reads (see worker_scratch)
    work_dir = run_dir if writer else worker_scratch(run_dir, args.resume, config)
    try:
        return train_run(args, config, work_dir, strategy, True)
    except KeyboardInterrupt:
        print(f"\ninterrupted: completed epochs are saved; continue with "
              f"python train.py --resume --out {run_dir} (and the same flags)", file=sys.stderr)
        return 130
    finally:
        if work_dir != run_dir:
            import shutil
            shutil.rmtree(work_dir, ignore_errors=True)


PHASE_NAMES = {"vqvae": "VQ-VAE", "prior_top": "top-grid PixelCNN prior", "prior": "PixelCNN prior"}


def phase_epochs(config: Config, phase: str) -> int:
    return {"vqvae": config.epochs, "prior_top": config.top_prior_epochs if config.top_grid else 0,
            "prior": config.prior_epochs}[phase]


def train_run(args, config: Config, run_dir: Path, strategy, writer: bool) -> int:
    """The recipe: load the data, train the VQ-VAE, encode the slices, train each grid's prior, summarize."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    verbose = args.verbose if args.verbose is not None else (1 if sys.stdout.isatty() else 2)
    state = open_state(run_dir, writer, args.resume)
    slices = load_training_data(args, config, state, run_dir, writer, progress=verbose == 1)
    train_set, validate_set = slices.select("train"), slices.select("validate")
    print(f"run {run_dir}: {len(train_set)} training slices ({len(set(train_set.subjects))} subjects), "
          f"{len(validate_set)} validation slices ({len(set(validate_set.subjects))} subjects), "
          f"preset {args.preset}, {strategy.num_replicas_in_sync} replica(s)", flush=True)
    callbacks = [keras.callbacks.TensorBoard(run_dir / "logs")] if args.tensorboard and writer else []
    wall_start = time.time()

    announce_phase(config, state, "vqvae")
    checkpoint = train_vqvae(config, strategy, train_set.images, validate_set.images, run_dir, state, writer,
                             verbose, callbacks)
    if not finish_phase(config, run_dir, state, writer, checkpoint, "vqvae", "learning_rate"):
        return 1
    train, validate = encode_for_priors(run_dir, config, train_set, validate_set)
    for grid in config.code_grids:
        phase = PRIOR_PHASES[grid]
        announce_phase(config, state, phase)
        checkpoint = train_prior(config, strategy, grid, train, validate, run_dir, state, writer, verbose, callbacks)
        if not finish_phase(config, run_dir, state, writer, checkpoint, phase, "prior_learning_rate"):
            return 1
    summary = summarize(args, config, slices, state, strategy, time.time() - wall_start)
    if writer:
        from dataset import atomic_write_text

        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    bits = ", ".join(f"{grid} {summary['priors'][grid].get('val_bits_per_code', float('nan')):.3f}"
                     for grid in config.code_grids)
    print(f"done: validation SSIM {summary['vqvae'].get('val_ssim', float('nan')):.4f}, prior validation "
          f"bits/code {bits}; wrote {run_dir}\nnext: python predict.py --run {run_dir} --data {args.data}")
    return 0


def open_state(run_dir: Path, writer: bool, resume: bool) -> RunState:
    """The run's state.json; on --resume, first deletes what a killed process left half-written."""
    from dataset import atomic_write_text

    state = RunState(run_dir, writer)
    if writer and resume:
        removed = clean_stale_files(run_dir, state)
        if removed:
            print(f"resume: removed {len(removed)} file(s) an interrupted process left unfinished: "
                  f"{', '.join(sorted(removed))}", flush=True)
        for phase in PHASES:  # a kill can fall between an epoch's commit and its CSV
            if state.epochs_done(phase):
                write_history(run_dir / f"history_{phase}.csv", state.data["history"][phase], atomic_write_text)
    return state


def load_training_data(args, config: Config, state: RunState, run_dir: Path, writer: bool, progress: bool):
    """The slices of --data, checked against what the run recorded (a resumed run must see the same slices)."""
    from dataset import load_slices

    slices = load_slices(args.data, config, args.cache, args.oasis_url, args.discs, args.delete_archives,
                         args.strict, progress=progress)
    if args.vqvae_from is not None and not state.epochs_done("vqvae"):
        adopt_vqvae(args.vqvae_from, run_dir, state, writer, slices.fingerprint(), args.data)
    recorded = state.data.get("data_fingerprint")
    if recorded is None:
        state.data["data_fingerprint"] = slices.fingerprint()
        state.data["data"] = str(args.data)
        state.save()
    elif recorded != slices.fingerprint():
        raise UserError(f"--resume: --data {args.data} gives other slices than the run was trained on "
                        f"({state.data.get('data', 'unknown')}); resume with the same --data or start a new --out")
    if not len(slices.select("train")):
        raise UserError(f"--data {args.data}: the train split is empty; it needs at least one subject")
    return slices


def announce_phase(config: Config, state: RunState, phase: str) -> None:
    """One line before a phase: its name, its epochs, and what is already done."""
    total, done = phase_epochs(config, phase), state.epochs_done(phase)
    if done >= total:
        print(f"{PHASE_NAMES[phase]}: all {total} epochs already done", flush=True)
        return
    resumed = f", resuming after epoch {done}" if done else ""
    print(f"{PHASE_NAMES[phase]}: {total} epochs{resumed} (the first step of a phase traces the model and is "
          f"slow)", flush=True)


def finish_phase(config, run_dir, state, writer, checkpoint, phase, rate_key) -> bool:
    """Plots the curves; False with one error line when the phase diverged (its last good epoch stays saved)."""
    if writer:
        plot_history(run_dir, state)
    if checkpoint is None or not checkpoint.diverged:
        return True
    done = state.epochs_done(phase)
    kept = (f"epochs 1-{done} are saved ({run_dir / phase_file(phase)}.keras is the best of them)" if done
            else "no epoch of it completed, so none was saved")
    rate = getattr(config, rate_key)
    print(f"error: the {PHASE_NAMES[phase]} loss or weights became NaN or infinite in epoch {done + 1}, so "
          f"training stopped; {kept}. Train again in a new --out with a lower learning rate, "
          f"e.g. --set {rate_key}={rate / 10:g}", file=sys.stderr)
    return False


def encode_for_priors(run_dir: Path, config: Config, train_set, validate_set) -> tuple[dict, dict]:
    """The priors' data from the best VQ-VAE: codes by grid of the training slices, of their left-right flips
    (when `prior_flip`), and of the validation slices, with each slice's level."""
    import keras

    from modules import encode_all

    vqvae = keras.saving.load_model(run_dir / "vqvae.keras", safe_mode=True)
    train = {"codes": encode_all(vqvae, train_set.images), "levels": train_set.levels,
             "flipped": encode_all(vqvae, train_set.images[:, :, ::-1]) if config.prior_flip else None}
    if train["flipped"] is None:
        train["flipped"] = train["codes"]
    return train, {"codes": encode_all(vqvae, validate_set.images), "levels": validate_set.levels}


def summarize(args, config: Config, slices, state: RunState, strategy, session_seconds: float) -> dict:
    """summary.json: the data, the best epoch of each phase with its figures, wall times and the machine."""
    import keras
    import tensorflow as tf

    history = state.data["history"]
    best_vq = max(history["vqvae"], key=lambda row: row.get("val_ssim", row.get("ssim", 0)))
    priors = {}
    for grid in config.code_grids:
        rows = history[PRIOR_PHASES[grid]]
        best = min(rows, key=lambda row: row.get("val_bits_per_code", row.get("bits_per_code", 99)))
        priors[grid] = {"epochs": len(rows), "best_epoch": best["epoch"],
                        **{key: best[key] for key in best if "bits" in key}}
    return {
        "preset": args.preset, "seed": config.seed, "data": str(args.data), "data_fingerprint": slices.fingerprint(),
        "vqvae_from": state.data.get("vqvae_from"),
        "slices": {split: len(slices.select(split)) for split in ("train", "validate", "test")},
        "subjects": {split: sorted(set(slices.select(split).subjects)) for split in ("train", "validate", "test")},
        "vqvae": {"epochs": len(history["vqvae"]), "best_epoch": best_vq["epoch"],
                  **{key: best_vq[key] for key in best_vq if key.startswith(("val_", "ssim", "loss"))}},
        "priors": priors,
        "wall_seconds": {phase: round(sum(row["seconds"] for row in history[phase]), 1) for phase in PHASES},
        "this_session_seconds": round(session_seconds, 1),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "tensorflow": tf.__version__, "keras": keras.__version__,
                    "replicas": strategy.num_replicas_in_sync},
    }


if __name__ == "__main__":
    run_main(main)
