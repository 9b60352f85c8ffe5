"""rundir.py, the run directory's one home: the atomic write, which process writes, whether a folder holds a run,
reading config.json, and that no other file of the project spells a run-file name."""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT


@pytest.fixture
def calls(monkeypatch):
    """Every os.fsync (by the path of the flushed file) and os.replace, in order."""
    record = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        record.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(source, destination):
        record.append(("replace", str(source), str(destination)))
        return real_replace(source, destination)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return record


def flushed_before_renamed(calls: list, path: Path) -> bool:
    """Whether the temporary file renamed onto `path` was fsynced before that rename."""
    renames = [index for index, call in enumerate(calls) if call[0] == "replace" and call[2] == str(path)]
    if not renames:
        return False
    source = calls[renames[-1]][1]
    return ("fsync", source) in calls[:renames[-1]]


@pytest.mark.parametrize("by_name", [False, True])
def test_atomic_write_flushes_the_file_before_the_rename(by_name, tmp_path, calls):
    from rundir import atomic_write

    target = tmp_path / "model.keras"

    def by_path(name):  # a writer that opens the file itself, as Keras does
        assert name.endswith(".keras")
        Path(name).write_bytes(b"new")

    atomic_write(target, by_path if by_name else (lambda out: out.write(b"new")), by_name=by_name)
    assert target.read_bytes() == b"new"
    assert flushed_before_renamed(calls, target)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.keras"]


def test_atomic_write_that_fails_keeps_the_old_file_and_no_temporary(tmp_path):
    from rundir import atomic_write

    target = tmp_path / "config.json"
    target.write_text("old")

    def failing(out):
        out.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, failing)
    assert target.read_text() == "old" and sorted(path.name for path in tmp_path.iterdir()) == ["config.json"]


def test_curve_plots_are_flushed_before_their_rename(tmp_path, calls):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rundir import RunDir

    run = RunDir(tmp_path)
    figure = plt.figure()
    run.write_curves("vqvae", figure)
    plt.close(figure)
    assert run.curves_path("vqvae").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert flushed_before_renamed(calls, run.curves_path("vqvae"))


CLUSTER = {"worker": ["a:1", "b:2"]}


@pytest.mark.parametrize("tf_config, chief", [
    (None, True),
    ({"cluster": CLUSTER, "task": {"type": "worker", "index": 0}}, True),
    ({"cluster": CLUSTER, "task": {"type": "worker", "index": 1}}, False),
    ({"cluster": {**CLUSTER, "chief": ["c:3"]}, "task": {"type": "worker", "index": 0}}, False),
    ({"cluster": {**CLUSTER, "chief": ["c:3"]}, "task": {"type": "chief", "index": 0}}, True),
])
def test_is_chief_only_for_the_chief_task_or_worker_0(tf_config, chief):
    from rundir import is_chief

    assert is_chief(tf_config) is chief


def committed_state(epochs: int) -> str:
    return json.dumps({"history": {"vqvae": [{"epoch": n + 1} for n in range(epochs)]}, "checkpoint": {}})


@pytest.mark.parametrize("files, holds", [
    ({}, False),
    ({"config.json": "{}"}, False),
    ({"config.json": "{}", "checkpoints/state.json": committed_state(0)}, False),
    ({"config.json": "{}", "checkpoints/state.json": committed_state(1)}, True),
    ({"config.json": "{}", "checkpoints/state.json": '{"history": '}, True),  # damaged: never guess
    ({"config.json": "{}", "vqvae.keras": "x"}, True),  # a run shipped without checkpoints/, like pretrained/
    ({"summary.json": "{}"}, True),
])
def test_holds_finished_epoch(files, holds, tmp_path):
    from rundir import RunDir

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert RunDir(tmp_path).holds_finished_epoch() is holds


def test_create_over_an_unfinished_run_clears_only_run_files(tmp_path):
    from hyperparameters import make_config
    from rundir import RunDir

    for name in ("config.json", "checkpoints/state.json", "checkpoints/vqvae_epoch003.keras",
                 ".history_vqvae.csv.abc.tmp", "logs/train/events", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("left over")
    run = RunDir(tmp_path)
    run.create(make_config("seed"))
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")) == [
        "checkpoints", "config.json", "notes.txt"]
    assert run.read_config() == make_config("seed")
    assert run.created is None  # the folder was there before: a failure never removes it


def test_remove_if_unfinished_removes_only_folders_it_made(tmp_path):
    from hyperparameters import make_config
    from rundir import RunDir

    run = RunDir(tmp_path / "runs" / "today")
    run.create(make_config("seed"))
    assert run.created == tmp_path / "runs"
    assert run.remove_if_unfinished() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("text, match", [
    (None, r"config\.json: missing"),
    ('{"image_size": 12', r"config\.json: cannot be read \(JSONDecodeError\)"),
    ('{"config_version": 99}', r"config\.json: config version 99 is not 2"),
])
def test_read_config_names_the_file_and_the_fault(text, match, tmp_path):
    from cli import UserError
    from rundir import RunDir

    if text is not None:
        (tmp_path / "config.json").write_text(text)
    with pytest.raises(UserError, match=match):
        RunDir(tmp_path).read_config()


def test_summary_records_the_training_levels_that_a_run_without_data_draws_from(tmp_path):
    from rundir import RunDir, level_counts

    run = RunDir(tmp_path)
    assert run.training_levels() == ()  # no summary.json yet: an unfinished run
    levels = [0.5, 0.25, float("nan"), 0.5, 0.123456]  # a lone 2D image's NaN (unknown) is left out
    counts = level_counts(levels)
    assert counts == {"levels": [0.1235, 0.25, 0.5], "slices": [1, 1, 2]}
    run.write_summary({"preset": "default", "training_levels": counts})
    assert RunDir(tmp_path).training_levels() == (0.1235, 0.25, 0.5, 0.5)  # read back in a fresh RunDir
    run.write_summary({"preset": "default"})  # a summary from before the levels were recorded
    assert run.training_levels() == ()


RUN_FILE_NAME = re.compile(r"(config|summary|state)\.json|\.keras$|history_\w*\.csv|_curves\.png|_epoch\d")


def spelled_run_file_names(path: Path) -> list[str]:
    """String constants in the code of `path` (not its docstrings) that spell a run-file name."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings and RUN_FILE_NAME.search(node.value)]


def test_no_file_but_rundir_spells_a_run_file_name():
    sources = [path for path in [*PROJECT_ROOT.glob("*.py"), *PROJECT_ROOT.glob("bench/*.py")]
               if path.name != "rundir.py"]
    assert {"train.py", "predict.py", "time_to_quality.py"} <= {path.name for path in sources}
    spelled = {path.name: names for path in sources if (names := spelled_run_file_names(path))}
    assert spelled == {}


def test_a_missing_run_named_after_a_preset_is_told_to_train_with_that_preset(tmp_path):
    from cli import UserError
    from rundir import load_run

    with pytest.raises(UserError, match=r"python train\.py --data FOLDER --out \S*seed --preset seed$"):
        load_run(tmp_path / "seed")
    with pytest.raises(UserError, match=r"--out \S*mine$"):
        load_run(tmp_path / "mine")
