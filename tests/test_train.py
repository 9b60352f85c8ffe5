"""The happy path of the command-line pipeline on tiny synthetic data: train.py makes a complete run directory,
similarity.py scores it, predict.py reconstructs and generates with it.

Each script runs as a real subprocess from the project root, as a user would run it. The run is made once per
test session (`seed_run`) and shared with tests/test_reliability.py, which imports the helpers below.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# The `seed` preset (the founding report's architecture) at small batches: about 20 s for 2 + 2 epochs on 2 cores.
SEED_FLAGS = ["--preset", "seed", "--epochs", "2", "--prior-epochs", "2", "--set", "batch_size=8",
              "--set", "prior_batch_size=8"]
RUN_FILES = ["config.json", "vqvae.keras", "pixelcnn.keras", "history_vqvae.csv", "history_prior.csv",
             "vqvae_curves.png", "prior_curves.png", "summary.json"]


# ---------------------------------------------------------------------------------------------------------------
# Helpers (also used by test_reliability.py)
# ---------------------------------------------------------------------------------------------------------------

def make_brain_slices(folder: Path, subjects: int = 6, per_subject: int = 2, size: int = 64) -> Path:
    """`subjects` x `per_subject` 8-bit PNG slices named OAS1_000N_MR1_slice_K.png: a bright textured ellipse
    ("brain") with a darker inner ellipse ("ventricles") on black, different per subject and slice."""
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
            pixels.save(folder / f"OAS1_{subject:04d}_MR1_slice_{index}.png")
    return folder


def script_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("TF_CONFIG", None)
    return env


def run_script(script: str, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` from the project root; returns the finished process with text stdout/stderr."""
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=script_env(),
                          capture_output=True, text=True, timeout=timeout)


def start_script(script: str, *args, log: Path) -> subprocess.Popen:
    """Starts `python SCRIPT ARGS` in the background, stdout and stderr into `log`.out / `log`.err."""
    with open(f"{log}.out", "w") as stdout, open(f"{log}.err", "w") as stderr:  # the child keeps its own copies
        return subprocess.Popen([sys.executable, script, *map(str, args)], cwd=ROOT, env=script_env(),
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


_RUNS: dict[str, tuple[Path, Path]] = {}


def seed_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, run directory) of one 2 + 2 epoch seed-preset run, trained once per test session."""
    if "seed" not in _RUNS:
        base = tmp_path_factory.mktemp("seed_run")
        data = make_brain_slices(base / "slices")
        run = base / "run"
        result = run_script("train.py", "--data", data, "--cache", base / "cache", "--out", run, *SEED_FLAGS)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        _RUNS["seed"] = (data, run)
    return _RUNS["seed"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    return seed_run(tmp_path_factory)


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------

def test_train_writes_a_complete_run_directory(trained):
    from hyperparameters import make_config

    _, run = trained
    for name in RUN_FILES:
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    config = json.loads((run / "config.json").read_text())
    assert config == make_config("seed", ["batch_size=8", "prior_batch_size=8", "epochs=2",
                                          "prior_epochs=2"]).to_dict()
    for phase in ("vqvae", "prior"):
        rows = read_history(run / f"history_{phase}.csv")
        assert [row["epoch"] for row in rows] == ["1", "2"]
        assert all(np.isfinite(float(row["loss"])) for row in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["vqvae"]["epochs"] == 2 and summary["prior"]["epochs"] == 2
    assert sum(summary["slices"].values()) == 12
    # the checkpoints folder holds exactly the committed last epoch of each phase, and nothing half-written
    state = json.loads((run / "checkpoints" / "state.json").read_text())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(
        ["state.json", state["checkpoint"]["vqvae"], state["checkpoint"]["prior"]])
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]


def test_similarity_writes_the_json_summary(trained, tmp_path):
    data, run = trained
    out = tmp_path / "scores.json"
    result = run_script("similarity.py", "--run", run, "--data", data, "--cache", tmp_path / "cache",
                        "--split", "all", "--json", out, "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["n"] == 12
    assert set(report["ssim"]) >= {"mean", "std", "median", "min", "max", "frac_above_0.6"}
    ssim = report["ssim"]
    assert -1 <= ssim["min"] <= ssim["median"] <= ssim["max"] <= 1 and ssim["std"] >= 0
    assert 0 <= ssim["frac_above_0.6"] <= 1
    assert np.isfinite(report["psnr"]["mean"])
    assert (report["run"], report["data"], report["split"]) == (str(run), str(data), "all")
    assert "SSIM mean" in result.stdout


def test_predict_writes_figures_samples_and_generation_json(trained, tmp_path):
    from PIL import Image

    data, run = trained
    out = tmp_path / "predictions"
    result = run_script("predict.py", "--run", run, "--data", data, "--cache", tmp_path / "cache", "--split", "all",
                        "--num", "4", "--out", out, "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("reconstructions.png", "generated.png", "generation.json"):
        assert (out / name).is_file(), name
    samples = sorted((out / "generated").glob("sample_*.png"))
    assert [path.name for path in samples] == [f"sample_{index:03d}.png" for index in range(4)]
    assert Image.open(samples[0]).size == (128, 128)
    report = json.loads((out / "generation.json").read_text())
    assert report["num"] == 4 and report["split"] == "all" and np.isfinite(report["prior_bits_per_code"])


def test_vqvae_from_trains_only_a_new_prior_on_the_same_vqvae(trained, tmp_path):
    data, source = trained
    gated = ["--set", "prior_layout=gated", "--set", "prior_filters=16"]
    run = tmp_path / "gated"
    result = run_script("train.py", "--data", data, "--cache", tmp_path / "cache", "--out", run, "--vqvae-from",
                        source, *SEED_FLAGS, *gated)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "vqvae.keras").read_bytes() == (source / "vqvae.keras").read_bytes()
    assert read_history(run / "history_vqvae.csv") == read_history(source / "history_vqvae.csv")
    assert [row["epoch"] for row in read_history(run / "history_prior.csv")] == ["1", "2"]
    assert json.loads((run / "config.json").read_text())["prior_layout"] == "gated"
    assert json.loads((run / "summary.json").read_text())["vqvae_from"] == str(source)
    out = tmp_path / "predictions"
    result = run_script("predict.py", "--run", run, "--num", "2", "--out", out, "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((out / "generated").glob("sample_*.png"))) == 2

    other = run_script("train.py", "--data", data, "--out", tmp_path / "other", "--vqvae-from", source,
                       *SEED_FLAGS, "--set", "latent_dim=8")
    assert_clean_usage_error(other, "--vqvae-from", "latent_dim")
    missing = run_script("train.py", "--data", data, "--out", tmp_path / "other", "--vqvae-from", tmp_path / "nope",
                         *SEED_FLAGS)
    assert_clean_usage_error(missing, "--vqvae-from", "config.json")
    fewer = make_brain_slices(tmp_path / "fewer", subjects=4)
    moved = run_script("train.py", "--data", fewer, "--cache", tmp_path / "cache", "--out", tmp_path / "other",
                       "--vqvae-from", source, *SEED_FLAGS)
    assert_clean_usage_error(moved, "--vqvae-from", "--data")
