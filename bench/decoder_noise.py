"""How a run's decoder renders bottom codes that slipped: the SSIM of real slices decoded from their own codes with a
share of the bottom codes replaced by random ones.

    python bench/decoder_noise.py [--run pretrained] [--run runs/other ...] [--shares 0,0.1,0.2,0.3] [--split validate]

A sampled bottom grid holds codes that disagree with their neighbours and the top codes (the bottom prior draws
them from its spread of likely codes). A decoder trained only on clean codes renders each such code as a bright or
dark speck, the mottled tissue of generated slices; one trained with `bottom_code_noise` renders it as what the
top codes and the neighbours say. Every slice of the split (the shared MNI volumes, skipped with a message when
../shared is absent) is encoded, a share of its bottom positions (drawn with --seed, the same positions for every
run) gets a uniformly random code, and the result is decoded and scored against the slice (SSIM, [0, 1],
data_range 1). Share 0 is the run's reconstruction SSIM.
"""

import argparse
from pathlib import Path

from common import ROOT, SHARED_VOLUMES, machine, print_table

import numpy as np

from cli import DEFAULT_CACHE
from dataset import load_slices
from measures import ssim
from modules import encode_all
from rundir import load_run


def decoded_with_random_codes(vqvae, codes: dict, share: float, seed: int, batch_size: int = 64):
    """(n, h, w) slices decoded from their encode_all codes with a share of the bottom codes replaced by random
    ones."""
    rng = np.random.default_rng(seed)
    bottom = codes["bottom"]
    replaced = rng.random(bottom.shape) < share
    codes = {**codes, "bottom": np.where(replaced, rng.integers(0, vqvae.cfg.num_codes, bottom.shape),
                                         bottom).astype(np.int32)}
    parts = [np.asarray(vqvae.decode_codes({grid: grid_codes[start:start + batch_size]
                                            for grid, grid_codes in codes.items()}))[..., 0]
             for start in range(0, len(bottom), batch_size)]
    return np.clip(np.concatenate(parts), 0.0, 1.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, action="append",
                        help="a run folder, repeatable (default: pretrained/)")
    parser.add_argument("--shares", default="0,0.1,0.2,0.3",
                        help="comma-separated shares of the bottom codes made random (default: 0,0.1,0.2,0.3)")
    parser.add_argument("--split", default="validate", choices=["train", "validate", "test", "all"],
                        help="the slices decoded (default: validate)")
    parser.add_argument("--seed", type=int, default=0, help="draws the replaced positions and their codes")
    args = parser.parse_args()
    try:
        shares = [float(value) for value in args.shares.split(",")]
    except ValueError:
        parser.error(f"--shares {args.shares!r}: give numbers between 0 and 1 separated by commas")
    if not all(0 <= share <= 1 for share in shares):
        parser.error(f"--shares {args.shares!r}: every share must be between 0 and 1")
    if not SHARED_VOLUMES.is_dir():
        print(f"skipped: {SHARED_VOLUMES} is absent (the shared MNI volumes this benchmark decodes)")
        return
    rows = []
    for run_dir in args.run or [ROOT / "pretrained"]:
        run = load_run(run_dir, need_prior=False)
        images = load_slices(str(SHARED_VOLUMES), run.config, DEFAULT_CACHE, progress=False).select(args.split).images
        codes = encode_all(run.vqvae, images)  # once per run: every share decodes the same codes
        scores = [float(np.mean(ssim(images[..., None], decoded_with_random_codes(run.vqvae, codes, share,
                                                                                  args.seed)[..., None])))
                  for share in shares]
        rows.append([str(run_dir), run.config.bottom_code_noise, *(f"{score:.4f}" for score in scores)])
    print(f"SSIM of the {len(images)} {args.split} slices decoded with a share of random bottom codes, seed "
          f"{args.seed}; {machine()}")
    print_table(["run", "bottom_code_noise", *(f"share {share:g}" for share in shares)], rows)


if __name__ == "__main__":
    main()
