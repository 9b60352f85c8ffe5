"""Trains the VQ-VAE on the training split, then the PixelCNN prior of each code grid that has one (the default's:
the top grid's) on the codes of that split, then the refiner that draws the cortex into the decoded samples (runs
with refiner_epochs).

    python train.py                                         # default preset on the official OASIS-1 download
    python train.py --data ../shared/data/oasis1-mni-volumes --out runs/mni
    python train.py --resume --out runs/mni                 # continue an interrupted run
    python train.py --data ... --vqvae-from runs/mni --out runs/mni-prior2   # a new prior on a trained VQ-VAE

Read `main` and `train_run` top to bottom: check every input, load the data, create the run directory, train the
VQ-VAE, encode the slices, train the priors, train the refiner, summarize. What the run directory holds, and how
each file is written, is rundir.py's business; checkpoints/ keeps the last completed epoch of each phase (with
optimizer state) so that --resume never redoes a finished epoch.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import numpy as np

from cli import (ArgumentParser, UserError, add_config_args, add_data_args, add_progress_arg, check_output_path,
                 config_from_args, configure_tensorflow, resolved_precision, run_main)
from hyperparameters import (BOTTOM_PRIOR_KEYS, TOP_PRIOR_KEYS, Config, bottom_prior_differences,
                             top_prior_differences, vqvae_differences)
from rundir import PHASE_GRIDS, PHASES, PRIOR_PHASES, RunDir, RunState, is_chief, level_counts

PROCESS_START = time.time()
PHASE_NAMES = {"vqvae": "VQ-VAE", "prior_top": "top-grid PixelCNN prior", "prior": "PixelCNN prior",
               "refiner": "refiner"}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="train.py", description="Train the VQ-VAE on the train split (validated on the "
                            "validate split), then the PixelCNN prior over its codes.")
    add_data_args(parser, default_data="oasis", default_split=None)
    add_config_args(parser, seed_help="seed for everything random: initial weights, shuffling, flips, codebook "
                                      "restarts, dropout (default: the preset's)")
    parser.add_argument("--out", type=Path, default=None,
                        help="run directory to write (default: runs/<timestamp>)")
    parser.add_argument("--epochs", type=int, help="VQ-VAE epochs (default: the preset's)")
    parser.add_argument("--prior-epochs", type=int,
                        help="PixelCNN epochs, of each prior the preset trains (default: the preset's: 48 for the "
                             "default's top prior; a bottom prior, off in the default, is turned on with --set "
                             "prior_epochs=N)")
    parser.add_argument("--refiner-epochs", type=int,
                        help="refiner epochs, trained last on the VQ-VAE and the top prior; 0 for none (default: the "
                             "preset's: 27 for default, 0 for seed)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted run in --out from its last completed epoch")
    parser.add_argument("--vqvae-from", type=Path, default=None, metavar="RUN_DIR",
                        help="reuse the finished VQ-VAE of RUN_DIR (a train.py run, or a copy without checkpoints/ such "
                             "as pretrained/) and train only new PixelCNN priors and refiner; RUN_DIR must have the "
                             "same hyperparameters except prior_*, refiner_*, temperature, top_p and --seed (which "
                             "draws only the new models' randomness), and the same --data")
    parser.add_argument("--keep-top-prior", action="store_true",
                        help="with --vqvae-from: also reuse RUN_DIR's finished top prior and train only a new bottom "
                             "prior (to compare bottom priors under one top prior); RUN_DIR's hyperparameters must "
                             "then differ only in the bottom prior's fields (hyperparameters.BOTTOM_PRIOR_KEYS) and "
                             "--seed")
    parser.add_argument("--keep-bottom-prior", action="store_true",
                        help="with --vqvae-from: also reuse RUN_DIR's finished bottom prior and train only a new top "
                             "prior (to compare top priors under one bottom prior, which trains on real top codes and "
                             "so does not depend on the top prior); RUN_DIR's hyperparameters must then differ only "
                             "in the top prior's fields (hyperparameters.TOP_PRIOR_KEYS) and --seed. With "
                             "--keep-top-prior too: reuse both priors and train only a refiner (refiner_epochs above 0)")
    parser.add_argument("--strategy", default="auto", choices=["auto", "one", "mirrored", "multiworker"],
                        help="tf.distribute strategy: auto (mirrored when several GPUs are visible), one device, "
                             "mirrored (all local GPUs), multiworker (machines listed in TF_CONFIG)")
    parser.add_argument("--tensorboard", action="store_true", help="also write TensorBoard logs to RUN_DIR/logs")
    add_progress_arg(parser)
    parser.add_argument("--verbose", type=int, choices=[0, 1, 2], default=None,
                        help="Keras output, the older spelling: 0 silent, 1 progress bars, 2 one line per epoch "
                             "(= --no-progress) (default: 1 on a terminal, else 2)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Every input is checked (flags, run directory, data) before anything is created or TensorFlow starts."""
    args = build_parser().parse_args(argv)
    config = resolve_config(args)
    chief = is_chief(tf_config() if args.strategy == "multiworker" else None)
    run = check_run_dir(args, config, chief)
    kept = kept_phases(args, config)
    source = check_vqvae_source(args.vqvae_from, config, kept) if args.vqvae_from is not None else None
    verbose = keras_verbosity(args)
    slices = load_training_data(args, config, run, source, progress=verbose == 1)
    configure_tensorflow(onednn=args.strategy in ("auto", "one"))  # several replicas need oneDNN off
    strategy = make_strategy(args.strategy)  # before any other TensorFlow op (multi-worker needs that)
    # a non-chief worker writes all its files into a scratch folder that nobody reads (RunDir.worker_scratch)
    work = run if chief else run.worker_scratch(config, args.resume)
    code = 1
    try:
        state = open_run_dir(args, config, work, source, slices, create=chief and not args.resume)
        code = train_run(args, config, work, state, slices, strategy, verbose)
        return code
    except KeyboardInterrupt:
        code = 130
        return 130
    finally:
        clean_up(run, work, code)


