"""What every OASISVQ script shares on the command line: the common flags, and one-line errors with exit code 2."""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent
DEFAULT_CACHE = PROJECT_ROOT / "data"
DEFAULT_PRETRAINED = PROJECT_ROOT / "pretrained"
OFFICIAL_OASIS_URL = "https://download.nrg.wustl.edu/data/"


# Why each script's --split defaults to what it does (printed in its --help).
SPLIT_REASONS = {"test": "the held-out subjects no run was trained or validated on",
                 "all": "every slice of the source, less the subjects of exclude_subjects",
                 "train": "the subjects runs are trained on", "validate": "the subjects runs are validated on"}


class UserError(Exception):
    """Bad input or usage: reported as one line on stderr with exit code 2, never as a traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad flag or value reported as one `error:` line and exit code 2 (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (python {self.prog} --help lists the flags)\n")


def add_data_args(parser: argparse.ArgumentParser, default_data: str | None, default_split: str | None) -> None:
    """--data, --cache and the download flags; --split too unless `default_split` is None (a script that always
    reads a fixed split)."""
    group = parser.add_argument_group("data")
    group.add_argument("--data", default=default_data, required=default_data is None,
                       help="where slices come from: 'oasis' (official OASIS-1 discs, downloaded and cached), "
                            "'oasis2' (OASIS-2 RAW archives), or a folder of volumes (.nii, .nii.gz, .hdr/.img) "
                            "or 2D images (.png, .jpg, .tif), including the course keras_png_slices_data layout"
                            + (f" (default: {default_data})" if default_data else ""))
    if default_split is not None:
        group.add_argument("--split", default=default_split, choices=["train", "validate", "test", "all"],
                           help=f"which subject-level split of the source (default: {default_split}, "
                                f"{SPLIT_REASONS[default_split]})")
    group.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                       help="where downloads and preprocessed slices are kept (default: data/ in the project)")
    group.add_argument("--oasis-url", default=OFFICIAL_OASIS_URL,
                       help="base URL of the OASIS archives (default: the official one)")
    group.add_argument("--discs", default="1-12",
                       help="which OASIS-1 discs to download, e.g. '1' or '1-3,7' (default: 1-12)")
    group.add_argument("--delete-archives", action="store_true",
                       help="delete each downloaded archive once the volumes it holds are extracted")
    group.add_argument("--strict", action="store_true",
                       help="stop at the first unreadable file instead of skipping it with a warning")


def add_config_args(parser: argparse.ArgumentParser,
                    seed_help: str = "seed for everything random (default: the preset's)") -> None:
    group = parser.add_argument_group("hyperparameters")
    group.add_argument("--preset", default="default", help="named hyperparameter preset: default or seed")
    group.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one hyperparameter (repeatable), e.g. --set epochs=10 --set batch_size=64")
    group.add_argument("--seed", type=int, default=None, help=seed_help)


def config_from_args(args, extra_overrides: list[str] = ()):
    """The Config of --preset and --set (then `extra_overrides`); UserError with the one-line reason."""
    from hyperparameters import make_config

    try:
        return make_config(args.preset, [*args.overrides, *extra_overrides])
    except ValueError as error:
        raise UserError(str(error)) from None


def add_progress_arg(parser: argparse.ArgumentParser) -> None:
    """--no-progress, the same flag in every script: plain lines instead of progress bars (as in a log file)."""
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars: plain lines (one per epoch in train.py), as in a log file")


def check_output_path(path: Path | None, flag: str, folder: bool = False) -> None:
    """UserError before any work when `path` can never be written: a file stands where a folder must be, the
    folder is not writable, or (for a file) a folder has its name."""
    if path is None:
        return
    if not folder and path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file name")
    existing = path if folder else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {existing} is not writable; choose another path")


def parse_discs(text: str) -> list[int]:
    """'1-3,7' -> [1, 2, 3, 7]; raises UserError for anything outside 1..12."""
    discs: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                low, high = (int(value) for value in part.split("-", 1))
                discs.update(range(low, high + 1))
            elif part:
                discs.add(int(part))
    except ValueError:
        raise UserError(f"--discs {text!r}: expected disc numbers like '1' or '1-3,7'") from None
    if not discs or min(discs) < 1 or max(discs) > 12:
        raise UserError(f"--discs {text!r}: OASIS-1 has discs 1 to 12")
    return sorted(discs)


def run_main(main) -> None:
    """Runs `main()`, turning UserError into one line on stderr and exit 2, Ctrl-C into exit 130."""
    try:
        code = main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def configure_tensorflow(onednn: bool = False) -> None:
    """Settings every script applies before importing TensorFlow (an environment variable already set wins):
    - TF_CPP_MIN_LOG_LEVEL=2 keeps TensorFlow's C++ start-up chatter out of the output;
    - TF_CPU_ALLOCATOR_USE_BFC=1 makes TensorFlow keep and reuse freed CPU memory. With the default allocator every
      large tensor is a fresh mmap that the kernel zero-fills page by page: measured by bench/allocator.py, an epoch
      of the default prior spends as much CPU time in the kernel as in its arithmetic (4 million page faults per
      128 code grids) and trains 1.7x faster with this setting;
    - TF_ENABLE_ONEDNN_OPTS: TensorFlow's oneDNN kernels, which it turns on by itself on CPUs with AVX-512/AMX.
      `onednn` (train.py on one device): on, because real training epochs run faster with them on this CPU
      (VQ-VAE 59 s against 128 s, the first bottom-prior epoch 222 s against 267 s; README, Performance).
      Otherwise off: they sample slower (bench/onednn.py), and under MirroredStrategy they compute wrong results
      for an empty per-replica batch (a convolution reads the raw image; tests/test_distribute.py fails with them).
    With oneDNN on, TensorFlow is imported here, with its stderr silenced: it prints a notice about oneDNN there at
    import whatever TF_CPP_MIN_LOG_LEVEL says, which would break the one-line error contract."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "1")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1" if onednn else "0")
    if onednn_on():
        saved = os.dup(2)
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            try:
                import tensorflow  # noqa: F401
            finally:
                os.dup2(saved, 2)
                os.close(saved)


