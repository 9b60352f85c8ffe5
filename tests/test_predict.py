"""predict.py end to end on the tiny seed-preset run of conftest's `trained` fixture: a second call replaces the
first call's samples, generation.json holds every figure (or why it is skipped) with paths as the user gave them,
and impossible --level values stop with one line and exit code 2."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from conftest import PROJECT_ROOT, assert_clean_usage_error, read_strict_json, run_in_process, run_script

# Every figure of generation.json: a value, or null with the reason under "skipped".
FIGURES = ["classifier_auc_generated_vs_train", "classifier_auc_heldout_vs_train", "level_mae_generated",
           "level_mae_real_heldout", "nearest_train_ssim_generated", "nearest_train_ssim_real_heldout",
           "diversity_pairwise_ssim_generated", "diversity_pairwise_ssim_real", "brain_shaped_fraction_generated",
           "brain_shaped_fraction_real", "brain_shaped_fraction_train", "edge_strength_generated",
           "edge_strength_real", "prior_bits_per_code", "reconstruction_ssim_mean"]
SETTINGS = ["run", "data", "data_found_automatically", "split", "level_conditioned", "num", "real_slices",
            "temperature", "top_temperature_scale", "top_decoding_temperature", "top_p", "guidance", "seed", "levels",
            "generation_seconds", "scoring_seconds", "classifier_folds"]


@pytest.fixture(scope="module")
def two_calls(trained, tmp_path_factory):
    """Two predict.py calls into one --out folder, 3 then 2 slices (the second with nucleus sampling); the second
    finds the run's training data itself (the run recorded it relative to the project root)."""
    data, run = trained
    base = tmp_path_factory.mktemp("predict")
    out = base / "out"
    common = ["--run", run, "--cache", base / "cache", "--out", out, "--no-progress"]
    first = run_script("predict.py", *common, "--data", data, "--num", "3", "--seed", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    first_sample = (out / "generated" / "sample_000.png").read_bytes()
    second = run_script("predict.py", *common, "--num", "2", "--seed", "2", "--top-p", "0.9")
    assert second.returncode == 0, second.stderr[-3000:]
    return out, first_sample, second, read_strict_json(out / "generation.json")


def test_a_second_call_leaves_none_of_the_first_calls_samples(two_calls):
    out, first_sample, _, report = two_calls
    assert sorted(path.name for path in (out / "generated").iterdir()) == ["sample_000.png", "sample_001.png"]
    assert (out / "generated" / "sample_000.png").read_bytes() != first_sample  # seed 2's, not seed 1's
    assert report["num"] == 2 and report["top_p"] == 0.9
    # each sample's level in file order: null where unknown (this data's 2D images have none), one per sample
    of_each = report["levels"]["of_each"]
    assert len(of_each) == 2 and sum(level is not None for level in of_each) == report["levels"]["known"]
    assert not [path.name for path in out.iterdir() if path.name.startswith(".")]  # no staging folder left


def test_generation_json_has_every_figure_or_why_it_is_skipped(two_calls):
    _, _, _, report = two_calls
    assert set(FIGURES + SETTINGS + ["skipped"]) <= set(report), sorted(set(FIGURES + SETTINGS) - set(report))
    for key in FIGURES:
        assert (report[key] is None) == (key in report["skipped"]), key
    assert report["nearest_train_ssim_generated"] is not None and report["brain_shaped_fraction_real"] is not None
    assert report["brain_shaped_fraction_train"] is not None
    assert "not level-conditioned" in report["skipped"]["level_mae_generated"]
    assert set(report["prior_bits_per_code"]) == {"bottom"} and report["top_temperature_scale"] is None  # one grid
    assert report["top_decoding_temperature"] is None


def test_data_found_automatically_is_said_and_recorded_as_the_run_recorded_it(trained, two_calls):
    data, _ = trained
    _, _, second, report = two_calls
    assert report["data_found_automatically"] is True
    assert report["data"] == os.path.relpath(data, PROJECT_ROOT)  # relative, as given to train.py
    first_line = second.stdout.splitlines()[0]
    assert "found automatically" in first_line and report["data"] in first_line
    assert "and 2 PNGs in" in second.stdout.splitlines()[-1]


@pytest.mark.parametrize("level", ["1.5", "-0.1", "nan"])
def test_level_out_of_range_exits_2_with_one_line(level, tmp_path):
    result = run_script("predict.py", "--level", level, "--out", tmp_path / "out")
    assert_clean_usage_error(result, "--level", "between 0.0")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("top_p", ["0", "1.5", "nan"])
def test_top_p_out_of_range_exits_2_with_one_line(top_p, tmp_path):
    result = run_script("predict.py", "--top-p", top_p, "--out", tmp_path / "out")
    assert_clean_usage_error(result, "--top-p", "at most 1")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scale", ["0", "-0.5", "inf", "nan"])
def test_top_temperature_scale_out_of_range_exits_2_with_one_line(scale, tmp_path):
    result = run_script("predict.py", "--top-temperature-scale", scale, "--out", tmp_path / "out")
    assert_clean_usage_error(result, "--top-temperature-scale", "positive number")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("temperature", ["-0.1", "inf", "nan"])
def test_top_decoding_temperature_out_of_range_exits_2_with_one_line(temperature, tmp_path):
    result = run_script("predict.py", "--top-decoding-temperature", temperature, "--out", tmp_path / "out")
    assert_clean_usage_error(result, "--top-decoding-temperature", "positive number")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("guidance", ["-1", "inf", "nan"])
def test_guidance_out_of_range_exits_2_with_one_line(guidance, tmp_path):
    result = run_script("predict.py", "--guidance", guidance, "--out", tmp_path / "out")
    assert_clean_usage_error(result, "--guidance", "from 0")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", [["--level", "0.5"], ["--guidance", "2"]])
def test_level_with_a_run_that_is_not_level_conditioned_exits_2_saying_how_to_get_one(flag, trained, tmp_path,
                                                                                       monkeypatch, capfd):
    """In this process, where TensorFlow's start-up lines on stderr have gone out before the call (in a new
    process they come before the error line)."""
    import modules  # noqa: F401  (imports TensorFlow)

    _, run = trained
    result = run_in_process("predict.py", ["--run", run, *flag, "--out", tmp_path / "out"], monkeypatch, capfd)
    assert_clean_usage_error(result, flag[0], "not level-conditioned", "train.py")
    assert not (tmp_path / "out").exists()


def test_strip_figures_lay_out_one_row_per_set_and_leave_no_partial_file(tmp_path):
    """figures.save_strips (the bench scripts' --figure): a PNG with a row per set, as wide as the longest row, and
    nothing else in the folder (written atomically)."""
    import numpy as np
    from PIL import Image

    from figures import save_strips

    slices = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)
    path = tmp_path / "strips.png"
    save_strips(path, [("real", [(slices[0], "0.10 ok"), (slices[1], "0.50 fails")]),
                       ("generated", [(slices[2], "0.10 ok")])], "title")
    assert [item.name for item in tmp_path.iterdir()] == ["strips.png"]
    width, height = Image.open(path).size
    assert (width, height) == (int(1.5 * 2 * 80), int((1.8 * 2 + 0.4) * 80))  # 2 columns, 2 rows at 80 dpi


