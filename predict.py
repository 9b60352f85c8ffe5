"""Reconstructs real slices and generates new ones with a trained run.

    python predict.py                                   # the shipped pretrained run, 16 generated slices
    python predict.py --run runs/mni --data ../shared/data/oasis1-mni-volumes --split test --num 32

Writes into --out: `reconstructions.png` (original, reconstruction, code map, error for N slices of the split),
`generated.png` (a grid of N slices sampled from the PixelCNN prior and decoded), `generated/sample_NNN.png`
(each one), and `generation.json` with the generation-quality figures:
- prior NLL in bits per code on the split's codes (lower is better; log2(16) = 4 bits is a uniform guess);
- nearest-training-slice SSIM of generated slices against the same for real held-out slices (samples as close to
  real anatomy as unseen real brains are, and not copies of training slices when clearly below 1);
- diversity: mean pairwise SSIM among generated slices against the same among real slices;
- brain-shaped fraction: the share of slices whose tissue is one piece with an intact outline (see brain_shaped),
  for generated slices (always) and real held-out ones (with data).
Without --data, the data the run was trained on is used when it is on this machine; otherwise only generation runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from cli import DEFAULT_PRETRAINED, PROJECT_ROOT, UserError, add_data_args, configure_tensorflow, run_main
from similarity import check_output_path, save_figure


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Reconstruct slices of a split and generate new brain slices.")
    parser.add_argument("--run", type=Path, default=DEFAULT_PRETRAINED,
                        help="run directory made by train.py (default: the shipped pretrained/ run)")
    add_data_args(parser, default_data="", default_split="test")
    parser.add_argument("--num", type=int, default=16, help="slices to reconstruct and to generate (default: 16)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature: below 1 is more conservative, above 1 more varied "
                             "(default: the run's, 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler (default: 0)")
    parser.add_argument("--out", type=Path, default=Path("predictions"),
                        help="folder for the figures, PNGs and generation.json (default: predictions/)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def training_source(run_dir: Path) -> str | None:
    """The --data a run was trained on, when that source is a folder present on this machine."""
    try:
        data = json.loads((run_dir / "summary.json").read_text())["data"]
    except (OSError, ValueError, KeyError):
        return None
    for candidate in (Path(data), PROJECT_ROOT / data):
        if candidate.is_dir():
            return str(candidate)
    return None


def pairwise_ssim(first: np.ndarray, second: np.ndarray, batch: int = 512) -> np.ndarray:
    """(len(first), len(second)) SSIM matrix of [0, 1] slices."""
    from measures import ssim

    rows = []
    for image in first:
        scores = [np.asarray(ssim(np.broadcast_to(image, second[start:start + batch].shape)[..., None],
                                  second[start:start + batch, ..., None]))
                  for start in range(0, len(second), batch)]
        rows.append(np.concatenate(scores))
    return np.stack(rows)


def brain_shaped(image: np.ndarray, tissue: float, min_share: float = 0.98, min_solidity: float = 0.9) -> bool:
    """Whether a [0, 1] slice's tissue (pixels above `tissue`, holes filled) is one piece with an intact outline: its
    largest connected piece holds at least `min_share` of it and fills at least `min_solidity` of its convex hull.
    Of the 1,857 slices of the shared MNI volumes, 99% of the middle 60% of each volume pass, 75% of all (the lowest
    and highest slices, where the brain is small, often fall apart into pieces); a sample whose outline breaks off,
    frays or splits fails."""
    from scipy import ndimage
    from skimage.morphology import convex_hull_image

    mask = ndimage.binary_fill_holes(image > tissue)
    labels, count = ndimage.label(mask)
    if count == 0:
        return False
    sizes = ndimage.sum(mask, labels, range(1, count + 1))
    largest = labels == int(np.argmax(sizes)) + 1
    return sizes.max() / sizes.sum() >= min_share and largest.sum() / convex_hull_image(largest).sum() >= min_solidity


def brain_shaped_fraction(images: np.ndarray, tissue: float) -> float:
    return float(np.mean([brain_shaped(image, tissue) for image in images]))


def mean_off_diagonal(matrix: np.ndarray) -> float:
    mask = ~np.eye(len(matrix), dtype=bool)
    return float(matrix[mask].mean()) if mask.any() else float("nan")


def save_grid(path: Path, images: np.ndarray, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.6 * rows + 0.4), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image in zip(axes.flat, images):
        axis.imshow(image, cmap="gray", vmin=0, vmax=1)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    save_figure(figure, path, 100)
    plt.close(figure)


def save_reconstructions(path: Path, images, reconstructions, codes, ssim_values, num_codes: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(images), 4, figsize=(8, 2.1 * len(images)), squeeze=False)
    for row, (image, reconstruction, code, value) in enumerate(zip(images, reconstructions, codes, ssim_values)):
        panels = [(image, "original", "gray", (0, 1)), (reconstruction, f"reconstruction, SSIM {value:.3f}", "gray",
                  (0, 1)), (code, f"code map ({code.shape[0]}x{code.shape[1]})", "tab20", (0, num_codes - 1)),
                  (np.abs(image - reconstruction), "|error|", "magma", (0, 0.3))]
        for axis, (picture, title, cmap, (low, high)) in zip(axes[row], panels):
            axis.imshow(picture, cmap=cmap, vmin=low, vmax=high, interpolation="nearest")
            axis.set_title(title, fontsize=8)
            axis.axis("off")
    figure.tight_layout()
    save_figure(figure, path, 90)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num < 1:
        raise UserError("--num must be at least 1")
    if args.temperature is not None and not 0 < args.temperature < float("inf"):
        raise UserError("--temperature must be a positive number")
    check_output_path(args.out, "--out", folder=True)
    configure_tensorflow()
    from PIL import Image

    from dataset import atomic_write, atomic_write_text, load_slices
    from modules import encode_all, load_run, mean_bits_per_code, sampler_for
    from similarity import reconstruct, slice_scores

    config, vqvae, priors = load_run(args.run)
    pixelcnn = priors["bottom"]
    temperature = args.temperature or config.temperature
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "generated").mkdir(exist_ok=True)
    except OSError as error:
        raise UserError(f"--out {args.out}: cannot create it ({error.strerror}); choose a writable folder") from None
    written = []

    start = time.perf_counter()
    codes = sampler_for(pixelcnn).sample(args.num, temperature, args.seed)
    generated = np.clip(np.asarray(vqvae.decode_codes(codes))[..., 0], 0.0, 1.0)
    seconds = time.perf_counter() - start
    save_grid(args.out / "generated.png", generated, f"{args.num} generated slices (temperature {temperature}, "
                                                     f"seed {args.seed})")
    written.append(args.out / "generated.png")
    for index, image in enumerate(generated):
        path = args.out / "generated" / f"sample_{index:03d}.png"
        pixels = Image.fromarray(np.round(image * 255).astype(np.uint8))
        atomic_write(path, lambda out: pixels.save(out, format="PNG"))
        written.append(path)
    report = {"run": str(args.run), "num": args.num, "temperature": temperature, "seed": args.seed,
              "generation_seconds": round(seconds, 3),
              "brain_shaped_fraction_generated": round(brain_shaped_fraction(generated, config.tissue_intensity), 4)}

    data = args.data or training_source(args.run)
    if data:
        everything = load_slices(data, config, args.cache, args.oasis_url, args.discs, args.delete_archives,
                                 args.strict, progress=not args.no_progress)
        chosen, train = everything.select(args.split), everything.select("train")
        if not len(chosen):
            raise UserError(f"--split {args.split}: no slices of {data} in this split; try --split all")
        picks = np.random.default_rng(args.seed).choice(len(chosen), min(args.num, len(chosen)), replace=False)
        picks.sort()
        real = chosen.images[picks]
        reconstructions = reconstruct(vqvae, real, progress=False)
        ssim_values, _ = slice_scores(real, reconstructions)
        save_reconstructions(args.out / "reconstructions.png", real, reconstructions,
                             encode_all(vqvae, real), ssim_values, config.num_codes)
        written.insert(0, args.out / "reconstructions.png")
        split_codes = encode_all(vqvae, chosen.images)
        bits = mean_bits_per_code(pixelcnn, split_codes)
        report.update({"data": str(data), "split": args.split, "prior_bits_per_code": round(float(bits), 4),
                       "reconstruction_ssim_mean": round(float(ssim_values.mean()), 4),
                       "brain_shaped_fraction_real": round(brain_shaped_fraction(real, config.tissue_intensity), 4)})
        if len(train) and args.split != "train":
            nearest_generated = pairwise_ssim(generated, train.images).max(axis=1)
            nearest_real = pairwise_ssim(real, train.images).max(axis=1)
            report.update({
                "nearest_train_ssim_generated": round(float(nearest_generated.mean()), 4),
                "nearest_train_ssim_real_heldout": round(float(nearest_real.mean()), 4),
                "diversity_pairwise_ssim_generated": round(mean_off_diagonal(pairwise_ssim(generated, generated)), 4),
                "diversity_pairwise_ssim_real": round(mean_off_diagonal(pairwise_ssim(real, real)), 4)})
    else:
        print("no --data (and the run's training data is not on this machine): reconstructions and "
              "generation-quality figures skipped; pass --data to get them", file=sys.stderr)

    atomic_write_text(args.out / "generation.json", json.dumps(report, indent=2) + "\n")
    written.append(args.out / "generation.json")
    print(f"generated {args.num} slices in {seconds:.2f} s (temperature {temperature}, seed {args.seed})")
    for key, label in (("prior_bits_per_code", "prior NLL on the split's codes, bits/code"),
                       ("reconstruction_ssim_mean", "reconstruction SSIM of the shown slices"),
                       ("nearest_train_ssim_generated", "nearest-training-slice SSIM, generated"),
                       ("nearest_train_ssim_real_heldout", "nearest-training-slice SSIM, real held-out"),
                       ("diversity_pairwise_ssim_generated", "mean pairwise SSIM among generated"),
                       ("diversity_pairwise_ssim_real", "mean pairwise SSIM among real held-out"),
                       ("brain_shaped_fraction_generated", "brain-shaped fraction, generated"),
                       ("brain_shaped_fraction_real", "brain-shaped fraction, real")):
        if key in report:
            print(f"{label}: {report[key]}")
    shown = [path for path in written if path.parent == args.out]
    print("wrote " + ", ".join(str(path) for path in shown) + f" and {args.num} PNGs in {args.out / 'generated'}")
    return 0


if __name__ == "__main__":
    run_main(main)