def clean_up(run: RunDir, work: RunDir, code: int) -> None:
    """After training: a worker's scratch folder goes; a run folder this process made goes too when it failed
    before any epoch finished (nothing in it is worth keeping, and it would only be in the way of a retry)."""
    if work is not run:
        shutil.rmtree(work.path, ignore_errors=True)
    removed = code != 0 and run.remove_if_unfinished()
    if code == 130:
        print("\ninterrupted: " + (f"no epoch had finished, so {run} was removed" if removed else
                                    f"completed epochs are saved; continue with python train.py --resume --out "
                                    f"{run} (and the same flags)"), file=sys.stderr)


def resolve_config(args) -> Config:
    """The Config of --preset, --set and the flags that set hyperparameters; UserError naming the flag at fault."""
    for flag, value in (("--epochs", args.epochs), ("--prior-epochs", args.prior_epochs)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if args.refiner_epochs is not None and args.refiner_epochs < 0:
        raise UserError(f"--refiner-epochs must be 0 (no refiner) or more, got {args.refiner_epochs}")
    # --prior-epochs sets each prior the config trains: not a bottom prior that it leaves out (prior_epochs=0)
    prior_keys = ["top_prior_epochs"] + ["prior_epochs"] * ("bottom" in config_from_args(args).prior_grids)
    flags = ((args.epochs, ["epochs"]), (args.prior_epochs, prior_keys),
             (args.refiner_epochs, ["refiner_epochs"]), (args.seed, ["seed"]))
    config = config_from_args(args, [f"{key}={value}" for value, keys in flags if value is not None for key in keys])
    for key in ("epochs", "top_prior_epochs", "batch_size", "prior_batch_size", "refiner_batch_size"):
        if getattr(config, key) < 1:
            raise UserError(f"--set {key}={getattr(config, key)}: {key} must be at least 1")
    if not all(map(math.isfinite, (config.learning_rate, config.prior_learning_rate, config.refiner_learning_rate))):
        raise UserError("--set: learning_rate, prior_learning_rate and refiner_learning_rate must be finite numbers")
    return config


def keras_verbosity(args) -> int:
    """Keras' `verbose`: --verbose as given; else 2 (one line per epoch) with --no-progress or when the output is
    not a terminal, 1 (progress bars) on a terminal."""
    if args.verbose is not None:
        return args.verbose
    return 2 if args.no_progress or not sys.stdout.isatty() else 1


@contextmanager
def about(flag: str, advice: str = ""):
    """Prefixes a UserError raised inside with the flag it concerns (and appends `advice`)."""
    try:
        yield
    except UserError as error:
        raise UserError(f"{flag}: {error}" + (f"; {advice}" if advice else "")) from None


# ---------------------------------------------------------------------------------------------------------------
# Checking the inputs: nothing is created before all of them pass
# ---------------------------------------------------------------------------------------------------------------

def check_run_dir(args, config: Config, chief: bool) -> RunDir:
    """The run directory: --resume needs a run made with the same hyperparameters; a new run needs a folder that
    can be made and holds no finished epoch (a run that failed before its first epoch never blocks a retry)."""
    if args.resume and args.out is None:
        raise UserError("--resume needs --out RUN_DIR, the run directory to continue")
    run = RunDir(args.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    if args.resume:
        if not run.config_path.exists():
            raise UserError(f"--resume: {run.config_path} does not exist; there is no run to resume in {run}")
        with about("--resume", "the run cannot be resumed, start a new --out"):
            saved = run.read_config().to_dict()
            RunState(run)
        given = config.to_dict()
        changed = sorted(key for key in set(saved) | set(given) if saved.get(key) != given.get(key))
        if changed:
            raise UserError(f"--resume: the command line gives other hyperparameters than {run.config_path} "
                            f"({', '.join(changed)}); repeat the original flags or start a new --out")
        return run
    if chief and run.holds_finished_epoch():  # a non-chief may find the chief's run on a shared disk
        raise UserError(f"--out {run} already holds a run; use --resume to continue it or choose another --out")
    check_output_path(run.path, "--out", folder=True)
    return run


KEEP_FLAGS = {"prior_top": "--keep-top-prior", "prior": "--keep-bottom-prior"}


def kept_phases(args, config: Config) -> tuple[str, ...]:
    """The phases --vqvae-from copies from its run: the VQ-VAE, and the prior of --keep-top-prior or
    --keep-bottom-prior, or both (to train only a refiner); UserError for a keep flag without --vqvae-from, or both
    without refiner epochs."""
    kept = tuple(phase for phase, wanted in (("prior_top", args.keep_top_prior), ("prior", args.keep_bottom_prior))
                 if wanted)
    if len(kept) == 2 and not config.refiner_epochs:
        raise UserError("--keep-top-prior and --keep-bottom-prior together leave only a refiner to train, and this "
                        "config has refiner_epochs=0; give one of them, or --refiner-epochs N")
    if kept and args.vqvae_from is None:
        raise UserError(f"{KEEP_FLAGS[kept[0]]} needs --vqvae-from RUN_DIR, the run whose prior to keep")
    return ("vqvae", *kept)


def check_vqvae_source(path: Path, config: Config, kept: tuple[str, ...] = ("vqvae",)) -> RunState:
    """The state of the run `path` (--vqvae-from); UserError unless its VQ-VAE phase finished with `config`'s VQ-VAE
    and data hyperparameters (everything but prior_*, top_prior_* and sampling's), and unless each prior phase in
    `kept` finished too, with all of `config` but the other prior's fields and sampling's."""
    source = RunDir(path)
    # a run made by train.py has its state.json; a finished run copied without checkpoints/ (pretrained/) has
    # its summary.json instead
    record = source.state_path if source.state_path.is_file() or not source.summary_path.is_file() \
        else source.summary_path
    for required in (source.config_path, source.model_path("vqvae"), record):
        if not required.is_file():
            raise UserError(f"--vqvae-from {source}: {required} is missing; give a run directory made by train.py "
                            f"whose VQ-VAE phase finished")
    with about(f"--vqvae-from {source}"):
        saved = source.read_config()
        state = RunState(source) if record == source.state_path else RunState.of_shipped_run(source)
    differ = vqvae_differences(saved.to_dict(), config.to_dict())
    if differ:
        raise UserError(f"--vqvae-from {source}: its VQ-VAE was trained with other hyperparameters "
                        f"({', '.join(differ)}); give the same --preset and --set values except prior_* and refiner_* "
                        f"(--seed may differ)")
    if state.epochs_done("vqvae") < config.epochs:
        raise UserError(f"--vqvae-from {source}: its VQ-VAE finished {state.epochs_done('vqvae')} of {config.epochs} "
                        f"epochs; finish it first with python train.py --resume --out {source}")
    for phase in kept[1:]:
        check_kept_prior(source, saved, state, config, phase)
    return state


def check_kept_prior(source: RunDir, saved: Config, state: RunState, config: Config, phase: str) -> None:
    """UserError unless the run `source` holds a finished prior `phase` ("prior_top" for --keep-top-prior, "prior"
    for --keep-bottom-prior) that `config` would train."""
    flag, grid = KEEP_FLAGS[phase], PHASE_GRIDS[phase]
    if config.top_grid is None:
        raise UserError(f"{flag}: this preset has a single code grid and a single prior, so there is no {grid} "
                        f"prior to keep beside another")
    if grid not in config.prior_grids:
        raise UserError(f"{flag}: this config trains no {grid} prior (prior_epochs=0); add --set prior_epochs=N "
                        f"as {source}'s config has it")
    differences, free = {"prior_top": (top_prior_differences, BOTTOM_PRIOR_KEYS),
                         "prior": (bottom_prior_differences, TOP_PRIOR_KEYS)}[phase]
    differ = differences(saved.to_dict(), config.to_dict())
    if differ:
        raise UserError(f"{flag}: the {grid} prior of {source} was trained with other hyperparameters "
                        f"({', '.join(differ)}); with it, --set may change only {', '.join(free)}")
    done, epochs = state.epochs_done(phase), phase_epochs(config, phase)
    if done < epochs or not source.model_path(phase).is_file():
        raise UserError(f"{flag}: the {grid} prior of {source} finished {done} of {epochs} epochs; finish it first "
                        f"with python train.py --resume --out {source}")


def load_training_data(args, config: Config, run: RunDir, source: RunState | None, progress: bool):
    """The slices of --data, checked against what the run (on --resume) or --vqvae-from's run was trained on."""
    from dataset import load_slices

    print(f"data: --data {args.data}, its train split to train on and its validate split to validate on; run "
          f"directory {run}", flush=True)
    slices = load_slices(args.data, config, args.cache, args.oasis_url, args.discs, args.delete_archives,
                         args.strict, progress=progress)
    fingerprint = slices.fingerprint()
    if source is not None and source.data.get("data_fingerprint") != fingerprint:
        raise UserError(f"--vqvae-from {source.run}: its VQ-VAE was trained on other slices "
                        f"({source.data.get('data')}) than --data {args.data}; give the same --data")
    recorded = RunState(run).data if args.resume else {}
    if recorded.get("data_fingerprint") not in (None, fingerprint):
        raise UserError(f"--resume: --data {args.data} gives other slices than the run was trained on "
                        f"({recorded.get('data', 'unknown')}); resume with the same --data or start a new --out")
    if not len(slices.select("train")):
        raise UserError(f"--data {args.data}: the train split is empty; it needs at least one subject")
    return slices


def open_run_dir(args, config: Config, run: RunDir, source: RunState | None, slices, create: bool) -> RunState:
    """The run's state: a new run directory made (`create`), or on --resume the files a killed process left
    half-written removed; then --vqvae-from's VQ-VAE adopted and the data recorded, where not done yet."""
    if create:
        run.create(config)
    state = RunState(run, fresh=not args.resume)
    if args.resume:
        removed = state.remove_stale_files()
        if removed:
            print(f"resume: removed {len(removed)} file(s) an interrupted process left unfinished: "
                  f"{', '.join(sorted(removed))}", flush=True)
        state.rewrite_histories()
    if source is not None and not state.epochs_done("vqvae"):
        state.adopt_phases(source, kept_phases(args, config))
    if state.data.get("data_fingerprint") is None:
        state.record_data(slices.fingerprint(), str(args.data))
    return state


# ---------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------

def train_run(args, config: Config, run: RunDir, state: RunState, slices, strategy, verbose: int) -> int:
    """Trains the VQ-VAE, encodes the slices, trains each grid's prior, then the refiner (refiner_epochs), writes the
    summary; 1 when a phase's loss turned NaN or infinite."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    train_set, validate_set = slices.select("train"), slices.select("validate")
    print(f"run {run}: {len(train_set)} training slices ({len(set(train_set.subjects))} subjects), "
          f"{len(validate_set)} validation slices ({len(set(validate_set.subjects))} subjects), "
          f"preset {args.preset}, {strategy.num_replicas_in_sync} replica(s)", flush=True)
    fit = {"strategy": strategy, "state": state, "verbose": verbose,
           "callbacks": [keras.callbacks.TensorBoard(run.logs)] if args.tensorboard else []}
    wall_start = time.time()

    precisions = {"vqvae": resolved_precision(config.vqvae_precision),
                  "priors": resolved_precision(config.prior_precision)}
    announce_phase(config, state, "vqvae", precisions["vqvae"])
    if not finished_finitely(config, state, "vqvae", train_vqvae(config, train_set.images, validate_set.images,
                                                                   precision=precisions["vqvae"], **fit)):
        return 1
    pending = [grid for grid in config.prior_grids
               if state.epochs_done(PRIOR_PHASES[grid]) < phase_epochs(config, PRIOR_PHASES[grid])]
    train, validate = encode_for_priors(run, config, train_set, validate_set, pending)
    for grid in config.prior_grids:
        announce_phase(config, state, PRIOR_PHASES[grid], precisions["priors"])
        if not finished_finitely(config, state, PRIOR_PHASES[grid], train_prior(
                config, grid, train, validate, precision=precisions["priors"], **fit)):
            return 1
    if config.refiner_epochs:
        announce_phase(config, state, "refiner", precisions["priors"])
        if not finished_finitely(config, state, "refiner", train_refiner(config, train_set, validate_set,
                                                                          precision=precisions["priors"], **fit)):
            return 1

    summary = summarize(args, config, slices, state, strategy, time.time() - wall_start, precisions)
    run.write_summary(summary)
    bits = ", ".join(f"{grid} {summary['priors'][grid].get('val_bits_per_code', float('nan')):.3f}"
                     for grid in config.prior_grids)
    print(f"done: validation SSIM {summary['vqvae'].get('val_ssim', float('nan')):.4f}, prior validation "
          f"bits/code {bits}; wrote {run}\nnext: python predict.py --run {run} --data {args.data}")
    return 0


def phase_epochs(config: Config, phase: str) -> int:
    """The epochs of a phase: the VQ-VAE's, the refiner's, or the prior's of its code grid (0 for a grid the run does
    not have)."""
    if phase == "vqvae":
        return config.epochs
    if phase == "refiner":
        return config.refiner_epochs
    grid = PHASE_GRIDS[phase]
    return config.prior_field("prior_epochs", grid) if grid in config.prior_grids else 0


def phase_monitor(phase: str, validated: bool) -> tuple[str, str]:
    """(the metric that picks a phase's best epoch, "max" or "min"): SSIM for the VQ-VAE, bits per code for a
    prior, on the validation split when there is one; the epoch number for the refiner, whose losses say nothing of
    how real its slices look (an adversarial game's losses stay level while it improves), so it keeps the last."""
    if phase == "refiner":
        return "epoch", "max"
    metric, mode = ("ssim", "max") if phase == "vqvae" else ("bits_per_code", "min")
    return ("val_" + metric if validated else metric), mode


def announce_phase(config: Config, state: RunState, phase: str, precision: str = "float32") -> None:
    """One line before a phase: its name, its epochs, what is already done, and its precision (with why, when
    "auto" chose float32: such a machine trains several times longer than one with bfloat16 units)."""
    total, done = phase_epochs(config, phase), state.epochs_done(phase)
    setting = config.vqvae_precision if phase == "vqvae" else config.prior_precision
    said = (f" in {precision} mixed precision" if precision != "float32" else
            " in float32, as bfloat16 would be emulated here and slower" if setting == "auto" else "")
    if done >= total:
        print(f"{PHASE_NAMES[phase]}: all {total} epochs already done", flush=True)
    elif done:
        print(f"resume: {done} of {total} {PHASE_NAMES[phase]} epochs done, continuing with epoch {done + 1}{said} "
              f"(its first step traces the model and is slow)", flush=True)
    else:
        print(f"{PHASE_NAMES[phase]}: {total} epochs{said} (the first step of a phase traces the model and is "
              f"slow)", flush=True)


def finished_finitely(config: Config, state: RunState, phase: str, checkpoint) -> bool:
    """Plots the curves; False with one error line when the phase diverged (its last good epoch stays saved)."""
    plot_history(state)
    if checkpoint is None or not checkpoint.diverged:
        return True
    done = state.epochs_done(phase)
    rate_key = {"vqvae": "learning_rate", "refiner": "refiner_learning_rate"}.get(phase, "prior_learning_rate")
    kept = (f"epochs 1-{done} are saved ({state.run.model_path(phase)} is the best of them); train again in a new "
            f"--out" if done else "no epoch of it completed, so none was saved; train again")
    print(f"error: the {PHASE_NAMES[phase]} loss or weights became NaN or infinite in epoch {done + 1}, so "
          f"training stopped; {kept} with a lower learning rate, e.g. --set {rate_key}="
          f"{getattr(config, rate_key) / 10:g}", file=sys.stderr)
    return False


# ---------------------------------------------------------------------------------------------------------------
# tf.distribute
# ---------------------------------------------------------------------------------------------------------------

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


def make_strategy(name: str):
    import tensorflow as tf

    if name == "multiworker":
        tf_config()
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored" or (name == "auto" and len(tf.config.list_logical_devices("GPU")) > 1):
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


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



# ---------------------------------------------------------------------------------------------------------------
# Training a phase
# ---------------------------------------------------------------------------------------------------------------

def weights_are_finite(model) -> bool:
    return all(np.isfinite(weight).all() for weight in model.get_weights())


def epoch_checkpointer(phase: str, state: RunState, monitor: str, mode: str):
    """A callback that commits each finished epoch (RunState.commit_epoch), or stops training when it is not
    finite."""
    import keras

    class EpochCheckpoint(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.diverged = False
            self.epoch_start = time.perf_counter()

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch_start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs = {key: float(value) for key, value in (logs or {}).items()}
            if self.diverged or not all(map(math.isfinite, logs.values())) or not weights_are_finite(self.model):
                self.diverged = self.model.stop_training = True
                return
            # elapsed: wall time since this process started (data loading and tracing included), for time-to-quality
            row = {"epoch": epoch + 1, **logs, "seconds": round(time.perf_counter() - self.epoch_start, 2),
                   "elapsed": round(time.time() - PROCESS_START, 2)}
            best = state.best_row(phase, monitor, mode)
            improved = monitor in row and (best is None or (row[monitor] > best[monitor] if mode == "max"
                                                            else row[monitor] < best[monitor]))
            with sigint_deferred():
                state.commit_epoch(phase, row, self.model, improved)

        def on_batch_end(self, batch, logs=None):
            loss = (logs or {}).get("loss", (logs or {}).get("refiner_loss"))
            if loss is not None and not math.isfinite(float(loss)):
                self.diverged = self.model.stop_training = True

    return EpochCheckpoint()


def resume_phase(state: RunState, phase: str, total_epochs: int, monitor: str, mode: str, strategy,
                 custom_objects=None):
    """(model, finished) for a phase about to train: its last checkpoint (None before the first epoch), after
    rewriting a best model that a kill left behind; finished when all its epochs are already done."""
    done = state.epochs_done(phase)
    if done >= total_epochs and not state.needs_repair(phase, monitor, mode):
        return None, True
    model = None
    if done:
        with strategy.scope(), about("--resume", "the run cannot be resumed, start a new --out"):
            model = state.load_checkpoint(phase, custom_objects=custom_objects)
        if state.needs_repair(phase, monitor, mode):
            state.save_best(phase, model, done)
    return model, done >= total_epochs


def learning_rate(rate: float, schedule: str, floor: float, epochs: int, examples: int, batch_size: int):
    """`rate` itself ("constant"), or a cosine decay from it to floor * rate over all steps of all epochs."""
    import keras

    if schedule == "constant":
        return rate
    steps = math.ceil(examples / batch_size)
    return keras.optimizers.schedules.CosineDecay(rate, epochs * steps, alpha=floor)


def train_vqvae(config, train_images, validate_images, precision, strategy, state, verbose, callbacks):
    """Trains (or resumes) the VQ-VAE, computing in `precision`; returns its epoch checkpointer, or None when it had
    already finished."""
    import keras

    from dataset import make_tf_dataset, with_pipeline_options
    from modules import VQVAE, compute_precision

    done = state.epochs_done("vqvae")
    monitor, mode = phase_monitor("vqvae", len(validate_images) > 0)
    with compute_precision(precision):
        model, finished = resume_phase(state, "vqvae", config.epochs, monitor, mode, strategy)
    if finished:
        return None
    with strategy.scope(), compute_precision(precision):
        if not done:
            # the model itself float32 (its layers compute in `precision`), as build_prior's priors
            model = VQVAE(config.to_dict(), name="vqvae", dtype="float32")
            model.build()
            rate = learning_rate(config.learning_rate, config.lr_schedule, config.lr_floor, config.epochs,
                                 len(train_images), config.batch_size)
            model.compile(optimizer=keras.optimizers.Adam(rate), jit_compile=False)
    fit_under_strategy(model, strategy, train_images[:1, ..., None])
    train = make_tf_dataset(train_images, config.batch_size, shuffle=True, seed=config.seed)
    train = with_pipeline_options(random_flips(train, config.seed) if config.flip_augment else train)
    validate = None
    if len(validate_images):
        validate = with_pipeline_options(make_tf_dataset(validate_images, config.batch_size, shuffle=False))
    checkpoint = epoch_checkpointer("vqvae", state, monitor, mode)
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


def train_prior(config, grid, train, validate, precision, strategy, state, verbose, callbacks):
    """Trains the prior of code grid `grid` on `train` = {"codes", "levels", "flipped", "deformed"} (codes by grid,
    from encode_for_priors), validated on `validate` = {"codes", "levels"}, computing in `precision`; returns its
    epoch checkpointer, or None when it had already finished."""
    from dataset import prior_dataset
    from modules import bits_metric, build_prior, compile_prior, compute_precision

    phase = PRIOR_PHASES[grid]
    epochs = config.prior_field("prior_epochs", grid)
    done = state.epochs_done(phase)
    has_validation = len(validate["levels"]) > 0
    monitor, mode = phase_monitor(phase, has_validation)
    with compute_precision(precision):
        model, finished = resume_phase(state, phase, epochs, monitor, mode, strategy,
                                       custom_objects={"bits_per_code": bits_metric})
    if finished:
        return None
    with strategy.scope(), compute_precision(precision):
        if not done:
            rate = learning_rate(config.prior_learning_rate, config.prior_lr_schedule, config.lr_floor,
                                 epochs, len(train["levels"]), config.prior_batch_size)
            model = compile_prior(build_prior(config, grid), rate)
    variants = train["flipped"] + train["deformed"][:config.prior_field("prior_deformed_copies", grid)]
    training = prior_dataset(config, grid, train["codes"], train["levels"], variants)
    sample = next(iter(prior_dataset(config, grid, train["codes"], train["levels"])))
    fit_under_strategy(model, strategy, ({k: v[:1] for k, v in sample[0].items()}, sample[1][:1]))
    validation = prior_dataset(config, grid, validate["codes"], validate["levels"]) if has_validation else None
    checkpoint = epoch_checkpointer(phase, state, monitor, mode)
    model.fit(training, validation_data=validation, epochs=epochs, initial_epoch=done, verbose=verbose,
              shuffle=False, callbacks=[checkpoint, *callbacks])
    return checkpoint


def train_refiner(config, train_set, validate_set, precision, strategy, state, verbose, callbacks):
    """Trains (or resumes) the refiner (modules.AdversarialRefiner) on pairs of refiner_inputs and their slices,
    left-right flipped together, validated on the validation slices' pairs, computing in `precision`; returns its
    epoch checkpointer, or None when it had already finished."""
    from dataset import make_tf_dataset, with_pipeline_options
    from modules import AdversarialRefiner, compile_refiner, compute_precision

    done = state.epochs_done("refiner")
    monitor, mode = phase_monitor("refiner", len(validate_set) > 0)
    with compute_precision(precision):
        model, finished = resume_phase(state, "refiner", config.refiner_epochs, monitor, mode, strategy)
    if finished:
        return None
    with strategy.scope(), compute_precision(precision):
        if not done:
            model = AdversarialRefiner(config.to_dict(), name="adversarial_refiner")
            model.build()
            compile_refiner(model, config.refiner_learning_rate)
    train_pairs, validate_pairs = refiner_pairs(state.run, config, train_set, validate_set)
    fit_under_strategy(model, strategy, train_pairs[:1])
    train = make_tf_dataset(train_pairs, config.refiner_batch_size, shuffle=True, seed=config.seed)
    train = with_pipeline_options(random_flips(train, config.seed))
    validate = None
    if len(validate_pairs):
        validate = with_pipeline_options(make_tf_dataset(validate_pairs, config.refiner_batch_size, shuffle=False))
    checkpoint = epoch_checkpointer("refiner", state, monitor, mode)
    model.fit(train, validation_data=validate, epochs=config.refiner_epochs, initial_epoch=done, verbose=verbose,
              shuffle=False, callbacks=[checkpoint, *callbacks])
    return checkpoint


def refiner_pairs(run: RunDir, config: Config, train_set, validate_set) -> tuple[np.ndarray, np.ndarray]:
    """(n, size, size, 2) [smooth input, slice] pairs from the best VQ-VAE and top prior: refiner_draws of the
    training slices' refiner_inputs each (each draw its own random bottom codes) and one of the validation slices',
    drawn from one seeded generator (a resumed run trains on the same pairs)."""
    import keras

    from modules import refiner_inputs

    vqvae, top_prior = (keras.saving.load_model(run.model_path(phase), compile=False, safe_mode=True)
                        for phase in ("vqvae", "prior_top"))
    rng = np.random.default_rng([config.seed, 2])

    def pairs(subset, draws):
        if not len(subset):
            return np.zeros((0, config.image_size, config.image_size, 2), np.float32)
        inputs = refiner_inputs(vqvae, top_prior, config, subset.images, subset.levels, rng, draws)
        return np.stack([inputs, np.tile(subset.images, (draws, 1, 1))], axis=-1)

    return pairs(train_set, config.refiner_draws), pairs(validate_set, 1)


def encode_for_priors(run: RunDir, config: Config, train_set, validate_set, grids) -> tuple[dict, dict]:
    """The priors' data from the best VQ-VAE: codes by grid of the training slices, of their left-right flips (when
    `prior_flip`), of as many deformed copies as the priors of `grids` (those still to train) take, and of the
    validation slices, with each slice's level. The copies are drawn in order from one seeded generator, so a prior
    trains on the same ones whether or not the other prior is trained in the same session."""
    import keras

    from dataset import deformed_slices
    from modules import encode_all

    vqvae = keras.saving.load_model(run.model_path("vqvae"), safe_mode=True)
    rng = np.random.default_rng([config.seed, 1])
    copies = max((config.prior_field("prior_deformed_copies", grid) for grid in grids), default=0)
    deformed = (deformed_slices(train_set.images, rng, config.prior_deformation, config.prior_flip)
                for _ in range(copies))
    train = {"codes": encode_all(vqvae, train_set.images), "levels": train_set.levels,
             "flipped": [encode_all(vqvae, train_set.images[:, :, ::-1])] if config.prior_flip else [],
             "deformed": [encode_all(vqvae, images) for images in deformed]}
    return train, {"codes": encode_all(vqvae, validate_set.images), "levels": validate_set.levels}


def plot_history(state: RunState) -> None:
    """<phase>_curves.png of every phase with epochs: loss, SSIM and perplexity; bits per code."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {"vqvae": [("loss", "loss"), ("ssim", "SSIM"), ("perplexity", "code perplexity")],
              "prior_top": [("bits_per_code", "top prior, bits per code")],
              "prior": [("bits_per_code", "bits per code")],
              "refiner": [("refiner_loss", "refiner loss"), ("critic_loss", "critic hinge loss"),
                          ("layout_error", "L1 of 4x4 means")]}
    for phase, metrics in panels.items():
        rows = state.history(phase)
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
        state.run.write_curves(phase, figure)
        plt.close(figure)


def summarize(args, config: Config, slices, state: RunState, strategy, session_seconds: float,
              precisions: dict) -> dict:
    """summary.json: the data (as given), the training slices' levels, the best epoch of each phase with its
    figures, the phases' precisions, wall times, the machine."""
    import keras
    import tensorflow as tf

    from dataset import EXCLUDED, SPLITS

    validated = len(slices.select("validate")) > 0
    best_vq = state.best_row("vqvae", *phase_monitor("vqvae", validated))
    priors = {}
    for grid in config.prior_grids:
        best = state.best_row(PRIOR_PHASES[grid], *phase_monitor(PRIOR_PHASES[grid], validated))
        priors[grid] = {"epochs": state.epochs_done(PRIOR_PHASES[grid]), "best_epoch": best["epoch"],
                        **{key: best[key] for key in best if "bits" in key}}
    return {
        "preset": args.preset, "seed": config.seed, "data": str(args.data), "data_fingerprint": slices.fingerprint(),
        "vqvae_from": state.data.get("vqvae_from"), "top_prior_from": state.data.get("top_prior_from"),
        "bottom_prior_from": state.data.get("bottom_prior_from"),
        "slices": {split: len(slices.select(split)) for split in (*SPLITS, EXCLUDED)},
        "subjects": {split: sorted(set(slices.select(split).subjects)) for split in (*SPLITS, EXCLUDED)},
        "training_levels": level_counts(slices.select("train").levels),
        "vqvae": {"epochs": state.epochs_done("vqvae"), "best_epoch": best_vq["epoch"],
                  **{key: best_vq[key] for key in best_vq if key.startswith(("val_", "ssim", "loss"))}},
        "priors": priors,
        "refiner": ({"epochs": state.epochs_done("refiner"), **state.history("refiner")[-1]}
                    if state.epochs_done("refiner") else None),
        "vqvae_precision": precisions["vqvae"], "prior_precision": precisions["priors"],
        "wall_seconds": {phase: round(sum(row["seconds"] for row in state.history(phase)), 1) for phase in PHASES},
        "this_session_seconds": round(session_seconds, 1),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "tensorflow": tf.__version__, "keras": keras.__version__,
                    "replicas": strategy.num_replicas_in_sync},
    }


if __name__ == "__main__":
    run_main(main)
