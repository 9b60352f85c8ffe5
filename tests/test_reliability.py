"""What happens when things go wrong: training killed (SIGKILL) or interrupted (Ctrl-C) mid-phase and resumed,
bad --resume / --out flags, damaged or mismatched run directories given to similarity.py and predict.py, a loss
that turns NaN, files written atomically, reproducible seeds, and model files loaded in Keras safe mode.

Scripts run as real subprocesses on tiny synthetic PNG slices (conftest.make_brain_slices); the interrupted runs use
the `seed` preset shrunk with --set so that an epoch takes a fraction of a second.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from conftest import (RUN_FILES, SEED_FLAGS, assert_clean_usage_error, epochs_of, load_keras,  # noqa: E402
                      make_brain_slices, read_history, run_in_process, run_script, start_script, state_of,
                      wait_for_epochs)

EPOCHS, PRIOR_EPOCHS = 8, 5  # enough that a kill after the first epoch of a phase lands inside it
SMALL_MODEL = ["--preset", "seed", "--seed", "3", "--set", "image_size=64", "--set", "encoder_filters=8,8,16,16",
               "--set", "decoder_filters=16,16,8,8", "--set", "residual_filters=16", "--set", "prior_filters=16",
               "--set", "prior_residual_blocks=1", "--set", "batch_size=4", "--set", "prior_batch_size=4"]


def small_flags(data: Path, cache: Path, out: Path, epochs: int = EPOCHS, prior_epochs: int = PRIOR_EPOCHS):
    return ["--data", data, "--cache", cache, "--out", out, "--epochs", str(epochs),
            "--prior-epochs", str(prior_epochs), *SMALL_MODEL]


# ---------------------------------------------------------------------------------------------------------------
# Interrupted training
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sigkill_run(tmp_path_factory):
    """A run SIGKILLed after its first committed VQ-VAE epoch, with stale files planted, then resumed."""
    base = tmp_path_factory.mktemp("sigkill")
    data, out = make_brain_slices(base / "slices"), base / "run"
    flags = small_flags(data, base / "cache", out)
    process = start_script("train.py", *flags, log=base / "first")
    wait_for_epochs(process, out, "vqvae", 1, base / "first")
    process.kill()
    process.wait(timeout=60)
    at_kill = state_of(out)
    snapshot = base / "at_kill"
    shutil.copytree(out, snapshot)
    # leftovers a resume must never trust: half-written temporary files and a checkpoint state.json does not name
    planted = [out / "checkpoints" / ".vqvae_epoch099.tmp.keras", out / "checkpoints" / "vqvae_epoch099.keras",
               out / ".history_vqvae.csv.x1y2z3.tmp"]
    planted[0].write_bytes(b"PK\x03\x04 half a zip")
    planted[1].write_bytes((out / "checkpoints" / at_kill["checkpoint"]["vqvae"]).read_bytes()[:5000])
    planted[2].write_text("epoch,loss\n1,nan\n")
    resumed = run_script("train.py", *flags, "--resume")
    return {"out": out, "snapshot": snapshot, "at_kill": at_kill, "resumed": resumed, "planted": planted}


@pytest.fixture(scope="module")
def sigint_run(tmp_path_factory):
    """A run interrupted with SIGINT during the VQ-VAE phase, resumed, SIGKILLed during the prior phase, resumed."""
    base = tmp_path_factory.mktemp("sigint")
    data, out = make_brain_slices(base / "slices"), base / "run"
    flags = small_flags(data, base / "cache", out)
    process = start_script("train.py", *flags, log=base / "first")
    wait_for_epochs(process, out, "vqvae", 1, base / "first")
    process.send_signal(signal.SIGINT)
    code = process.wait(timeout=120)
    interrupted = {"returncode": code, "stderr": Path(f"{base / 'first'}.err").read_text(),
                   "state": state_of(out)}
    process = start_script("train.py", *flags, "--resume", log=base / "second")
    wait_for_epochs(process, out, "prior", 1, base / "second")
    process.kill()
    process.wait(timeout=60)
    at_kill = state_of(out)
    shutil.copy(out / "vqvae.keras", base / "vqvae_at_kill.keras")
    resumed = run_script("train.py", *flags, "--resume")
    return {"out": out, "interrupted": interrupted, "at_kill": at_kill, "vqvae_at_kill": base / "vqvae_at_kill.keras",
            "resumed": resumed}


def assert_complete_and_consistent(out: Path, resumed) -> None:
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    state = state_of(out)
    assert epochs_of(out / "history_vqvae.csv") == list(range(1, EPOCHS + 1))
    assert epochs_of(out / "history_prior.csv") == list(range(1, PRIOR_EPOCHS + 1))
    assert [row["epoch"] for row in state["history"]["vqvae"]] == list(range(1, EPOCHS + 1))
    assert not [path.name for path in out.rglob("*") if ".tmp" in path.name]


def test_sigkill_in_vqvae_phase_resumes_without_redoing_or_losing_an_epoch(sigkill_run):
    out, at_kill, resumed = sigkill_run["out"], sigkill_run["at_kill"], sigkill_run["resumed"]
    done = len(at_kill["history"]["vqvae"])
    assert 1 <= done < EPOCHS and not at_kill["history"]["prior"], "the kill must land inside the VQ-VAE phase"
    assert f"resume: {done} of {EPOCHS} VQ-VAE epochs" in resumed.stdout
    assert_complete_and_consistent(out, resumed)
    final = state_of(out)["history"]["vqvae"]
    assert final[:done] == at_kill["history"]["vqvae"]  # the rows from before the kill, unchanged
    csv_before = sigkill_run["snapshot"] / "history_vqvae.csv"
    if csv_before.exists():  # the CSV lags state.json by at most the epoch being committed at the kill
        assert read_history(csv_before) == read_history(out / "history_vqvae.csv")[:len(read_history(csv_before))]


def test_after_sigkill_every_model_file_loads(sigkill_run):
    snapshot = sigkill_run["snapshot"]
    at_kill = sigkill_run["at_kill"]
    models = [path for path in snapshot.rglob("*.keras") if not path.name.startswith(".")]
    assert snapshot / "checkpoints" / at_kill["checkpoint"]["vqvae"] in models
    # vqvae.keras can be absent only when the kill fell between the first commit and the first best-model write
    # (the resume then writes it from the committed checkpoint)
    assert (snapshot / "vqvae.keras") in models or at_kill["best_saved"].get("vqvae") is None
    for path in models:
        load_keras(path)  # raises for a truncated file


def test_resume_ignores_and_removes_half_written_files(sigkill_run):
    resumed = sigkill_run["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for path in sigkill_run["planted"]:
        assert not path.exists(), path
    assert re.search(r"resume: removed \d+ file\(s\)", resumed.stdout)


def test_sigint_exits_130_with_a_resume_hint(sigint_run):
    interrupted, out = sigint_run["interrupted"], sigint_run["out"]
    assert interrupted["returncode"] == 130, interrupted["stderr"][-3000:]
    assert "Traceback" not in interrupted["stderr"]
    assert f"python train.py --resume --out {out}" in interrupted["stderr"]
    assert len(interrupted["state"]["history"]["vqvae"]) >= 1


def test_resume_after_sigint_keeps_every_epoch_once(sigint_run):
    out, before = sigint_run["out"], sigint_run["interrupted"]["state"]["history"]["vqvae"]
    assert_complete_and_consistent(out, sigint_run["resumed"])
    assert state_of(out)["history"]["vqvae"][:len(before)] == before


def test_kill_in_prior_phase_resumes_the_prior_without_retraining_the_vqvae(sigint_run):
    import keras

    import modules  # noqa: F401  (registers the model classes)

    out, at_kill, resumed = sigint_run["out"], sigint_run["at_kill"], sigint_run["resumed"]
    prior_done = len(at_kill["history"]["prior"])
    assert len(at_kill["history"]["vqvae"]) == EPOCHS and 1 <= prior_done < PRIOR_EPOCHS
    assert_complete_and_consistent(out, resumed)
    final = state_of(out)["history"]
    assert final["vqvae"] == at_kill["history"]["vqvae"]
    assert final["prior"][:prior_done] == at_kill["history"]["prior"]
    epoch_lines = re.findall(r"^Epoch (\d+)/(\d+)", resumed.stdout, re.M)
    assert epoch_lines and all(int(total) == PRIOR_EPOCHS for _, total in epoch_lines)  # no VQ-VAE epoch ran
    assert int(epoch_lines[0][0]) == prior_done + 1
    before = keras.saving.load_model(sigint_run["vqvae_at_kill"], compile=False).get_weights()
    after = keras.saving.load_model(out / "vqvae.keras", compile=False).get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_same_seed_gives_identical_first_epoch_losses(sigkill_run, sigint_run):
    """Two separate processes, same flags and --seed, same data: bit-identical first-epoch losses."""
    first = read_history(sigkill_run["out"] / "history_vqvae.csv")[0]
    second = read_history(sigint_run["out"] / "history_vqvae.csv")[0]
    for column in ("loss", "val_loss", "reconstruction_loss", "val_ssim"):
        assert first[column] == second[column], column


# ---------------------------------------------------------------------------------------------------------------
# Bad --resume / --out flags (these fail before TensorFlow starts)
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def hand_made_run(tmp_path):
    """A run directory holding the config.json of `SMALL_MODEL` with EPOCHS + PRIOR_EPOCHS epochs, and a state.json
    that commits one VQ-VAE epoch."""
    from hyperparameters import make_config

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    overrides = SMALL_MODEL[5::2] + [f"epochs={EPOCHS}", f"prior_epochs={PRIOR_EPOCHS}", "seed=3"]
    (run / "config.json").write_text(make_config("seed", overrides).to_json())
    (run / "checkpoints" / "state.json").write_text(json.dumps(
        {"history": {"vqvae": [{"epoch": 1, "loss": 0.5}]}, "checkpoint": {"vqvae": "vqvae_epoch001.keras"}}))
    return run


def test_resume_with_other_hyperparameters_is_refused(hand_made_run, tmp_path):
    flags = small_flags(tmp_path / "slices", tmp_path / "cache", hand_made_run)
    result = run_script("train.py", *flags, "--set", "batch_size=16", "--resume")
    assert_clean_usage_error(result, "--resume", "batch_size", "config.json")
    result = run_script("train.py", "--data", tmp_path, "--out", hand_made_run, "--preset", "default", "--resume",
                        "--epochs", str(EPOCHS), "--prior-epochs", str(PRIOR_EPOCHS), "--seed", "3")
    assert_clean_usage_error(result, "--resume", "config.json", "encoder_filters")
    assert sorted(path.name for path in hand_made_run.rglob("*")) == ["checkpoints", "config.json", "state.json"]


@pytest.mark.parametrize("case", ["nonexistent", "empty", "no --out"])
def test_resume_without_a_run_is_refused(case, tmp_path):
    target = tmp_path / "nothing-here"
    if case == "empty":
        target.mkdir()
    out = [] if case == "no --out" else ["--out", target]
    result = run_script("train.py", "--data", tmp_path, "--preset", "seed", *out, "--resume")
    assert_clean_usage_error(result, "--resume")
    assert not (target / "config.json").exists()


def test_out_under_a_regular_file_is_refused(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_script("train.py", "--data", tmp_path, "--preset", "seed", "--out", blocker / "run")
    assert_clean_usage_error(result, "--out", str(blocker))


def test_out_that_already_holds_a_run_is_not_overwritten(hand_made_run):
    before = (hand_made_run / "config.json").read_bytes()
    result = run_script("train.py", "--data", hand_made_run, "--preset", "seed", "--out", hand_made_run)
    assert_clean_usage_error(result, "--out", "--resume")
    assert (hand_made_run / "config.json").read_bytes() == before


@pytest.mark.parametrize("setting", ["epochs=0", "batch_size=0", "learning_rate=nan", "no_such_key=1"])
def test_impossible_hyperparameters_are_refused(setting, tmp_path):
    result = run_script("train.py", "--data", tmp_path, "--preset", "seed", "--out", tmp_path / "run",
                        "--set", setting)
    assert_clean_usage_error(result, setting.split("=")[0])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [
    (["--set", "foo=1"], "unknown key 'foo'"),
    (["--set", "epoch=3"], "unknown key 'epoch'; did you mean 'epochs'?"),
    (["--set", "epochs=abc"], "epochs expects an integer, got 'abc'"),
    (["--set", "encoder_filters=32,x"], "encoder_filters expects a comma-separated list of integers"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--prior-epochs", "-2"], "--prior-epochs must be at least 1"),
    (["--epochs", "abc"], "argument --epochs: invalid int value: 'abc'"),
])
def test_bad_flag_values_are_one_line_naming_the_flag(flags, message):
    assert_clean_usage_error(run_script("train.py", *flags), message)


@pytest.mark.parametrize("case", ["missing folder", "empty folder"])
def test_bad_data_creates_no_run_directory(case, tmp_path):
    """--data is checked before --out, or the default runs/<timestamp>/, is created."""
    data = tmp_path / "slices"
    if case == "empty folder":
        data.mkdir()
    explicit = run_script("train.py", "--data", data, "--cache", tmp_path / "cache", "--out", tmp_path / "run")
    assert_clean_usage_error(explicit, "--data")
    default = run_script("train.py", "--data", data, "--cache", tmp_path / "cache", cwd=tmp_path)
    assert_clean_usage_error(default, "--data")
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_a_folder_without_a_finished_epoch_does_not_block_a_retry(tmp_path):
    """A failed attempt's config.json and empty state.json: the retry's error is its own (here: the --data), never
    "already holds a run", and the folder is untouched until the retry's input is good."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "checkpoints" / "state.json").write_text('{"history": {"vqvae": [], "prior": []}}')
    result = run_script("train.py", "--data", tmp_path / "typo", "--cache", tmp_path / "cache", "--out", run)
    stderr = assert_clean_usage_error(result, "--data")
    assert "already holds" not in stderr
    assert sorted(path.name for path in run.rglob("*")) == ["checkpoints", "config.json", "state.json"]


