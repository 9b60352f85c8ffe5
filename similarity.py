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
from pathlib import Path

import numpy as np

from cli import (DEFAULT_PRETRAINED, ArgumentParser, UserError, add_data_args, add_progress_arg, check_output_path,
                 configure_tensorflow, plural, run_main, shown_path)

THRESHOLD = 0.6


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Reconstruct every slice of a split and report SSIM and PSNR.")
    parser.add_argument("--run", type=Path, default=DEFAULT_PRETRAINED,
                        help="run directory made by train.py (default: the shipped pretrained/ run)")
    add_data_args(parser, default_data=None, default_split="test")
    parser.add_argument("--json", type=Path, help="write the summary as JSON to this file")
    parser.add_argument("--csv", type=Path, help="write one row per slice (source, subject, slice, ssim, psnr)")
    parser.add_argument("--plot", type=Path,
                        help="write a PNG: SSIM histogram and the best, median and worst slices")
    parser.add_argument("--batch-size", type=int, default=64, help="slices reconstructed at once (default: 64)")
    add_progress_arg(parser)
    return parser


def summarize(ssim_values: np.ndarray, psnr_values: np.ndarray) -> dict:
    """The --json summary of (n,) per-slice SSIM and PSNR values (CLI.md's fields, less run, data and split)."""
    return {"n": int(len(ssim_values)),
            "ssim": {"mean": float(ssim_values.mean()), "std": float(ssim_values.std()),
                     "median": float(np.median(ssim_values)), "min": float(ssim_values.min()),
                     "max": float(ssim_values.max()), f"frac_above_{THRESHOLD}": float((ssim_values > THRESHOLD).mean())},
            "psnr": {"mean": float(psnr_values.mean())}}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    for path, flag in ((args.json, "--json"), (args.csv, "--csv"), (args.plot, "--plot")):
        check_output_path(path, flag)  # before minutes of reconstruction, not after
    configure_tensorflow()
    from dataset import load_slices
    from figures import save_ssim_plot
    from measures import reconstruct, slice_scores
    from rundir import atomic_write_text, load_run

    run = load_run(args.run, need_prior=False)
    config, vqvae = run.config, run.vqvae
    slices = load_slices(args.data, config, args.cache, args.oasis_url, args.discs, args.delete_archives,
                         args.strict, progress=not args.no_progress).select(args.split)
    if not len(slices):
        raise UserError(f"--split {args.split}: no slices of {args.data} in this split; try --split all")
    reconstructions = reconstruct(vqvae, slices.images, args.batch_size, progress=not args.no_progress)
    ssim_values, psnr_values = slice_scores(slices.images, reconstructions)
    result = {**summarize(ssim_values, psnr_values), "run": shown_path(args.run), "data": args.data,
              "split": args.split, "subjects": len(set(slices.subjects))}
    stats = result["ssim"]
    print(f"{plural(result['n'], 'slice')} of {plural(result['subjects'], 'subject')} ({args.data}, "
          f"split {args.split}), run {result['run']}")
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
        save_ssim_plot(args.plot, slices.images, reconstructions, ssim_values, THRESHOLD)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    run_main(main)
