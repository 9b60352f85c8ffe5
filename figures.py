"""Every figure similarity.py and predict.py draw, written as PNG atomically (a temporary file, then a rename), so a
killed script never leaves half a figure. Images are (n, h, w) float32 in [0, 1]."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib.pyplot on the Agg backend: figures are only saved, never shown, and need no display."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path, dpi: int) -> None:
    """Writes a matplotlib figure to `path` as PNG atomically, then closes it."""
    from rundir import atomic_write

    atomic_write(path, lambda out: figure.savefig(out, format="png", dpi=dpi))
    pyplot().close(figure)


def show(axis, image, title: str = "", cmap: str = "gray", low: float = 0.0, high: float = 1.0) -> None:
    """One picture in `axis`, without ticks, pixels drawn as they are (no smoothing of code maps)."""
    axis.imshow(image, cmap=cmap, vmin=low, vmax=high, interpolation="nearest")
    axis.set_title(title, fontsize=8)
    axis.axis("off")


def title_lines(title: str, width_inches: float) -> list[str]:
    """`title` wrapped for a figure `width_inches` wide: about 11 characters of a 10-point title per inch, so that a
    long title (every sampling setting) wraps instead of running off the figure."""
    return textwrap.wrap(title, width=max(30, int(11 * width_inches)))


def save_grid(path: Path, images: np.ndarray, title: str) -> None:
    """A square-ish grid of slices under one title (predict.py's generated.png)."""
    plt = pyplot()
    columns = int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / columns))
    lines = title_lines(title, 1.6 * columns)
    # constrained layout keeps the title clear of the slices; tight_layout lets a tall grid's first row cover it
    figure, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.6 * rows + 0.2 + 0.2 * len(lines)),
                                squeeze=False, layout="constrained")
    for axis in axes.flat:
        axis.axis("off")
    for axis, image in zip(axes.flat, images):
        show(axis, image)
    figure.suptitle("\n".join(lines), fontsize=10)
    save_figure(figure, path, 100)


def save_reconstructions(path: Path, images, reconstructions, codes: dict, ssim_values, num_codes: int) -> None:
    """One row per slice: original, reconstruction (with its SSIM), the code map of each grid (`codes`: {grid:
    (n, side, side)}, coarse first; one colour per code) and the absolute error (predict.py's
    reconstructions.png)."""
    plt = pyplot()
    columns = 3 + len(codes)
    figure, axes = plt.subplots(len(images), columns, figsize=(2 * columns, 2.1 * len(images)), squeeze=False)
    for row, (image, reconstruction, value) in enumerate(zip(images, reconstructions, ssim_values)):
        show(axes[row, 0], image, "original")
        show(axes[row, 1], reconstruction, f"reconstruction, SSIM {value:.3f}")
        for column, (grid, maps) in enumerate(codes.items(), start=2):
            side = maps[row].shape[0]
            show(axes[row, column], maps[row], f"{grid} codes ({side}x{side})", "tab20", 0, num_codes - 1)
        show(axes[row, -1], np.abs(image - reconstruction), "|error|", "magma", 0, 0.3)
    figure.tight_layout()
    save_figure(figure, path, 90)


def save_ssim_plot(path: Path, images, reconstructions, ssim_values, threshold: float) -> None:
    """Histogram of per-slice SSIM with `threshold` and the mean marked, and the best, median and worst slices:
    original, reconstruction, absolute error (similarity.py --plot)."""
    plt = pyplot()
    order = np.argsort(ssim_values)
    picks = [("best", order[-1]), ("median", order[len(order) // 2]), ("worst", order[0])]
    figure = plt.figure(figsize=(10, 9))
    grid = figure.add_gridspec(4, 3, height_ratios=[1.1, 1, 1, 1])
    histogram = figure.add_subplot(grid[0, :])
    histogram.hist(ssim_values, bins=40, color="tab:blue")
    histogram.axvline(threshold, color="tab:red", linestyle="--", label=f"SSIM {threshold}")
    histogram.axvline(ssim_values.mean(), color="black", label=f"mean {ssim_values.mean():.3f}")
    histogram.set_xlabel("SSIM per slice")
    histogram.set_ylabel("slices")
    histogram.legend()
    for row, (label, index) in enumerate(picks, start=1):
        show(figure.add_subplot(grid[row, 0]), images[index], f"{label}: original")
        show(figure.add_subplot(grid[row, 1]), reconstructions[index],
             f"reconstruction (SSIM {ssim_values[index]:.3f})")
        show(figure.add_subplot(grid[row, 2]), np.abs(images[index] - reconstructions[index]), "|error|", "magma", 0,
             0.3)
    figure.tight_layout()
    save_figure(figure, path, 100)


def save_sweep(path: Path, levels, real: list, generated: list, title: str) -> None:
    """One row per axial level of `levels`: real slices of about that level, `real[i]` a list of ((h, w) slice, its
    own level) pairs, beside the slices generated at that level, `generated[i]` (k, h, w) (predict.py --sweep's
    sweep.png)."""
    plt = pyplot()
    columns = max(len(row) for row in real) + max(len(row) for row in generated)
    lines = title_lines(title, 1.6 * columns)
    height = 1.7 * len(levels) + 0.2 + 0.2 * len(lines)
    figure, axes = plt.subplots(len(levels), columns, figsize=(1.6 * columns, height), squeeze=False,
                                layout="constrained")
    for row, level in enumerate(levels):
        for axis in axes[row]:
            axis.axis("off")
        for column, (image, own_level) in enumerate(real[row]):
            show(axes[row, column], image, f"real, level {own_level:.2f}")
        for column, image in enumerate(generated[row], start=columns - len(generated[row])):
            show(axes[row, column], image, f"generated, {level:.2f}")
    figure.suptitle("\n".join(lines), fontsize=10)
    save_figure(figure, path, 90)


def save_strips(path: Path, strips: list, title: str) -> None:
    """One row per slice set, `strips[i]` = (name, [((h, w) slice, caption) ...]): a few slices of each set side
    by side under their captions, the set's name above the row (bench/shape_by_level.py and
    bench/realism_by_grid.py --figure)."""
    plt = pyplot()
    columns = max(len(cells) for _, cells in strips)
    figure = plt.figure(figsize=(1.5 * columns, 1.8 * len(strips) + 0.4), layout="constrained")
    # a subfigure per row, so that a name wider than one picture has the row's width
    for row, (name, cells) in zip(np.atleast_1d(figure.subfigures(len(strips), 1)), strips):
        row.suptitle(name, x=0.01, ha="left", fontsize=8, fontweight="bold")
        padded = [*cells, *[(None, None)] * (columns - len(cells))]
        for axis, (image, caption) in zip(row.subplots(1, columns, squeeze=False)[0], padded):
            axis.axis("off")
            if caption is not None:
                show(axis, image, caption)
    figure.suptitle(title, fontsize=10)
    save_figure(figure, path, 80)