def test_resume_with_other_data_is_refused(trained, tmp_path):
    _, run = trained
    other = make_brain_slices(tmp_path / "other", subjects=5)
    before = state_of(run)
    result = run_script("train.py", "--data", other, "--cache", tmp_path / "cache", "--out", run, *SEED_FLAGS,
                        "--resume")
    assert_clean_usage_error(result, "--resume", "--data")
    assert state_of(run) == before


# ---------------------------------------------------------------------------------------------------------------
# Damaged or mismatched run directories given to similarity.py and predict.py
# ---------------------------------------------------------------------------------------------------------------

def lambda_model(path: Path, marker: Path) -> None:
    """A .keras file whose Lambda layer writes `marker` when the model is built: code that runs on loading."""
    import keras

    function = eval(f"lambda x: (open({str(marker)!r}, 'w').write('ran'), x)[1]")  # no closure: serializable
    model = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(function)])
    model.save(path)
    marker.unlink(missing_ok=True)  # building the model above ran it once


def build_bad_run(case: str, seed_dir: Path, base: Path) -> tuple[Path, list[str]]:
    """A run directory with one fault, and the words the one-line error must contain."""
    from hyperparameters import make_config

    run = base / case.replace(" ", "_")
    if case == "missing directory":
        return run, ["no such run directory"]
    run.mkdir(parents=True)
    config = json.loads((seed_dir / "config.json").read_text())
    for name in ("config.json", "vqvae.keras", "pixelcnn.keras"):
        shutil.copy(seed_dir / name, run / name)
    if case == "missing config.json":
        (run / "config.json").unlink()
        return run, ["config.json", "missing"]
    if case == "config.json not JSON":
        (run / "config.json").write_text('{"image_size": 12')
        return run, ["config.json", "retrain"]
    if case == "other config_version":
        (run / "config.json").write_text(json.dumps({**config, "config_version": 99}))
        return run, ["config.json", "version"]
    if case == "missing vqvae.keras":
        (run / "vqvae.keras").unlink()
        return run, ["vqvae.keras", "missing"]
    if case == "truncated vqvae.keras":
        whole = (seed_dir / "vqvae.keras").read_bytes()
        (run / "vqvae.keras").write_bytes(whole[:len(whole) // 2])
        return run, ["vqvae.keras", "cannot be loaded"]
    if case == "vqvae.keras of another preset":
        (run / "config.json").write_text(make_config("default").to_json())
        return run, ["vqvae.keras", "differ"]
    if case == "Lambda layer (safe mode)":
        lambda_model(run / "vqvae.keras", base / "lambda_ran")
        return run, ["vqvae.keras", "cannot be loaded"]
    if case == "predict: missing pixelcnn.keras":
        (run / "pixelcnn.keras").unlink()
        return run, ["pixelcnn.keras", "missing"]
    if case == "predict: truncated pixelcnn.keras":
        whole = (seed_dir / "pixelcnn.keras").read_bytes()
        (run / "pixelcnn.keras").write_bytes(whole[:len(whole) // 2])
        return run, ["pixelcnn.keras", "cannot be loaded"]
    raise ValueError(case)


BAD_RUNS = ["missing directory", "missing config.json", "config.json not JSON", "other config_version",
            "missing vqvae.keras", "truncated vqvae.keras", "vqvae.keras of another preset",
            "Lambda layer (safe mode)", "predict: missing pixelcnn.keras", "predict: truncated pixelcnn.keras"]


def bad_run_command(case: str, run: Path, data: Path, base: Path) -> tuple[str, list]:
    if case.startswith("predict"):
        return "predict.py", ["--run", run, "--data", data, "--cache", base / "cache", "--split", "all",
                              "--out", base / "predictions"]
    return "similarity.py", ["--run", run, "--data", data, "--cache", base / "cache", "--split", "all",
                             "--json", base / "never.json"]


@pytest.mark.parametrize("case", BAD_RUNS)
def test_bad_run_directory_exits_2_with_one_line(case, trained, tmp_path, monkeypatch, capfd):
    data, seed_dir = trained
    run, words = build_bad_run(case, seed_dir, tmp_path)
    script, argv = bad_run_command(case, run, data, tmp_path)
    assert_clean_usage_error(run_in_process(script, argv, monkeypatch, capfd), *words)
    assert not (tmp_path / "never.json").exists() and not (tmp_path / "predictions").exists()
    if case.startswith("Lambda"):
        assert not (tmp_path / "lambda_ran").exists(), "loading the run executed the Lambda layer's code"


def test_bad_run_directories_as_real_processes(trained, tmp_path):
    """The same, for two of the cases, as real subprocesses (run side by side): nothing else reaches stderr."""
    import subprocess
    import sys

    from conftest import PROJECT_ROOT, subprocess_env

    data, seed_dir = trained
    processes = {}
    for case in ("truncated vqvae.keras", "Lambda layer (safe mode)"):
        run, words = build_bad_run(case, seed_dir, tmp_path)
        script, argv = bad_run_command(case, run, data, tmp_path)
        processes[case] = (subprocess.Popen([sys.executable, script, *map(str, argv)], cwd=PROJECT_ROOT,
                                            env=subprocess_env(), text=True, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE), words)
    for case, (process, words) in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        assert_clean_usage_error(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr),
                                 *words)
    assert not (tmp_path / "lambda_ran").exists()


@pytest.mark.parametrize("script, flag", [("similarity.py", "--json"), ("similarity.py", "--csv"),
                                          ("similarity.py", "--plot"), ("predict.py", "--out")])
def test_unwritable_outputs_are_refused_before_any_work(script, flag, trained, tmp_path, monkeypatch, capfd):
    data, run = trained
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    target = blocker if flag == "--out" else blocker / "result"
    argv = ["--run", run, "--data", data, "--cache", tmp_path / "cache", "--split", "all", flag, target]
    result = run_in_process(script, argv, monkeypatch, capfd)
    assert_clean_usage_error(result, flag, "is a file")
    assert not (tmp_path / "cache").exists()  # refused before the data was even read


def test_the_lambda_file_would_run_code_outside_safe_mode(tmp_path):
    """The control for the safe-mode case above: the same file, loaded unsafely, runs its code."""
    import keras

    marker = tmp_path / "ran"
    lambda_model(tmp_path / "lambda.keras", marker)
    assert not marker.exists()
    with pytest.raises(ValueError, match="deserialization of a `Lambda` layer"):
        keras.saving.load_model(tmp_path / "lambda.keras", safe_mode=True)
    assert not marker.exists()
    keras.saving.load_model(tmp_path / "lambda.keras", safe_mode=False)
    assert marker.exists()


def test_load_run_always_uses_safe_mode(trained, monkeypatch):
    import keras

    import modules

    calls = []
    real = keras.saving.load_model

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(keras.saving, "load_model", spy)
    modules.load_run(trained[1], need_prior=True)
    assert len(calls) == 2 and all(call.get("safe_mode") is True for call in calls)


# ---------------------------------------------------------------------------------------------------------------
# A loss that turns NaN, and atomic writes
# ---------------------------------------------------------------------------------------------------------------

def test_learning_rate_1e9_stops_with_a_clear_message_and_exit_1_and_leaves_no_run(tmp_path):
    """The (small) seed preset diverges in its first epoch at this rate; nothing NaN may be saved as a model, and
    the default run folder (runs/<timestamp>/ under the working directory), with no epoch in it, is removed."""
    data = make_brain_slices(tmp_path / "slices")
    result = run_script("train.py", "--data", data, "--cache", tmp_path / "cache", *SMALL_MODEL, "--epochs", "3",
                        "--set", "learning_rate=1e9", cwd=tmp_path)
    assert result.returncode == 1, (result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    assert "run runs/" in result.stdout  # the run folder existed while training
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "NaN or infinite" in errors[0] and "learning_rate=1e+08" in errors[0], errors
    assert "none was saved" in errors[0]
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def poisoned_prior_run(tmp_path_factory):
    """train.main in this process, with the PixelCNN's weights turned NaN from its second epoch on, and every
    os.replace recorded."""
    import tensorflow as tf

    import modules
    import train

    base = tmp_path_factory.mktemp("poisoned")
    data, out = make_brain_slices(base / "slices"), base / "run"
    poison = tf.Variable(False, trainable=False)
    replaced, flushed = [], set()
    real_replace, real_fsync, real_checkpointer = os.replace, os.fsync, train.epoch_checkpointer
    real_step = modules.PixelCNN.train_step

    def spy_replace(source, destination, *args, **kwargs):
        replaced.append((Path(source).resolve(), Path(destination).resolve()))
        return real_replace(source, destination, *args, **kwargs)

    def spy_fsync(fd):
        flushed.add(Path(os.readlink(f"/proc/self/fd/{fd}")).resolve())
        return real_fsync(fd)

    def checkpointer(phase, *args):
        callback = real_checkpointer(phase, *args)
        if phase == "prior":
            commit = callback.on_epoch_end

            def on_epoch_end(epoch, logs=None):
                commit(epoch, logs)
                poison.assign(True)  # every later step of the prior trains NaN weights

            callback.on_epoch_end = on_epoch_end
        return callback

    def poisoned_step(self, batch):
        bias = self.head.bias
        bias.assign(tf.where(poison, tf.fill(bias.shape, float("nan")), bias))
        return real_step(self, batch)

    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(stderr):
        patch.setattr(os, "replace", spy_replace)
        patch.setattr(os, "fsync", spy_fsync)
        patch.setattr(train, "epoch_checkpointer", checkpointer)
        patch.setattr(modules.PixelCNN, "train_step", poisoned_step)
        code = train.main([str(flag) for flag in small_flags(data, base / "cache", out, 2, 4)] + ["--verbose", "0"])
    return {"code": code, "stderr": stderr.getvalue(), "out": out, "replaced": replaced, "flushed": flushed}


def test_nan_in_the_prior_stops_with_exit_1_and_keeps_the_last_good_checkpoint(poisoned_prior_run):
    import modules

    out = poisoned_prior_run["out"]
    assert poisoned_prior_run["code"] == 1
    errors = [line for line in poisoned_prior_run["stderr"].splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "PixelCNN" in errors[0] and "epoch 2" in errors[0], errors
    assert "prior_learning_rate=" in errors[0]
    state = state_of(out)
    assert len(state["history"]["vqvae"]) == 2 and len(state["history"]["prior"]) == 1
    assert epochs_of(out / "history_prior.csv") == [1]
    assert not (out / "summary.json").exists()
    for path in (out / "vqvae.keras", out / "pixelcnn.keras"):
        assert all(np.isfinite(weight).all() for weight in load_keras(path).get_weights()), path
    import keras

    checkpoint = keras.saving.load_model(out / "checkpoints" / state["checkpoint"]["prior"], safe_mode=True,
                                         custom_objects={"bits_per_code": modules.bits_metric})
    assert all(np.isfinite(weight).all() for weight in checkpoint.get_weights())


def test_every_run_file_is_flushed_to_disk_then_renamed_into_place(poisoned_prior_run):
    """Each file train.py leaves in the run directory (curve plots included) was written to a temporary name,
    fsynced, and renamed into place."""
    out = poisoned_prior_run["out"]
    files = [path.resolve() for path in out.rglob("*") if path.is_file()]
    assert {path.name for path in files} >= {"config.json", "state.json", "vqvae.keras", "pixelcnn.keras",
                                             "history_vqvae.csv", "history_prior.csv", "vqvae_curves.png"}
    renamed = {destination: source for source, destination in poisoned_prior_run["replaced"]}
    assert [str(path.relative_to(out.resolve())) for path in files if path not in renamed] == []
    not_flushed = [path.name for path in files if renamed[path] not in poisoned_prior_run["flushed"]]
    assert not_flushed == []
    assert not [path.name for path in files if ".tmp" in path.name]


def test_ctrl_c_during_an_epoch_commit_is_held_until_the_commit_ends():
    import train

    outer = signal.signal(signal.SIGINT, signal.default_int_handler)  # ignored when the suite runs in background
    try:
        steps = []
        with pytest.raises(KeyboardInterrupt):
            with train.sigint_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                steps.append("state.json written")
        assert steps == ["state.json written"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)
