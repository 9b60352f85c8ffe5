"""The run directory: where each file of a training run lives, and the one way each is written and read back.

    config.json                      the resolved hyperparameters (hyperparameters.Config)
    vqvae.keras                      the best VQ-VAE epoch by validation SSIM, weights only
    pixelcnn_top.keras               the best top-grid prior epoch of a two-level model, weights only
    pixelcnn.keras                   the best prior epoch of the bottom (or only) grid, weights only
    refiner.keras                    the refiner of the last refiner epoch (a GAN has no best one), weights only
    history_<phase>.csv              one row per completed epoch of a phase
    <phase>_curves.png               those rows, plotted
    summary.json                     best figures, epochs, wall times, data and machine of a finished run
    checkpoints/state.json           the commit record (RunState): which epochs are done
    checkpoints/<phase>_epochNNN.keras   the last committed epoch of each phase, with optimizer state
    logs/                            TensorBoard logs (train.py --tensorboard)

The phases are `vqvae`, `prior_top` (the top grid's prior of a two-level model), `prior` (the bottom or only
grid's prior) and `refiner` (of a run with refiner_epochs). Every file arrives through `atomic_write` (a temporary
file beside it, fsynced, renamed into place): a process killed at any moment leaves the old file or the new one,
never a truncated one that loads.
Only the chief process writes a run directory (`is_chief`); other workers of a multi-worker cluster write the
same files into a scratch copy that nobody reads (`RunDir.worker_scratch`).

This module reads no TensorFlow at import, so scripts can check a run directory before TensorFlow starts.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from cli import UserError
from hyperparameters import (PRESETS, Config, bottom_prior_differences, refiner_differences, top_prior_differences,
                             validate, vqvae_differences)

# in training order; a single-grid run has no prior_top epochs, a run without refiner_epochs no refiner ones
PHASES = ("vqvae", "prior_top", "prior", "refiner")
PRIOR_PHASES = {"top": "prior_top", "bottom": "prior"}  # the phase that trains each code grid's prior
PHASE_GRIDS = {phase: grid for grid, phase in PRIOR_PHASES.items()}  # the code grid of each prior phase
MODEL_STEMS = {"vqvae": "vqvae", "prior_top": "pixelcnn_top", "prior": "pixelcnn", "refiner": "refiner"}
PRIOR_FILES = {grid: MODEL_STEMS[phase] for grid, phase in PRIOR_PHASES.items()}
CONFIG, SUMMARY, CHECKPOINTS, STATE, LOGS = "config.json", "summary.json", "checkpoints", "state.json", "logs"


# ---------------------------------------------------------------------------------------------------------------
# The one atomic write
# ---------------------------------------------------------------------------------------------------------------

def atomic_write(path: Path, write, by_name: bool = False) -> None:
    """Writes `path` atomically: `write(file_object)` fills a temporary file `.NAME.XXXX.tmp` beside it (or, with
    `by_name`, `write(temporary_path)`, for writers that open the file themselves, like Keras, which also wants the
    name to end in `path`'s suffix), which is flushed to disk and renamed over `path`, and the rename flushed too.
    UserError when the folder cannot be written."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                       suffix=".tmp" + (path.suffix if by_name else ""))
    except OSError as error:
        raise UserError(f"cannot write to {path.parent}: {error.strerror}; choose a writable folder") from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if by_name:
            os.close(handle)
            write(tmp)
            handle = os.open(tmp, os.O_RDONLY)
        with os.fdopen(handle, "rb" if by_name else "wb") as out:
            if not by_name:
                write(out)
                out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    except OSError:  # some filesystems cannot flush a folder; the file itself is on disk
        pass
    finally:
        os.close(folder)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda out: out.write(text.encode()))


def save_figure(figure, path: Path, dpi: int = 100) -> None:
    """A matplotlib figure as a PNG, written atomically."""
    atomic_write(path, lambda out: figure.savefig(out, format="png", dpi=dpi))


def save_model(model, path) -> None:
    """A Keras model as a .keras file, written atomically."""
    atomic_write(Path(path), model.save, by_name=True)


