"""Helpers shared by the benchmark scripts: project imports and TensorFlow settings (the scripts' own), the machine's
description, training-step timing on random code grids, tables and their by-level cells, medians, a predict.py
folder's samples and their levels, the slices nearest given levels, and the realism rows' scores and figure
(bench/realism_by_grid.py, bench/refiner.py; the figure also bench/top_codes.py)."""

import json
import os
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cli import configure_tensorflow  # noqa: E402

configure_tensorflow()
SHARED_VOLUMES = ROOT.parent / "shared" / "data" / "oasis1-mni-volumes"


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {model}, Python {platform.python_version()}"


def cpu_times() -> list[int]:
    """The machine's CPU time counters (the `cpu` line of /proc/stat: user, nice, system, idle, iowait, irq,
    softirq, steal, ...); empty where there is no /proc/stat."""
    try:
        return [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return []


def steal_share(before: list[int], after: list[int]) -> float:
    """Share of the CPU time between two cpu_times() that the hypervisor gave to other tenants of a shared host
    (steal): timings taken meanwhile are that much slower. NaN where unknown."""
    if len(before) < 8 or len(after) < 8:
        return float("nan")
    spent = [later - earlier for earlier, later in zip(before, after)]
    return spent[7] / max(1, sum(spent[:8]))


def training_step_seconds(model, batch, steps: int = 5) -> list[float]:
    """Seconds of each of `steps` training steps of a compiled model on one batch, after one that traces (a 1-step
    fit: the VQ-VAE's train_step takes images alone, which train_on_batch does not pass)."""
    import time

    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensors(batch)
    model.fit(dataset, epochs=1, verbose=0, shuffle=False)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.fit(dataset, epochs=1, verbose=0, shuffle=False)
        times.append(time.perf_counter() - start)
    return times


def random_code_grids(config, batch: int, rng) -> dict:
    """{grid: (batch, side, side) int32 random codes} for each code grid of `config`: what a prior trains on, for
    timings that do not depend on the codes' values."""
    from modules import uniform_codes

    return {grid: uniform_codes(config, grid, batch, rng) for grid in config.code_grids}


def generated_slices(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images, levels) of a predict.py --out folder, in sample order: its generated/sample_NNN.png files and the
    level of each in its generation.json (`levels.of_each`)."""
    levels = json.loads((folder / "generation.json").read_text())["levels"].get("of_each")
    if levels is None:
        raise SystemExit(f"{folder}/generation.json has no per-sample levels (an older predict.py wrote it); "
                         "run predict.py into it again")
    files = sorted((folder / "generated").glob("sample_*.png"))
    images = np.stack([np.asarray(Image.open(path), np.float32) / 255 for path in files])
    return images, np.array([np.nan if level is None else level for level in levels], np.float32)


LEVEL_FIFTHS = [(0.0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1.0)]  # the by-level tables' bands
LEVEL_FIFTH_HEADERS = [f"{low:.1f}-{high:.1f}" for low, high in LEVEL_FIFTHS]  # their column headers


def in_band(levels: np.ndarray, low: float, high: float) -> np.ndarray:
    """Which `levels` lie in the band [low, high), the band that ends at 1.0 closed; NaN in none."""
    return (levels >= low) & ((levels < high) | (high == 1.0) & (levels <= high))


def band_cells(values: np.ndarray, levels: np.ndarray, bands, digits: int, all_digits: int | None = None) -> list[str]:
    """Table cells of a per-slice figure: its mean over all slices, then over each (low, high) band of levels (the
    last band closed at 1.0), each with its slice count in brackets, "-" for an empty band; NaNs left out."""
    cells = [f"{np.nanmean(values):.{digits if all_digits is None else all_digits}f} ({len(values)})"]
    for low, high in bands:
        inside = in_band(levels, low, high)
        cells.append(f"{np.nanmean(values[inside]):.{digits}f} ({inside.sum()})" if inside.any() else "-")
    return cells


def nearest_levels(levels, targets) -> list[int]:
    """For each target level, the index of the slice whose known (not NaN) level in `levels` is nearest: the
    slices the --figure options show."""
    levels = np.asarray(levels, np.float32)
    known = np.flatnonzero(np.isfinite(levels))
    return [int(known[np.argmin(np.abs(levels[known] - target))]) for target in targets]


def two_level_run_and_held_out_slices(parser, args, needs: str, bottom_prior: bool = False):
    """(run, real) for the benchmarks that take --run, --split, --num and --seed: the two-level run loaded and --num
    real slices of the held-out split drawn as predict.py draws them (dataset.draw_real_slices); None, after a
    "skipped" line saying what the shared MNI volumes were `needs`-ed for, when ../shared is absent. A single-grid
    run, or with `bottom_prior` (the benchmarks that compare its grids) a run without a bottom prior, is a usage
    error."""
    from cli import DEFAULT_CACHE
    from dataset import draw_real_slices, load_slices
    from rundir import load_run

    if not SHARED_VOLUMES.is_dir():
        print(f"skipped: {SHARED_VOLUMES} is absent (the shared MNI volumes this benchmark {needs})")
        return None
    run = load_run(args.run)
    if run.config.top_grid is None:
        parser.error(f"--run {args.run} has a single code grid; this benchmark needs a two-level run")
    if bottom_prior and "bottom" not in run.priors:
        parser.error(f"--run {args.run} has no bottom prior (prior_epochs=0, as the default); this benchmark compares "
                     f"its grids: give a run with one, e.g. made by train.py --vqvae-from {args.run} --keep-top-prior "
                     f"--set prior_epochs=16 --refiner-epochs 0")
    everything = load_slices(str(SHARED_VOLUMES), run.config, DEFAULT_CACHE, progress=False)
    return run, draw_real_slices(everything, args.split, args.num, np.random.default_rng(args.seed))


def score_rows(rows: dict, real, tissue: float, seed: int) -> list[list[str]]:
    """One table row per {name: (slices, subjects or None)}: predict.py's classifier two-sample AUC against real's
    training reference slices (a row with subjects keeps them as the classifier's groups; None: each slice its own),
    brain-shaped fraction, nearest-training SSIM (mean over the row of each slice's SSIM with its most similar
    training slice), edge strength, and, for rows with subjects (made from the real slices, in their order), the mean
    SSIM of each slice with its real slice."""
    from measures import brain_shaped_fraction, classifier_auc, edge_strength, nearest_ssim, slice_scores

    table = []
    for name, (images, groups) in rows.items():
        test_result = classifier_auc(images, real.reference, groups, real.reference_subjects, seed=seed)
        same_slice = "-" if groups is None else f"{np.mean(slice_scores(real.slices, images)[0]):.4f}"
        table.append([name, f"{test_result.auc:.4f}", f"{brain_shaped_fraction(images, tissue):.4f}",
                      f"{nearest_ssim(images, real.train.images).mean():.4f}",
                      f"{np.nanmean(edge_strength(images, tissue)):.4f}", same_slice])
    return table


SCORE_HEADERS = ["slices", "classifier AUC vs training slices", "brain-shaped fraction", "nearest-training SSIM",
                 "edge strength", "SSIM with the real slice"]


def report_rows(rows: dict, real, run, args, figure_levels, about: str, title: str) -> None:
    """score_rows' table of `rows`, under a line of the slices, `about` the run, the seed and the machine; with
    args.figure, save_rows_figure at the slices nearest `figure_levels`, titled `title`."""
    table = score_rows(rows, real, run.config.tissue_intensity, args.seed)
    print(f"{len(real.slices)} slices per row at the levels of the real {args.split} slices, run {args.run}{about}, "
          f"seed {args.seed}; {machine()}")
    print_table(SCORE_HEADERS, table)
    if args.figure:
        save_rows_figure(args.figure, rows, real.levels, figure_levels, title)


def save_rows_figure(path: Path, rows: dict, levels, figure_levels, title: str) -> None:
    """score_rows' sets side by side (figures.save_strips), each at the slices whose `levels` are nearest
    `figure_levels` (the same slices in every set)."""
    from figures import save_strips

    picks = nearest_levels(levels, figure_levels)
    save_strips(path, [(name, [(images[i], f"level {levels[i]:.2f}") for i in picks])
                       for name, (images, _) in rows.items()], title)
    print(f"wrote {path}")


def median(values):
    return statistics.median(values)


def print_table(headers, rows) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")