@pytest.mark.parametrize("count", [3, 100])
def test_figure_titles_sit_above_the_first_row_of_slices(count, monkeypatch):
    """generated.png and sweep.png: the (wrapped) title stays clear of the slices below it, for 3 slices as for 100
    (predict.py --num 256 in README; under tight_layout its title lay over the first row)."""
    from matplotlib.text import Text

    import figures

    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda figure, path, dpi: drawn.append(figure))
    title = "generated slices, every sampling setting " * 10
    slices = np.random.default_rng(0).random((count, 16, 16)).astype(np.float32)
    figures.save_grid(Path("unused.png"), slices, title)
    rows = max(1, count // 64)
    figures.save_sweep(Path("unused.png"), np.linspace(0, 1, rows), [[(slices[0], 0.5)]] * rows,
                       [slices[:3]] * rows, title)
    for figure in drawn:
        figure.canvas.draw()
        renderer = figure.canvas.get_renderer()
        heading = next(text for text in figure.findobj(Text) if text.get_text().startswith("generated slices"))
        assert "\n" in heading.get_text()  # wrapped
        top_of_slices = max(axis.get_tightbbox(renderer).y1 for axis in figure.axes)  # with its caption
        assert heading.get_window_extent(renderer).y0 >= top_of_slices


def test_the_sweep_shows_each_subjects_slice_nearest_the_level_not_neighbouring_slices_of_one():
    """Two subjects, five slices each: a row holds one slice of each subject, the nearer subject first, never two
    neighbouring slices of one volume (which look alike); unknown levels are never shown."""
    from predict import sweep_rows

    split_levels = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.05, 0.15, 0.25, 0.35, np.nan], np.float32)
    subjects = np.array(["a"] * 5 + ["b"] * 5)
    assert sweep_rows(split_levels, subjects, np.array([0.0, 0.32, 1.0]), 4) == [[0, 5], [3, 8], [4, 8]]
    assert sweep_rows(split_levels, subjects, np.array([0.32]), 1) == [[3]]