def is_temporary(path: Path) -> bool:
    """A file an interrupted atomic write left behind: `.NAME.XXXX.tmp[.suffix]` (and `.STEM.tmp.keras`, the
    name runs made by earlier versions used)."""
    return path.name.startswith(".") and ".tmp" in path.name


def weights_only_copy(model):
    """A fresh, uncompiled copy of a VQVAE or prior with the same weights (no optimizer state to ship); of an
    AdversarialRefiner, of its refiner alone (what predict.py runs: the critic only trains it)."""
    model = getattr(model, "refiner", model)
    copy = type(model).from_config(model.get_config())
    copy.build()
    copy.set_weights(model.get_weights())
    return copy


# ---------------------------------------------------------------------------------------------------------------
# Who writes
# ---------------------------------------------------------------------------------------------------------------

def is_chief(tf_config: dict | None) -> bool:
    """Whether this process writes the run directory: always, unless it is one of several workers described by
    `tf_config` (the parsed TF_CONFIG of a multi-worker cluster); then only the task "chief", or worker 0 of a
    cluster without one. Known from TF_CONFIG alone, so before TensorFlow starts."""
    if tf_config is None:
        return True
    kind, index = tf_config["task"]["type"], int(tf_config["task"]["index"])
    return kind == "chief" or (kind == "worker" and index == 0 and "chief" not in tf_config["cluster"])


# ---------------------------------------------------------------------------------------------------------------
# The run directory
# ---------------------------------------------------------------------------------------------------------------

