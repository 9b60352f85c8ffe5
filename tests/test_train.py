"""The happy path of the command-line pipeline on tiny synthetic data: train.py makes a complete run directory,
similarity.py scores it, predict.py reconstructs and generates with it; and what train.py's command line offers.

Each script runs as a real subprocess from the project root, as a user would run it. The run is made once per
test session (the `trained` fixture of conftest.py) and shared with tests/test_reliability.py.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from conftest import (PROJECT_ROOT, RUN_FILES, SEED_FLAGS, TINY_REFINER, TINY_TWO_LEVEL, assert_clean_usage_error,
                      epochs_of, make_brain_slices, read_history, read_strict_json, run_in_process,
                      run_script, start_script, state_of, wait_for_epochs)

ROOT = PROJECT_ROOT


def absolute_strings(value) -> list[str]:
    """Every string in a parsed JSON value that is an absolute path."""
    if isinstance(value, dict):
        return [text for item in value.values() for text in absolute_strings(item)]
    if isinstance(value, list):
        return [text for item in value for text in absolute_strings(item)]
    return [value] if isinstance(value, str) and os.path.isabs(value) else []


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------

def test_train_writes_a_complete_run_directory(trained):
    from hyperparameters import make_config

    _, run = trained
    for name in RUN_FILES:
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    config = json.loads((run / "config.json").read_text())
    assert config == make_config("seed", ["batch_size=8", "prior_batch_size=8", "epochs=2", "prior_epochs=2",
                                          "top_prior_epochs=2"]).to_dict()
    for phase in ("vqvae", "prior"):
        rows = read_history(run / f"history_{phase}.csv")
        assert [row["epoch"] for row in rows] == ["1", "2"]
        assert all(np.isfinite(float(row["loss"])) for row in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["vqvae"]["epochs"] == 2 and summary["priors"]["bottom"]["epochs"] == 2
    assert sum(summary["slices"].values()) == 12 and summary["subjects"]["excluded"] == []
    assert summary["training_levels"] == {"levels": [], "slices": []}  # these slices' names give no level
    # the checkpoints folder holds exactly the committed last epoch of each phase, and nothing half-written
    state = state_of(run)
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
    assert report["num"] == 4 and report["split"] == "all"
    assert list(report["prior_bits_per_code"]) == ["bottom"]  # by code grid; the seed preset has one
    assert np.isfinite(report["prior_bits_per_code"]["bottom"])


def test_vqvae_from_trains_only_a_new_prior_on_the_same_vqvae(trained, tmp_path, monkeypatch, capfd):
    """The new prior also trains in bfloat16 when asked (prior_precision), said, recorded, and loads in predict.py."""
    data, source = trained
    gated = ["--set", "prior_layout=gated", "--set", "prior_filters=16", "--set", "prior_precision=bfloat16"]
    run = tmp_path / "gated"
    relative_source = os.path.relpath(source, PROJECT_ROOT)  # as users type it; the run records it so
    result = run_script("train.py", "--data", data, "--cache", tmp_path / "cache", "--out", run, "--vqvae-from",
                        relative_source, *SEED_FLAGS, *gated)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "vqvae.keras").read_bytes() == (source / "vqvae.keras").read_bytes()
    assert read_history(run / "history_vqvae.csv") == read_history(source / "history_vqvae.csv")
    assert [row["epoch"] for row in read_history(run / "history_prior.csv")] == ["1", "2"]
    assert json.loads((run / "config.json").read_text())["prior_layout"] == "gated"
    assert json.loads((run / "summary.json").read_text())["vqvae_from"] == relative_source
    assert json.loads((run / "summary.json").read_text())["prior_precision"] == "bfloat16"
    assert "PixelCNN prior: 2 epochs in bfloat16 mixed precision" in result.stdout
    out = tmp_path / "predictions"
    result = run_in_process("predict.py", ["--run", run, "--num", "2", "--out", out, "--no-progress"], monkeypatch,
                            capfd)
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


def test_vqvae_from_takes_a_finished_run_copied_without_its_checkpoints(trained, tmp_path):
    """As pretrained/ ships: the run's files without checkpoints/ still lend their VQ-VAE to new priors."""
    data, source = trained
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for name in RUN_FILES:
        (shipped / name).write_bytes((source / name).read_bytes())
    run = tmp_path / "new_priors"
    result = run_script("train.py", "--data", data, "--cache", tmp_path / "cache", "--out", run, "--vqvae-from",
                        shipped, *SEED_FLAGS, "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "VQ-VAE: all 2 epochs already done" in result.stdout
    assert (run / "vqvae.keras").read_bytes() == (source / "vqvae.keras").read_bytes()
    assert read_history(run / "history_vqvae.csv") == read_history(source / "history_vqvae.csv")
    assert [row["epoch"] for row in read_history(run / "history_prior.csv")] == ["1", "2"]
    (shipped / "summary.json").unlink()
    unfinished = run_script("train.py", "--data", data, "--out", tmp_path / "other", "--vqvae-from", shipped,
                            *SEED_FLAGS)
    assert_clean_usage_error(unfinished, "--vqvae-from", "state.json")


def test_keep_top_or_bottom_prior_trains_only_the_other_prior_under_the_source_runs_kept_one(two_level_run, tmp_path,
                                                                                            monkeypatch, capfd):
    """--vqvae-from RUN --keep-top-prior copies RUN's VQ-VAE and top prior and trains only the bottom prior (here a
    wider one); --keep-bottom-prior copies the bottom prior and trains only the top one (here a wider one with a
    condition mixer, on deformed copies of the slices too); predict.py samples both
    mixed runs. A kept prior's field that differs from RUN's, a keep flag without --vqvae-from, or both keep flags
    without refiner epochs are refused with one line before anything is created."""
    data, source = two_level_run
    kept_files = {"--keep-top-prior": ("pixelcnn_top.keras", "history_prior_top.csv"),
                  "--keep-bottom-prior": ("pixelcnn.keras", "history_prior.csv")}
    for flag, changes, done_line, record in (
            ("--keep-top-prior", ["prior_filters=12"], "top-grid PixelCNN prior: all 1 epochs", "top_prior_from"),
            ("--keep-bottom-prior", ["top_prior_filters=12", "top_prior_deformed_copies=2",
                                     "top_prior_condition_layers=1"],
             "\nPixelCNN prior: all 1 epochs", "bottom_prior_from")):
        run = tmp_path / flag.strip("-")
        result = run_script("train.py", "--data", data, "--out", run, "--vqvae-from", source, flag,
                            *TINY_TWO_LEVEL, *[word for change in changes for word in ("--set", change)],
                            "--no-progress")
        assert result.returncode == 0, result.stderr[-3000:]
        assert done_line in result.stdout
        for name in ("vqvae.keras", *kept_files[flag]):
            assert (run / name).read_bytes() == (source / name).read_bytes(), name
        other = next(name for key, (name, _) in kept_files.items() if key != flag)
        assert (run / other).read_bytes() != (source / other).read_bytes()
        saved = json.loads((run / "config.json").read_text())
        assert all(saved[key] == int(value) for key, value in (change.split("=") for change in changes))
        summary = json.loads((run / "summary.json").read_text())
        assert summary[record] == str(source) and summary["vqvae_from"] == str(source)
        out = tmp_path / f"predictions_{flag.strip('-')}"
        result = run_in_process("predict.py", ["--run", run, "--num", "2", "--out", out, "--no-progress"],
                                monkeypatch, capfd)
        assert result.returncode == 0, result.stderr[-3000:]
        assert len(list((out / "generated").glob("sample_*.png"))) == 2
    other = tmp_path / "other"
    refused = [(("--keep-top-prior", "--set", "prior_dropout=0.3"), ("--keep-top-prior", "prior_dropout")),
               (("--keep-bottom-prior", "--set", "prior_filters=12"), ("--keep-bottom-prior", "prior_filters",
                                                                       "top_prior_filters")),
               (("--keep-top-prior", "--keep-bottom-prior"), ("--keep-top-prior", "--keep-bottom-prior"))]
    for flags, words in refused:
        result = run_script("train.py", "--data", data, "--out", other, "--vqvae-from", source, *TINY_TWO_LEVEL,
                            *flags)
        assert_clean_usage_error(result, *words)
    alone = run_script("train.py", "--data", data, "--out", other, "--keep-bottom-prior")
    assert_clean_usage_error(alone, "--keep-bottom-prior", "--vqvae-from")
    assert not other.exists()


def test_a_refiner_trains_alone_on_kept_priors_resumes_after_sigkill_and_predict_refines_with_it(
        two_level_run, tmp_path, monkeypatch, capfd):
    """--keep-top-prior --keep-bottom-prior with refiner epochs trains only the refiner on the source run's models.
    SIGKILLed after its first committed epoch, it resumes from its checkpoint (optimizer and critic included): every
    epoch once, none of the earlier phases retrained. predict.py, in a fresh process, refines its samples and
    --no-refine (in this one) shows the decoder's slices of the same seed, each at the --level asked. (The other kills
    are in test_reliability.py; this one is here beside the other runs derived from two_level_run, which each xdist
    worker trains once.)"""
    data, source = two_level_run
    run, epochs = tmp_path / "refined", 10  # the kill, after the first committed epoch, lands inside the phase
    flags = ["train.py", "--data", data, "--out", run, "--vqvae-from", source, "--keep-top-prior",
             "--keep-bottom-prior", *TINY_TWO_LEVEL, "--refiner-epochs", str(epochs), *TINY_REFINER, "--no-progress"]
    process = start_script(*flags, log=tmp_path / "killed")
    wait_for_epochs(process, run, "refiner", 1, tmp_path / "killed")
    process.kill()
    process.wait()
    first = (tmp_path / "killed.out").read_text()
    assert "PixelCNN prior: all 1 epochs" in first and f"refiner: {epochs} epochs" in first
    done = len(state_of(run)["history"]["refiner"])
    assert 1 <= done < epochs
    resumed = run_script(*flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resume: {done} of {epochs} refiner epochs done" in resumed.stdout
    assert "PixelCNN prior: all 1 epochs already done" in resumed.stdout
    for name in ("vqvae.keras", "pixelcnn_top.keras", "pixelcnn.keras"):
        assert (run / name).read_bytes() == (source / name).read_bytes(), name
    assert epochs_of(run / "history_refiner.csv") == list(range(1, epochs + 1))
    assert (run / "refiner_curves.png").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["refiner"]["epochs"] == epochs and np.isfinite(summary["refiner"]["refiner_loss"])
    assert json.loads((run / "config.json").read_text())["refiner_epochs"] == epochs
    samples = {}
    for name, extra in (("refined", []), ("plain", ["--no-refine"])):
        out = tmp_path / name
        argv = ["--run", run, "--num", "3", "--seed", "1", "--level", "0.5", "--out", out, "--no-progress", *extra]
        result = run_in_process("predict.py", argv, monkeypatch, capfd) if extra else run_script("predict.py", *argv)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads((out / "generation.json").read_text())
        assert report["refined"] is (name != "plain") and report["levels"]["of_each"] == [0.5] * 3
        samples[name] = [path.read_bytes() for path in sorted((out / "generated").glob("sample_*.png"))]
    assert len(samples["refined"]) == 3
    assert all(refined != plain for refined, plain in zip(samples["refined"], samples["plain"]))


def test_a_run_without_a_bottom_prior_decodes_its_top_samples_over_random_bottom_codes(two_level_run, tmp_path,
                                                                                      monkeypatch, capfd):
    """prior_epochs=0 (the default's): --vqvae-from RUN --keep-top-prior trains no bottom prior and the run holds
    none; predict.py, in fresh processes, draws from the same seed the same slices as RUN itself draws with
    --random-bottom (so a seed reproduces them), other slices from another seed (in this process), and scores bits
    per code of the top grid only; the levels are drawn from the training slices', and --sweep draws sweep.png
    beside other slices; --top-p (a bottom prior's nucleus) and --keep-bottom-prior are refused in one line."""
    data, source = two_level_run
    run = tmp_path / "top_only"
    result = run_script("train.py", "--data", data, "--out", run, "--vqvae-from", source, "--keep-top-prior",
                        *TINY_TWO_LEVEL, "--set", "prior_epochs=0", "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "top-grid PixelCNN prior: all 1 epochs" in result.stdout and "\nPixelCNN prior" not in result.stdout
    assert not (run / "pixelcnn.keras").exists() and not (run / "history_prior.csv").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["priors"]) == ["top"]
    # the training slices' levels, which predict.py draws from where the data is absent
    assert [round(level * 31) for level in summary["training_levels"]["levels"]] == [8, 20]
    assert sum(summary["training_levels"]["slices"]) == summary["slices"]["train"]
    samples = {}
    for name, flags in (("first", [run, "--seed", "1"]), ("other", [run, "--seed", "2", "--sweep", "2"]),
                        ("source", [source, "--seed", "1", "--random-bottom"])):
        out = tmp_path / name
        argv = ["--run", *flags, "--num", "3", "--out", out, "--no-progress"]
        result = (run_in_process("predict.py", argv, monkeypatch, capfd) if name == "other"
                  else run_script("predict.py", *argv))
        assert result.returncode == 0, result.stderr[-3000:]
        samples[name] = [path.read_bytes() for path in sorted((out / "generated").glob("sample_*.png"))]
        report = read_strict_json(out / "generation.json")  # figures of slices without tissue are skipped, not NaN
        assert report["bottom_codes"] == "random" and list(report["prior_bits_per_code"]) == ["top"]
        assert {round(level * 31) for level in report["levels"]["of_each"]} <= {8, 20}  # conftest's course slices
        assert (out / "sweep.png").is_file() is (name == "other")
    assert len(samples["first"]) == 3 and samples["first"] == samples["source"] != samples["other"]
    nucleus = run_in_process("predict.py", ["--run", run, "--top-p", "0.9", "--out", tmp_path / "nucleus"], monkeypatch,
                             capfd)
    assert_clean_usage_error(nucleus, "--top-p", "no bottom prior")
    kept = run_script("train.py", "--data", data, "--out", tmp_path / "kept", "--vqvae-from", source,
                      "--keep-bottom-prior", *TINY_TWO_LEVEL, "--set", "prior_epochs=0")
    assert_clean_usage_error(kept, "--keep-bottom-prior", "prior_epochs=0")
    assert not (tmp_path / "nucleus").exists() and not (tmp_path / "kept").exists()


def test_prior_epochs_flag_sets_each_prior_the_config_trains():
    """--prior-epochs N sets the top prior's epochs, and the bottom prior's only where the config trains one: it
    does not turn on the bottom prior that the default leaves out."""
    from cli import UserError
    from train import build_parser, resolve_config

    def resolved(*flags):
        return resolve_config(build_parser().parse_args(list(flags)))

    default = resolved("--prior-epochs", "3")
    assert (default.top_prior_epochs, default.prior_epochs, default.prior_grids) == (3, 0, ("top",))
    both = resolved("--prior-epochs", "3", "--set", "prior_epochs=1")
    assert (both.top_prior_epochs, both.prior_epochs, both.prior_grids) == (3, 3, ("top", "bottom"))
    assert resolved("--preset", "seed", "--prior-epochs", "3").prior_epochs == 3
    with pytest.raises(UserError, match="prior_epochs=0 .no bottom prior. needs a top grid"):
        resolved("--preset", "seed", "--set", "prior_epochs=0")


def test_a_folder_a_failed_run_left_without_a_finished_epoch_is_started_over(trained):
    """The `trained` run went into a folder that held a failed attempt's config.json, state.json (no epoch) and an
    uncommitted checkpoint: the run started over there instead of asking for --resume."""
    from hyperparameters import CONFIG_VERSION

    _, run = trained
    assert json.loads((run / "config.json").read_text())["config_version"] == CONFIG_VERSION
    assert [row["epoch"] for row in state_of(run)["history"]["vqvae"]] == [1, 2]


def test_run_files_record_paths_as_given_never_absolute(trained):
    data, run = trained
    given = os.path.relpath(data, PROJECT_ROOT)
    summary, state = json.loads((run / "summary.json").read_text()), state_of(run)
    assert summary["data"] == given and state["data"] == given
    for name in ("summary.json", "config.json", "checkpoints/state.json"):
        assert absolute_strings(json.loads((run / name).read_text())) == [], name


def test_help_offers_no_split_flag_and_one_progress_flag():
    """train.py always trains on the train split and validates on the validate split: --split would do nothing."""
    help_text = run_script("train.py", "--help").stdout
    assert "--split" not in help_text and "--no-progress" in help_text and "--verbose" in help_text
    assert "everything random" in help_text
    assert_clean_usage_error(run_script("train.py", "--split", "test"), "unrecognized arguments: --split")


@pytest.mark.parametrize("flags, verbose", [([], 1), (["--no-progress"], 2), (["--verbose", "2"], 2),
                                            (["--verbose", "0"], 0)])
def test_no_progress_gives_one_line_per_epoch_and_verbose_stays_its_alias(flags, verbose, monkeypatch):
    import train

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # on a terminal, progress bars are the default
    assert train.keras_verbosity(train.build_parser().parse_args(flags)) == verbose


@pytest.mark.parametrize("setting, precision, said", [
    ("auto", "bfloat16", "VQ-VAE: 30 epochs in bfloat16 mixed precision (the first step"),
    ("auto", "float32", "VQ-VAE: 30 epochs in float32, as bfloat16 would be emulated here and slower (the first step"),
    ("float32", "float32", "VQ-VAE: 30 epochs (the first step")])
def test_each_phase_says_its_precision_and_why_auto_chose_float32(setting, precision, said, capsys):
    """A run left at vqvae_precision (prior_precision) "auto" on a machine without bfloat16 units trains in float32,
    several times longer than with them: its phase lines say why; float32 set by hand needs no word."""
    from types import SimpleNamespace

    import train
    from hyperparameters import make_config

    config = make_config("default", [f"vqvae_precision={setting}"])
    train.announce_phase(config, SimpleNamespace(epochs_done=lambda phase: 0), "vqvae", precision)
    assert capsys.readouterr().out.startswith(said)


def test_training_on_one_device_turns_onednn_on_and_keeps_its_notice_off_stderr():
    """TensorFlow prints a notice about its oneDNN kernels on stderr at import, whatever TF_CPP_MIN_LOG_LEVEL says;
    train.py (one device) turns them on for their speed, and nothing of that reaches the user's stderr."""
    import subprocess

    env = {key: value for key, value in os.environ.items() if key != "TF_ENABLE_ONEDNN_OPTS"}
    code = ("import os, cli; cli.configure_tensorflow(onednn=True); import tensorflow; "
            "print(os.environ['TF_ENABLE_ONEDNN_OPTS'])")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "1" and result.stderr == ""



def test_prior_training_draws_each_slice_or_one_of_its_variants_and_hides_some_levels():
    """Training grids are each slice's codes or one of its variants' (flipped, deformed), drawn anew each epoch,
    with the slice's own level or, for a prior_level_dropout share, NaN; validation grids are the slices' own, with
    their levels."""
    from dataset import prior_dataset
    from hyperparameters import make_config

    config = make_config("default", ["prior_batch_size=8", "prior_level_dropout=0.3"])
    slices, levels = 8, np.linspace(0, 1, 8, dtype=np.float32)
    codes = {"top": np.zeros((slices, 4, 4), np.int32) + np.arange(slices)[:, None, None]}
    variants = [{"top": codes["top"] + 100}, {"top": codes["top"] + 200}]  # its flip, a deformed copy
    dataset = prior_dataset(config, "top", codes, levels, variants)
    seen, hidden = set(), 0
    for _ in range(6):  # epochs
        (inputs, targets), = list(dataset)
        grids = np.asarray(inputs["codes"])
        np.testing.assert_array_equal(np.asarray(targets), grids)
        assert (grids == grids[:, :1, :1]).all() and sorted(grids[:, 0, 0] % 100) == list(range(slices))
        seen |= set(grids[:, 0, 0] // 100)
        shown = np.asarray(inputs["levels"])
        hidden += np.isnan(shown).sum()
        known = ~np.isnan(shown)
        np.testing.assert_array_equal(shown[known], levels[grids[:, 0, 0] % 100][known])
    assert seen == {0, 1, 2} and 0 < hidden < 6 * slices / 2
    (inputs, _), = list(prior_dataset(config, "top", codes, levels))
    np.testing.assert_array_equal(np.asarray(inputs["codes"]), codes["top"])
    np.testing.assert_array_equal(np.asarray(inputs["levels"]), levels)


def test_prior_training_corrupts_the_codes_a_prior_reads_but_never_its_targets():
    """With prior_context_corruption, about that share of the bottom grid's input codes are random codes, drawn anew
    each epoch, while the targets stay the true grid; validation grids stay clean, and so does the top grid unless
    top_prior_context_corruption asks for its own share."""
    from dataset import prior_dataset
    from hyperparameters import make_config

    config = make_config("default", ["prior_batch_size=16", "prior_flip=false", "prior_context_corruption=0.3"])
    slices, levels = 16, np.linspace(0, 1, 16, dtype=np.float32)
    codes = {"bottom": np.full((slices, 64, 64), 3, np.int32), "top": np.zeros((slices, 16, 16), np.int32)}
    dataset = prior_dataset(config, "bottom", codes, levels, [])
    changed = []
    for _ in range(2):  # epochs
        (inputs, targets), = list(dataset)
        np.testing.assert_array_equal(np.asarray(targets), codes["bottom"])
        changed.append(np.asarray(inputs["codes"]) != 3)
        assert set(np.unique(inputs["codes"])) == set(range(16))
    # a random code replaces 30% of them, and is the true code again 1 time in 16
    assert 0.3 * 15 / 16 - 0.01 < changed[0].mean() < 0.3 * 15 / 16 + 0.01
    assert (changed[0] != changed[1]).any()
    (inputs, targets), = list(prior_dataset(config, "bottom", codes, levels))
    np.testing.assert_array_equal(np.asarray(inputs["codes"]), np.asarray(targets))
    (inputs, targets), = list(prior_dataset(config, "top", codes, levels, []))
    np.testing.assert_array_equal(np.asarray(inputs["codes"]), codes["top"])
    config = make_config("default", ["prior_batch_size=16", "prior_flip=false", "top_prior_context_corruption=0.5"])
    (inputs, targets), = list(prior_dataset(config, "top", codes, levels, []))
    np.testing.assert_array_equal(np.asarray(targets), codes["top"])
    assert 0.5 * 15 / 16 - 0.03 < (np.asarray(inputs["codes"]) != 0).mean() < 0.5 * 15 / 16 + 0.03


def test_training_and_validation_pipelines_shard_by_data_and_skip_tf_data_autotuning():
    """Every pipeline fit reads has DATA sharding and tf.data autotuning off (deleting a finished epoch's iterator
    with autotuning on waited for the autotuner's sleeping thread: up to 44 s idle per epoch, README Performance)."""
    import tensorflow as tf

    from dataset import prior_dataset, with_pipeline_options
    from hyperparameters import make_config

    config = make_config("default", ["prior_batch_size=4"])
    codes, levels = {"top": np.zeros((4, 16, 16), np.int32)}, np.zeros(4, np.float32)
    pipelines = (prior_dataset(config, "top", codes, levels, []),  # training
                 prior_dataset(config, "top", codes, levels),  # validation
                 with_pipeline_options(tf.data.Dataset.range(3)))
    for pipeline in pipelines:
        assert pipeline.options().autotune.enabled is False
        assert pipeline.options().experimental_distribute.auto_shard_policy == tf.data.experimental.AutoShardPolicy.DATA


def test_deformed_copies_are_made_only_for_the_priors_still_to_train_and_are_the_same_either_way(tmp_path,
                                                                                                 monkeypatch):
    """encode_for_priors warps as many copies as the priors of the grids it is given take (none for a bottom prior
    without copies, as under --keep-top-prior), and the copies a prior takes are the same whichever grids are
    given: they are drawn in order from one seeded generator. Codes here are the images' pixels, binned, so that
    they show the warps (an untrained VQ-VAE gives every position one code)."""
    from types import SimpleNamespace

    import modules
    from hyperparameters import make_config
    from rundir import RunDir
    from train import encode_for_priors

    config = make_config("default", ["image_size=32", "top_prior_deformed_copies=2", "prior_deformed_copies=1"])
    vqvae = modules.VQVAE(config.to_dict())
    vqvae.build()
    vqvae.save(tmp_path / "vqvae.keras")
    monkeypatch.setattr(modules, "encode_all", lambda model, images: {
        "top": np.round(images[:, ::4, ::4] * 15).astype(np.int32),
        "bottom": np.round(images[:, ::2, ::2] * 15).astype(np.int32)})
    slices = SimpleNamespace(images=np.random.default_rng(0).random((3, 32, 32)).astype("float32"),
                             levels=np.linspace(0, 1, 3))
    both, _ = encode_for_priors(RunDir(tmp_path), config, slices, slices, ["top", "bottom"])
    bottom, _ = encode_for_priors(RunDir(tmp_path), config, slices, slices, ["bottom"])
    assert len(both["deformed"]) == 2 and len(bottom["deformed"]) == 1 and len(both["flipped"]) == 1
    for grid in ("top", "bottom"):
        np.testing.assert_array_equal(bottom["deformed"][0][grid], both["deformed"][0][grid])
        assert (both["deformed"][0][grid] != both["codes"][grid]).any()
        assert (both["deformed"][1][grid] != both["deformed"][0][grid]).any()
    none, _ = encode_for_priors(RunDir(tmp_path), config, slices, slices, [])
    assert none["deformed"] == []
