"""Shared test set-up: `import dataset` from the project root, and small synthetic MRI-like data.

Everything here is made by the tests themselves (a few kB each), so the core suite runs without ../shared/data;
tests that read the real OASIS subset use the `shared_data` fixture, which skips with a reason when it is absent.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path[:1]:
    sys.path.insert(0, str(PROJECT_ROOT))
from cli import configure_tensorflow  # noqa: E402

configure_tensorflow()  # before any test imports TensorFlow, in process or in the scripts it starts

# pytest-xdist (pytest.ini: two workers, a test file each at a time, --no-loadscope-reorder) hands out the files in
# this order, the longest first (train, then reliability, models and distribute, each over a minute of tests on
# 2 cores; the rest under one), and each worker starts with two: the longest and a short one,
# the second longest and the third, so that neither starts test_train.py when the other is nearly done (by the number
# of tests per file, xdist's default, the suite took 9 min 48 s on an AMD EPYC host); other files follow
FILE_ORDER = ("test_train.py", "test_reliability.py", "test_measures.py", "test_models.py", "test_distribute.py",
              "test_pretrained.py", "test_predict.py", "test_dataset.py", "test_download.py")
SMALL_SHAPE = (40, 48, 40)  # x, y, z: axial slices are the last axis
RGB_DTYPE = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])


def pytest_collection_modifyitems(items):
    """The tests in FILE_ORDER's order of their files, each file's in its own order."""
    rank = {name: index for index, name in enumerate(FILE_ORDER)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


# ---------------------------------------------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------------------------------------------

def make_volume(shape=SMALL_SHAPE, seed: int = 0, fill: float = 0.7) -> np.ndarray:
    """A smooth brain-like 3D float32 volume: a bright ellipsoid ("brain") on a zero background, with a darker
    inner ellipsoid ("ventricles") and a gentle seeded texture. The ellipsoid spans `fill` of each axis around
    the centre, so the first and last slices along every axis are empty background.
    """
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1.0, 1.0, n) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    radius = np.sqrt((x / fill) ** 2 + (y / fill) ** 2 + (z / fill) ** 2)
    brain = np.clip((1.0 - radius) * 8.0, 0.0, 1.0)  # soft edge
    phase = rng.uniform(0, 2 * np.pi, 3)
    texture = 0.15 * np.sin(5 * x + phase[0]) * np.sin(4 * y + phase[1]) * np.sin(3 * z + phase[2])
    inner = np.sqrt((x / 0.25) ** 2 + (y / 0.35) ** 2 + (z / 0.3) ** 2) < 1.0
    volume = brain * (0.75 + texture)
    volume[inner] *= 0.35
    return volume.astype(np.float32)


def make_slice(shape=(64, 56), seed: int = 0, blank: bool = False) -> np.ndarray:
    """A 2D brain-like float image in [0, 1] (an ellipse with texture), or all zeros when `blank`."""
    if blank:
        return np.zeros(shape, np.float32)
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    radius = np.sqrt((rows / 0.8) ** 2 + (cols / 0.7) ** 2)
    image = np.clip((1.0 - radius) * 6.0, 0.0, 1.0) * (0.7 + 0.2 * np.sin(6 * rows + rng.uniform(0, 6)))
    return image.astype(np.float32)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """A NIfTI-1 file (.nii or .nii.gz by the name); `data` keeps its dtype (float, int, RGB, 4D...)."""
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(data, np.eye(4) if affine is None else affine).to_filename(str(path))
    return path


def write_analyze(path: Path, data: np.ndarray) -> Path:
    """An Analyze 7.5 pair `path` (.hdr) + .img, int16 big-endian like the OASIS-1 discs. Returns the .hdr."""
    import nibabel as nib

    path = Path(path).with_suffix(".hdr")
    path.parent.mkdir(parents=True, exist_ok=True)
    scaled = np.round(np.asarray(data, np.float64) / max(float(np.max(data)), 1e-6) * 1500.0)
    header = nib.AnalyzeHeader(endianness=">")
    header.set_data_dtype(">i2")
    nib.AnalyzeImage(scaled.astype(">i2"), None, header).to_filename(str(path))
    return path


def analyze_bytes(data: np.ndarray) -> tuple[bytes, bytes]:
    """The (.hdr, .img) bytes of an int16 big-endian Analyze 7.5 volume, for building archives in memory."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        hdr = write_analyze(Path(folder) / "volume.hdr", data)
        return hdr.read_bytes(), hdr.with_suffix(".img").read_bytes()