class RunDir:
    """A run directory at `path` (kept as given: relative paths stay relative): its file names, and reading and
    writing its config, summary, histories, curves and models."""

    def __init__(self, path):
        self.path = Path(path)
        self.created = None  # the outermost folder create() made, removed again by remove_if_unfinished()

    def __str__(self) -> str:
        return str(self.path)

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY

    @property
    def state_path(self) -> Path:
        return self.path / CHECKPOINTS / STATE

    @property
    def logs(self) -> Path:
        return self.path / LOGS

    def model_path(self, phase: str) -> Path:
        """The best-epoch model file of `phase` (vqvae.keras, pixelcnn_top.keras, pixelcnn.keras)."""
        return self.path / f"{MODEL_STEMS[phase]}.keras"

    def checkpoint_path(self, name: str) -> Path:
        return self.path / CHECKPOINTS / name

    def history_path(self, phase: str) -> Path:
        return self.path / f"history_{phase}.csv"

    def curves_path(self, phase: str) -> Path:
        return self.path / f"{phase}_curves.png"

    # --- config and summary -----------------------------------------------------------------------------------

    def read_config(self) -> Config:
        """config.json, parsed and validated (older config versions migrated); UserError naming the file."""
        try:
            values = json.loads(self.config_path.read_text())
        except FileNotFoundError:
            raise UserError(f"{self.config_path}: missing; is {self.path} a run directory made by train.py?") \
                from None
        except (OSError, ValueError) as error:
            raise UserError(f"{self.config_path}: cannot be read ({type(error).__name__}); the run directory is "
                            f"damaged, retrain or restore it") from None
        try:
            config = Config.from_dict(values)
            validate(config)
        except (ValueError, TypeError, AttributeError) as error:
            raise UserError(f"{self.config_path}: {error}; this run was made by an incompatible version, retrain "
                            f"it") from None
        return config

    def write_config(self, config: Config) -> None:
        atomic_write_text(self.config_path, config.to_json())

    def read_summary(self) -> dict:
        """summary.json of a finished run; UserError when it is missing or damaged."""
        try:
            return json.loads(self.summary_path.read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"{self.summary_path}: cannot be read ({type(error).__name__}); the run did not "
                            f"finish, or its directory is damaged") from None

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(self.summary_path, json.dumps(summary, indent=2))

    def training_levels(self) -> tuple[float, ...]:
        """The training slices' known levels that summary.json records (`level_counts`), one per slice, in
        ascending order; () for a run without them (unfinished, or from before they were recorded)."""
        if not self.summary_path.is_file():
            return ()
        counts = self.read_summary().get("training_levels") or {"levels": [], "slices": []}
        return tuple(level for level, count in zip(counts["levels"], counts["slices"]) for _ in range(count))

    # --- histories and curves ---------------------------------------------------------------------------------

    def write_history(self, phase: str, rows: list[dict]) -> None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
        lines = [",".join(columns)] + [",".join(str(row.get(key, "")) for key in columns) for row in rows]
        atomic_write_text(self.history_path(phase), "\n".join(lines) + "\n")

    def read_history(self, phase: str) -> list[dict[str, str]]:
        """history_<phase>.csv as rows of strings ([] before the phase's first epoch)."""
        if not self.history_path(phase).exists():
            return []
        with open(self.history_path(phase), newline="") as handle:
            return list(csv.DictReader(handle))

    def read_history_values(self, phase: str) -> list[dict[str, float]]:
        """read_history's rows as numbers: the epoch an int, every other filled cell a float."""
        return [{key: int(value) if key == "epoch" else float(value) for key, value in row.items() if value != ""}
                for row in self.read_history(phase)]

    def write_curves(self, phase: str, figure) -> None:
        save_figure(figure, self.curves_path(phase))

    # --- whether it holds a run, creating and clearing it -----------------------------------------------------

    def holds_finished_epoch(self) -> bool:
        """Whether the folder holds anything of value: a committed epoch, a model or a summary (a run shipped
        without checkpoints/, like pretrained/, counts), or a state.json that cannot be read."""
        if any(self.model_path(phase).exists() for phase in PHASES) or self.summary_path.exists():
            return True
        if not self.state_path.exists():
            return False
        try:
            return any(RunState(self).epochs_done(phase) for phase in PHASES)
        except UserError:
            return True

    def check_creatable(self) -> None:
        """UserError when the folder cannot be made: a file stands in its way, or the nearest folder that exists
        is not writable."""
        existing = self.path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if existing.exists() and not existing.is_dir():
            raise UserError(f"{existing} is a file, not a folder; choose another --out")
        if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"{existing} is not writable; choose a writable folder")

    def create(self, config: Config) -> None:
        """A new run: the folder (cleared first when it holds a run with no finished epoch), checkpoints/ and
        config.json."""
        existing = self.path
        while not existing.parent.exists() and existing != existing.parent:
            existing = existing.parent
        self.created = None if existing.exists() else existing
        self.clear()
        try:
            (self.path / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot create {self.path} ({error.strerror}); choose a writable --out") from None
        self.write_config(config)

    def clear(self) -> list[str]:
        """Deletes every run file (for a fresh start over a folder with no finished epoch); other files stay."""
        names = [CONFIG, SUMMARY, *[f"{MODEL_STEMS[phase]}.keras" for phase in PHASES],
                 *[self.history_path(phase).name for phase in PHASES], *[self.curves_path(phase).name for phase in
                                                                          PHASES]]
        removed = []
        for path in [self.path / name for name in names] + self._checkpoint_files():
            if path.is_file():
                path.unlink()
                removed.append(path.name)
        if self.logs.is_dir():
            shutil.rmtree(self.logs)
        return removed + self.remove_temporary_files()

    def _checkpoint_files(self) -> list[Path]:
        folder = self.path / CHECKPOINTS
        if not folder.is_dir():
            return []
        return [path for path in folder.iterdir() if path.name == STATE or path.suffix == ".keras"]

    def remove_temporary_files(self) -> list[str]:
        removed = []
        for folder in (self.path, self.path / CHECKPOINTS):
            for path in (folder.iterdir() if folder.is_dir() else []):
                if is_temporary(path) and path.is_file():
                    path.unlink(missing_ok=True)
                    removed.append(path.name)
        return removed

    def remove_if_unfinished(self) -> bool:
        """After a failure: removes the folders create() made, unless an epoch was committed. True if removed."""
        if self.created is None or self.holds_finished_epoch():
            return False
        shutil.rmtree(self.created, ignore_errors=True)
        return True

    def worker_scratch(self, config: Config, resume: bool) -> "RunDir":
        """A non-chief worker's run directory: a temporary folder that nobody reads (the caller removes it). The
        worker trains in step with the chief and saves what the chief saves (it reads its best VQ-VAE back to
        encode the prior's codes). To resume it starts from a copy of the chief's committed files, so the run
        directory must be visible to every worker at the same path (a shared filesystem)."""
        scratch = RunDir(tempfile.mkdtemp(prefix="oasisvq-worker-"))
        (scratch.path / CHECKPOINTS).mkdir()
        if not resume:
            scratch.write_config(config)
            return scratch
        committed = [self.config_path, self.state_path, *[self.model_path(phase) for phase in PHASES]]
        if self.state_path.exists():
            state = RunState(self)
            committed += [state.checkpoint_path(phase) for phase in PHASES if state.epochs_done(phase)]
        for path in committed:
            if path.exists():
                shutil.copy2(path, scratch.path / path.relative_to(self.path))
        return scratch


# ---------------------------------------------------------------------------------------------------------------
# The commit record: checkpoints/state.json
# ---------------------------------------------------------------------------------------------------------------

class RunState:
    """`checkpoints/state.json`, the commit record of a run: the history rows of each phase's completed epochs, the
    checkpoint file that holds the last of them, which epoch each best-model file holds, and the data the run
    trains on (its fingerprint and --data as given).

    An epoch counts as done only once state.json names it. Its checkpoint (`checkpoints/<phase>_epochNNN.keras`,
    with optimizer state) is written before that and the best-model file after, so a kill at any moment leaves
    either the old epoch or the new one complete; `repair_best` finishes an interrupted best-model write.
    `fresh` starts an empty record instead of reading the one on disk.
    """

    def __init__(self, run: RunDir, fresh: bool = False):
        self.run = run
        self.path = run.state_path
        self.data = {"history": {phase: [] for phase in PHASES}, "checkpoint": {}, "best_saved": {}}
        if fresh or not self.path.exists():
            return
        try:
            stored = json.loads(self.path.read_text())
            if not isinstance(stored.get("history"), dict):
                raise ValueError("no history")
        except (ValueError, AttributeError, OSError):
            raise UserError(f"{self.path} is damaged") from None
        self.data.update(stored)
        for phase in PHASES:
            self.data["history"].setdefault(phase, [])
        self.data.setdefault("checkpoint", {})
        self.data.setdefault("best_saved", {})

    @classmethod
    def of_shipped_run(cls, run: RunDir) -> "RunState":
        """What adopt_phases reads of a finished run copied without its checkpoints/ (as pretrained/ ships): each
        phase's history from its CSV, its best epoch and the data from summary.json. It has no checkpoint to resume
        from, which a finished phase never needs."""
        state, summary = cls(run, fresh=True), run.read_summary()
        state.data["history"] = {phase: run.read_history_values(phase) for phase in PHASES}
        state.data["best_saved"] = {"vqvae": summary.get("vqvae", {}).get("best_epoch"),
                                    **{phase: summary.get("priors", {}).get(grid, {}).get("best_epoch")
                                       for grid, phase in PRIOR_PHASES.items()},
                                    "refiner": (summary.get("refiner") or {}).get("epochs")}
        state.data["data_fingerprint"], state.data["data"] = summary.get("data_fingerprint"), summary.get("data")
        return state

    def history(self, phase: str) -> list[dict]:
        return self.data["history"][phase]

    def epochs_done(self, phase: str) -> int:
        return len(self.history(phase))

    def checkpoint_path(self, phase: str) -> Path:
        """The committed last-epoch checkpoint (`<phase>_last.keras` in runs made before epoch-named ones)."""
        return self.run.checkpoint_path(self.data["checkpoint"].get(phase, f"{phase}_last.keras"))

    def best_row(self, phase: str, monitor: str, mode: str) -> dict | None:
        """The history row of the best epoch by `monitor` ("max" or "min"); None before the first one."""
        rows = [row for row in self.history(phase) if monitor in row]
        if not rows:
            return None
        return (max if mode == "max" else min)(rows, key=lambda row: row[monitor])

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=1))

    def record_data(self, fingerprint: str, data: str) -> None:
        """Which slices the run trains on, and --data as the user gave it (never resolved to an absolute path)."""
        self.data["data_fingerprint"] = fingerprint
        self.data["data"] = data
        self.save()

    # --- epochs -----------------------------------------------------------------------------------------------

    def commit_epoch(self, phase: str, row: dict, model, best: bool) -> None:
        """Makes epoch row["epoch"] of `phase` done: its checkpoint, then the commit in state.json, then (when
        `best`, or when there is no best-model file yet) the best-model file, the history CSV, and the removal of
        the previous checkpoint."""
        checkpoint = self.run.checkpoint_path(f"{phase}_epoch{row['epoch']:03d}.keras")
        previous = self.checkpoint_path(phase)
        save_model(model, checkpoint)
        self.history(phase).append(row)
        self.data["checkpoint"][phase] = checkpoint.name
        self.save()  # the commit: from here on, this epoch is done
        if best or not self.run.model_path(phase).exists():
            self.save_best(phase, model, row["epoch"])
        self.run.write_history(phase, self.history(phase))
        if previous != checkpoint:
            previous.unlink(missing_ok=True)

    def save_best(self, phase: str, model, epoch: int) -> None:
        save_model(weights_only_copy(model), self.run.model_path(phase))
        self.data["best_saved"][phase] = epoch
        self.save()

    def needs_repair(self, phase: str, monitor: str, mode: str) -> bool:
        """Whether a kill interrupted a best-model write: the committed last epoch is the best one, but the
        best-model file does not hold it yet."""
        best = self.best_row(phase, monitor, mode)
        return best is not None and best["epoch"] == self.epochs_done(phase) and (
            self.data["best_saved"].get(phase) != best["epoch"] or not self.run.model_path(phase).exists())

    def load_checkpoint(self, phase: str, custom_objects=None):
        """The committed last-epoch model of `phase`, with its optimizer; UserError when missing or damaged."""
        import keras

        path = self.checkpoint_path(phase)
        if not path.exists():
            raise UserError(f"{path} is missing, but {self.path.name} records {self.epochs_done(phase)} completed "
                            f"{phase} epoch(s)")
        try:
            return keras.saving.load_model(path, safe_mode=True, custom_objects=custom_objects)
        except Exception as error:  # Keras raises many types for truncated or foreign files
            raise UserError(f"{path} cannot be loaded ({type(error).__name__}); the checkpoint is damaged") \
                from None

    def remove_stale_files(self) -> list[str]:
        """Deletes what a killed process left behind: temporary files, and epoch checkpoints state.json does not
        name. None of them is ever read: a resume trusts only files that state.json commits."""
        committed = {self.checkpoint_path(phase) for phase in PHASES if self.epochs_done(phase)}
        stale = [path for path in self.run._checkpoint_files() if path.suffix == ".keras" and path not in committed]
        for path in stale:
            path.unlink(missing_ok=True)
        return [path.name for path in stale] + self.run.remove_temporary_files()

    def rewrite_histories(self) -> None:
        """The history CSVs from state.json (a kill can fall between an epoch's commit and its CSV)."""
        for phase in PHASES:
            if self.epochs_done(phase):
                self.run.write_history(phase, self.history(phase))

    def adopt_phases(self, source: "RunState", phases: tuple[str, ...] = ("vqvae",)) -> None:
        """Copies the finished `phases` of the run `source` (best model, last checkpoint, history) and its data
        record into this run and commits them, so that training goes straight to the phases after them."""
        for phase in phases:
            files = [(source.run.model_path(phase), self.run.model_path(phase))]
            if phase in source.data["checkpoint"]:  # a shipped run (of_shipped_run) has none
                checkpoint = source.checkpoint_path(phase)
                files.append((checkpoint, self.run.checkpoint_path(checkpoint.name)))
                self.data["checkpoint"][phase] = source.data["checkpoint"][phase]
            for name, target in files:
                with open(name, "rb") as original:
                    atomic_write(target, lambda out: shutil.copyfileobj(original, out))
            self.data["history"][phase] = source.history(phase)
            self.data["best_saved"][phase] = source.data["best_saved"].get(phase)
        self.data["data_fingerprint"] = source.data["data_fingerprint"]
        self.data["data"] = source.data["data"]
        self.data["vqvae_from"] = str(source.run.path)
        for phase, key in (("prior_top", "top_prior_from"), ("prior", "bottom_prior_from")):
            if phase in phases:
                self.data[key] = str(source.run.path)
        self.save()
        for phase in phases:
            self.run.write_history(phase, self.history(phase))


