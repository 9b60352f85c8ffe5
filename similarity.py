"""Scores a trained VQ-VAE by SSIM: every slice of a split is reconstructed through the quantizer and compared.

    python similarity.py --data ../shared/data/oasis1-mni-volumes --split test
    python similarity.py --run runs/mni --data ../shared/data/oasis1-t88-axial --split all --json t88.json

SSIM is computed on images in [0, 1] with data_range 1, an 11x11 Gaussian window of sigma 1.5, K1 0.01, K2 0.03;
PSNR is 10 log10(1 / MSE). Slices are preprocessed with the run's own preprocessing parameters and split seed, so
`--split test` on the training source is exactly the subjects the run never saw.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from cli import DEFAULT_PRETRAINED, UserError, add_data_args, configure_tensorflow, run_main

THRESHOLD = 0.6


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Reconstruct every slice of a split and report SSIM and PSNR.")
    parser.add_argument("--run", type=Path, default=DEFAULT_PRETRAINED,
                        help="run directory made by train.py (default: the shipped pretrained/ run)")
    add_data_args(parser, default_data=None, default_split="test")
    parser.add_argument("--json", type=Path, help="write the summary as JSON to this file")
    parser.add_argument("--csv", type=Path, help="write one row per slice (source, subject, slice, ssim, psnr)")
    parser.add_argument("--plot", type=Path,
                        help="write a PNG: SSIM histogram and the best, median and worst slices")
    parser.add_argument("--batch-size", type=int, default=64, help="slices reconstructed at once (default: 64)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def check_output_path(path: Path | None, flag: str, folder: bool = False) -> None:
    """UserError before any work when `path` can never be written: a file stands where a folder must be, the
    folder is not writable, or (for a file) a folder has its name."""
    import os

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


def save_figure(figure, path: Path, dpi: int) -> None:
    """Writes a matplotlib figure as PNG atomically (a temporary file, then a rename)."""
    from dataset import atomic_write

    atomic_write(path, lambda out: figure.savefig(out, format="png", dpi=dpi))


def reconstruct(vqvae, images: np.ndarray, batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """(n, h, w) images -> (n, h, w) reconstructions through the quantizer, clipped to [0, 1]."""
    from tqdm import tqdm

    outputs = []
    for start in tqdm(range(0, len(images), batch_size), desc="reconstructing", unit="batch", disable=not progress,
                      file=sys.stderr):
        outputs.append(np.asarray(vqvae(images[start:start + batch_size, ..., None]))[..., 0])
    return np.clip(np.concatenate(outputs), 0.0, 1.0)


def slice_scores(images: np.ndarray, reconstructions: np.ndarray, batch_size: int = 256):
    """Per-slice SSIM and PSNR (dB) of [0, 1] images."""
    from measures import ssim

    scores = [np.asarray(ssim(images[start:start + batch_size, ..., None],
                              reconstructions[start:start + batch_size, ..., None]))
              for start in range(0, len(images), batch_size)]
    mse = ((images - reconstructions) ** 2).mean(axis=(1, 2))
    psnr = 10 * np.log10(1.0 / np.maximum(mse, 1e-12))
    return np.concatenate(scores), psnr


def summarize(ssim_values: np.ndarray, psnr_values: np.ndarray) -> dict:
    return {"n": int(len(ssim_values)),
            "ssim": {"mean": float(ssim_values.mean()), "std": float(ssim_values.std()),
                     "median": float(np.median(ssim_values)), "min": float(ssim_values.min()),
                     "max": float(ssim_values.max()), f"frac_above_{THRESHOLD}": float((ssim_values > THRESHOLD).mean())},
            "psnr": {"mean": float(psnr_values.mean())}}


def save_plot(path: Path, images, reconstructions, ssim_values) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(ssim_values)
    picks = [("best", order[-1]), ("median", order[len(order) // 2]), ("worst", order[0])]
    figure = plt.figure(figsize=(10, 9))
    grid = figure.add_gridspec(4, 3, height_ratios=[1.1, 1, 1, 1])
    histogram = figure.add_subplot(grid[0, :])
    histogram.hist(ssim_values, bins=40, color="tab:blue")
    histogram.axvline(THRESHOLD, color="tab:red", linestyle="--", label=f"SSIM {THRESHOLD}")
    histogram.axvline(ssim_values.mean(), color="black", label=f"mean {ssim_values.mean():.3f}")
    histogram.set_xlabel("SSIM per slice")
    histogram.set_ylabel("slices")
    histogram.legend()
    for row, (label, index) in enumerate(picks, start=1):
        error = np.abs(images[index] - reconstructions[index])
        for column, (image, title, cmap, top) in enumerate(
                [(images[index], f"{label}: original", "gray", 1), (reconstructions[index],
                  f"reconstruction (SSIM {ssim_values[index]:.3f})", "gray", 1), (error, "|error|", "magma", 0.3)]):
            axis = figure.add_subplot(grid[row, column])
            axis.imshow(image, cmap=cmap, vmin=0, vmax=top)
            axis.set_title(title, fontsize=9)
            axis.axis("off")
    figure.tight_layout()
    save_figure(figure, path, 100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    for path, flag in ((args.json, "--json"), (args.csv, "--csv"), (args.plot, "--plot")):
        check_output_path(path, flag)  # before minutes of reconstruction, not after
    configure_tensorflow()
    from dataset import atomic_write_text, load_slices
    from modules import load_run

    config, vqvae, _ = load_run(args.run, need_prior=False)
    slices = load_slices(args.data, config, args.cache, args.oasis_url, args.discs, args.delete_archives,
                         args.strict, progress=not args.no_progress).select(args.split)
    if not len(slices):
        raise UserError(f"--split {args.split}: no slices of {args.data} in this split; try --split all")
    reconstructions = reconstruct(vqvae, slices.images, args.batch_size, progress=not args.no_progress)
    ssim_values, psnr_values = slice_scores(slices.images, reconstructions)
    result = {**summarize(ssim_values, psnr_values), "run": str(args.run), "data": str(args.data),
              "split": args.split, "subjects": len(set(slices.subjects))}
    stats = result["ssim"]
    print(f"{result['n']} slices of {result['subjects']} subjects ({args.data}, split {args.split}), run {args.run}")
    print(f"SSIM mean {stats['mean']:.4f}  std {stats['std']:.4f}  median {stats['median']:.4f}  "
          f"min {stats['min']:.4f}  max {stats['max']:.4f}")
    print(f"fraction of slices with SSIM > {THRESHOLD}: {stats[f'frac_above_{THRESHOLD}']:.4f}")
    print(f"PSNR mean {result['psnr']['mean']:.2f} dB")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.csv:
        rows = ["source,subject,slice,ssim,psnr"] + [
            f"{source},{subject},{index},{value:.6f},{psnr:.4f}" for source, subject, index, value, psnr in
            zip(slices.sources, slices.subjects, slices.indices, ssim_values, psnr_values)]
        atomic_write_text(args.csv, "\n".join(rows) + "\n")
        print(f"wrote {args.csv}")
    if args.plot:
        save_plot(args.plot, slices.images, reconstructions, ssim_values)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    run_main(main)