def write_png(path: Path, image: np.ndarray, bits: int = 8, rgb: bool = False) -> Path:
    """`image` in [0, 1] as an 8-bit (optionally RGB) or 16-bit grayscale PNG."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if bits == 16:
        pixels = Image.fromarray(np.round(np.clip(image, 0, 1) * 65535).astype(np.uint16))
    else:
        pixels = Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))
        if rgb:
            pixels = pixels.convert("RGB")
    pixels.save(path)
    return path


def write_jpeg(path: Path, image: np.ndarray) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path, quality=90)
    return path


def make_brain_slices(folder: Path, subjects: int = 6, per_subject: int = 2, size: int = 64,
                      course_names: bool = False) -> Path:
    """`subjects` x `per_subject` 8-bit PNG slices named OAS1_000N_MR1_slice_K.png (no axial level), or with
    `course_names` case_00N_slice_S.nii.png, S = 8 + 12 K (the course's slice S of 32: level S / 31): a bright
    textured ellipse ("brain") with a darker inner ellipse ("ventricles") on black, different per subject and
    slice."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rows, cols = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    for subject in range(1, subjects + 1):
        rng = np.random.default_rng(subject)
        for index in range(per_subject):
            width, height = 0.6 + 0.1 * rng.random(), 0.75 + 0.1 * rng.random()
            radius = np.sqrt((rows / height) ** 2 + (cols / width) ** 2)
            image = np.clip((1 - radius) * 6, 0, 1) * (
                0.7 + 0.15 * np.sin(5 * rows + rng.uniform(0, 6)) * np.cos(4 * cols + index))
            image[np.sqrt((rows / 0.25) ** 2 + (cols / (0.15 + 0.05 * index)) ** 2) < 1] *= 0.3
            pixels = Image.fromarray(np.round(image * 255).astype(np.uint8))
            name = f"case_{subject:03d}_slice_{8 + 12 * index}.nii.png" if course_names else \
                f"OAS1_{subject:04d}_MR1_slice_{index}.png"
            pixels.save(folder / name)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# Running the scripts
# ---------------------------------------------------------------------------------------------------------------

# The `seed` preset (the founding report's architecture) at small batches: about 20 s for 2 + 2 epochs on 2 cores.
SEED_FLAGS = ["--preset", "seed", "--epochs", "2", "--prior-epochs", "2", "--set", "batch_size=8",
              "--set", "prior_batch_size=8"]
# The default (two-level) preset at 32x32 with a few filters and prior blocks (one dilated block in the top prior:
# tracing each block's training step costs seconds, and test_models.py checks every dilation), its VQ-VAE in
# bfloat16 (two_level_run checks that it says so), a bottom prior (the default has none; test_train.py derives a run
# without one) and no refiner (tests that train one add --refiner-epochs N and TINY_REFINER).
TINY_TWO_LEVEL = ["--preset", "default", "--epochs", "1", "--prior-epochs", "1", "--set", "prior_epochs=1",
                  "--refiner-epochs", "0",
                  "--set", "image_size=32", "--set", "batch_size=8", "--set", "prior_batch_size=8",
                  "--set", "prior_filters=8", "--set", "top_prior_filters=8", "--set", "prior_condition_filters=8",
                  "--set", "prior_residual_blocks=1", "--set", "top_prior_residual_blocks=2",
                  "--set", "residual_filters=16", "--set", "prior_precision=float32",
                  "--set", "vqvae_precision=bfloat16"]
TINY_REFINER = ["--set", "refiner_filters=8", "--set", "refiner_batch_size=8"]
RUN_FILES = ["config.json", "vqvae.keras", "pixelcnn.keras", "history_vqvae.csv", "history_prior.csv",
             "vqvae_curves.png", "prior_curves.png", "summary.json"]


def subprocess_env() -> dict[str, str]:
    """The environment for running a project script as a subprocess: quiet TensorFlow, unbuffered output, the
    project on the path, and no TF_CONFIG from the caller's shell (a test sets its own)."""
    env = dict(os.environ)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("TF_CONFIG", None)
    env["PYTHONPATH"] = str(PROJECT_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_script(script: str, *args, timeout: float = 300, cwd: Path = PROJECT_ROOT) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` (SCRIPT in the project root), from `cwd`; the finished process, text stdout/stderr."""
    return subprocess.run([sys.executable, str(PROJECT_ROOT / script), *map(str, args)], cwd=cwd,
                          env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def run_in_process(script: str, argv: list, monkeypatch, capfd):
    """`python SCRIPT ARGV` inside this process, through the same cli.run_main as `__main__`: a UserError becomes
    exit 2 with one stderr line, anything else escapes as an exception (and fails the test). It spares a test the
    seconds a fresh process takes to import TensorFlow where what it checks is not the process itself."""
    import importlib

    module = importlib.import_module(script.removesuffix(".py"))
    monkeypatch.setattr("sys.argv", [script, *map(str, argv)])
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        module.run_main(module.main)
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(argv, exit_info.value.code, out, err)


def start_script(script: str, *args, log: Path) -> subprocess.Popen:
    """Starts `python SCRIPT ARGS` in the background, stdout and stderr into `log`.out / `log`.err."""
    with open(f"{log}.out", "w") as stdout, open(f"{log}.err", "w") as stderr:  # the child keeps its own copies
        return subprocess.Popen([sys.executable, script, *map(str, args)], cwd=PROJECT_ROOT, env=subprocess_env(),
                                stdout=stdout, stderr=stderr, text=True, preexec_fn=default_sigint)


def default_sigint() -> None:
    """A suite started in the background (as CI may start it) has SIGINT ignored, and children inherit that: the
    scripts under test get the default Ctrl-C behaviour back."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def assert_clean_usage_error(result, *words: str) -> str:
    """Exit 2 with exactly one line on stderr that mentions each of `words`, and no traceback."""
    stderr = result.stderr.strip()
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], stderr[-2000:])
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, stderr
    assert len(stderr.splitlines()) == 1, stderr
    for word in words:
        assert word in stderr, (word, stderr)
    return stderr


def read_history(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def read_strict_json(path: Path) -> dict:
    """A JSON file, refusing NaN and Infinity: Python's json writes them, but they are not JSON, and other readers
    (JavaScript, jq) reject the file."""
    def refuse(constant):
        raise ValueError(f"{path}: {constant} is not JSON")

    return json.loads(Path(path).read_text(), parse_constant=refuse)


def state_of(run: Path) -> dict:
    """A run's checkpoints/state.json."""
    return json.loads((run / "checkpoints" / "state.json").read_text())


def wait_for_epochs(process, run: Path, phase: str, count: int, log: Path, timeout: float = 300) -> None:
    """Polls checkpoints/state.json until it commits `count` epochs of `phase`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"train.py exited ({process.returncode}) before {count} {phase} epoch(s):\n"
                        + Path(f"{log}.err").read_text()[-3000:])
        try:
            if len(state_of(run)["history"][phase]) >= count:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    process.kill()
    pytest.fail(f"no {phase} epoch committed within {timeout} s")


def epochs_of(path: Path) -> list[int]:
    return [int(row["epoch"]) for row in read_history(path)]


def load_keras(path: Path):
    import keras

    import modules  # noqa: F401  (registers the model classes)

    return keras.saving.load_model(path, compile=False, safe_mode=True)


# ---------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def config():
    """The default preset's config (the data section is what dataset.py uses)."""
    from hyperparameters import make_config

    return make_config("default")


@pytest.fixture
def cache(tmp_path) -> Path:
    """A fresh cache folder per test: tests never touch the project's data/ folder."""
    folder = tmp_path / "cache"
    folder.mkdir()
    return folder


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real OASIS-1 subset at ../shared/data (relative to the project root); skips when it is absent."""
    folder = PROJECT_ROOT / ".." / "shared" / "data"
    if not folder.is_dir():
        pytest.skip(f"real OASIS data not available: {folder.resolve()} is absent (see ../shared/data/README.md)")
    return folder


@pytest.fixture(scope="session")
def two_level_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, run directory) of one TINY_TWO_LEVEL run on 32x32 slices with axial levels (the default's
    priors are level-conditioned), trained once per test session."""
    base = tmp_path_factory.mktemp("two_level_run")
    data = make_brain_slices(base / "slices", size=32, course_names=True)
    run = base / "run"
    result = run_script("train.py", "--data", data, "--cache", base / "cache", "--out", run, *TINY_TWO_LEVEL,
                        "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "VQ-VAE: 1 epochs in bfloat16 mixed precision" in result.stdout
    assert json.loads((run / "summary.json").read_text())["vqvae_precision"] == "bfloat16"
    return data, run


def made_once_per_session(tmp_path_factory, name: str, make) -> Path:
    """The folder `name` that `make(folder)` fills once per test session, however many xdist workers ask for it (a
    fixture of scope "session" runs once in each worker): the first to take the lock makes it, the others wait for
    it and share it. What `make` builds must then be read, never changed, by the tests."""
    import fcntl
    import shutil

    base = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        base = base.parent  # the session's temporary folder, which holds each worker's own
    folder, done = base / name, base / f"{name}.done"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if `make` fails
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a worker whose `make` failed left
            make(folder)
            done.touch()
    return folder


def train_seed_run(base: Path) -> None:
    """A 2 + 2 epoch seed-preset run in `base`/run on slices in `base`/slices, with --data given relative to the
    project root, as users give it, and into a folder that an earlier attempt left with a config.json and a
    state.json but no finished epoch (which must not block the run)."""
    data = make_brain_slices(base / "slices")
    run = base / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text('{"left": "by a run that failed before its first epoch"}')
    (run / "checkpoints" / "state.json").write_text(json.dumps(
        {"history": {"vqvae": [], "prior": []}, "checkpoint": {}, "best_saved": {}}))
    (run / "checkpoints" / "vqvae_epoch001.keras").write_bytes(b"never committed")
    result = run_script("train.py", "--data", os.path.relpath(data, PROJECT_ROOT), "--cache", base / "cache",
                        "--out", run, *SEED_FLAGS, "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, run directory) of conftest.train_seed_run, trained once per test session and shared by the
    xdist workers (test_train.py, test_reliability.py and test_predict.py read it)."""
    base = made_once_per_session(tmp_path_factory, "seed_run", train_seed_run)
    return base / "slices", base / "run"