# ---------------------------------------------------------------------------------------------------------------
# Loading a finished run
# ---------------------------------------------------------------------------------------------------------------

def level_counts(levels) -> dict:
    """{"levels": [...], "slices": [...]}: each distinct known level (rounded to 4 decimals, NaN left out) in
    ascending order and how many slices have it; how summary.json records the training slices' levels, so that
    predict.py draws levels as in training without the data."""
    counts = Counter(round(float(level), 4) for level in levels if level == level)
    return {"levels": sorted(counts), "slices": [counts[level] for level in sorted(counts)]}


class Run(NamedTuple):
    """A trained run, loaded: its config, its VQ-VAE, its priors by code grid ("top" for the coarse grid of a
    two-level model, "bottom" for the fine grid, the only one of a single-level model; config.prior_grids, so no
    "bottom" for a two-level run without a bottom prior), its refiner (None for a run without refiner_epochs) and
    its training slices' levels (`RunDir.training_levels`); no priors and no refiner when loaded with
    need_prior=False."""
    config: Config
    vqvae: object  # modules.VQVAE
    priors: dict
    refiner: object = None  # modules.Refiner
    training_levels: tuple = ()

    @property
    def level_conditioned(self) -> bool:
        """Whether the priors take the axial level of the slice to generate (predict.py --level)."""
        return any(getattr(prior, "level_conditioned", False) for prior in self.priors.values())