def onednn_on() -> bool:
    """Whether TensorFlow runs (or, imported after configure_tensorflow, will run) its oneDNN CPU kernels."""
    return os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "1"


@functools.cache
def cpu_has(*flags: str) -> bool:
    """Whether the CPU has any of these feature flags, as /proc/cpuinfo names them (none where it cannot be read)."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    return any(re.search(rf"\b{flag}\b", text) for flag in flags)


def onednn_computes(dtype: str) -> bool:
    """Whether TensorFlow's oneDNN CPU kernels compute `dtype` ("float32" or "bfloat16"): with oneDNN on, float32
    always, and bfloat16 only on a CPU with AVX-512 or AVX-NE-CONVERT. Elsewhere TensorFlow falls back to its other
    kernels for bfloat16 (it logs "oneDNN supports DT_BFLOAT16 only on platforms with AVX-512")."""
    return onednn_on() and (dtype != "bfloat16" or cpu_has("avx512f", "avx_ne_convert"))


def resolved_precision(setting: str) -> str:
    """The prior_precision a training run uses: "float32" or "bfloat16" as set, and for "auto" bfloat16 where
    TensorFlow computes it natively: on GPUs of compute capability 8 or more (Ampere on), or, without a GPU, on a
    CPU with AMX or AVX-512 BF16 units and oneDNN on (configure_tensorflow). Elsewhere bfloat16 is emulated and
    slower than float32."""
    if setting != "auto":
        return setting
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        native = all(tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0)) >= (8, 0)
                     for gpu in gpus)
    else:
        native = onednn_on() and cpu_has("amx_bf16", "avx512_bf16")
    return "bfloat16" if native else "float32"


def shown_path(path) -> str:
    """A path as reports and JSON files show it: as the user gave it, but relative to the project when it lies in
    it (defaults such as pretrained/ are absolute), so that no report names a folder of this machine for them."""
    path = Path(path)
    if path.is_absolute() and path.is_relative_to(PROJECT_ROOT):
        return str(path.relative_to(PROJECT_ROOT))
    return str(path)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")