def load_run(run_dir, need_prior: bool = True) -> Run:
    """The Run in `run_dir`, every model loaded in Keras safe mode; UserError naming the file for anything
    unusable."""
    import keras

    import modules  # noqa: F401  (registers the custom layers)

    run = RunDir(run_dir)
    if not run.path.is_dir():
        # runs named after a preset (README's runs/seed) need that preset: say so in the command to copy
        preset = f" --preset {run.path.name}" if run.path.name in PRESETS and run.path.name != "default" else ""
        raise UserError(f"--run {run.path}: no such run directory; train one with python train.py --data FOLDER "
                        f"--out {run.path}{preset}")
    config = run.read_config()
    phases = ["vqvae"] + ([PRIOR_PHASES[grid] for grid in config.prior_grids]
                          + ["refiner"] * bool(config.refiner_epochs) if need_prior else [])
    models = []
    for phase in phases:
        path = run.model_path(phase)
        if not path.exists():
            raise UserError(f"{path}: missing; the run did not finish its {MODEL_STEMS[phase]} phase (python "
                            f"train.py --resume --out {run.path})")
        try:
            model = keras.saving.load_model(path, compile=False, safe_mode=True)
        except Exception as error:  # Keras raises many types for truncated or foreign files
            raise UserError(f"{path}: cannot be loaded ({type(error).__name__}); the file is damaged or from "
                            f"another version, retrain or restore it") from None
        saved = Config.from_dict(getattr(model, "config_dict", config.to_dict())).to_dict()
        # a model reused by train.py --vqvae-from (--keep-top-prior, --keep-bottom-prior) keeps the fields of the
        # run it was trained in that it does not read
        differences = {"vqvae": vqvae_differences, "prior_top": top_prior_differences,
                       "prior": bottom_prior_differences, "refiner": refiner_differences}[phase]
        if differences(saved, config.to_dict()):
            raise UserError(f"{path}: its hyperparameters differ from {run.config_path}; the run directory is mixed")
        models.append(model)
    priors = dict(zip(config.prior_grids, models[1:1 + len(config.prior_grids)] if need_prior else []))
    return Run(config, models[0], priors, models[-1] if "refiner" in phases else None, run.training_levels())
