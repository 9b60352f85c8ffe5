"""What a run's refiner adds: its samples and decodings of real layouts, refined and not, scored beside real slices.

    python bench/refiner.py [--run pretrained] [--split validate] [--num 256] [--seed 0] [--figure PATH]

A run decoding a sampled top grid as expected codebook vectors (top_decoding_temperature) draws smooth slices with
the layout right and no cortex, which even real top codes lose when so decoded (bench/realism_by_grid.py); its
refiner (refiner_epochs, modules.AdversarialRefiner: trained by train.py on the training slices' own top codes
decoded that way) learns to draw the missing detail. On a held-out split of the shared MNI volumes (skipped with a
message when ../shared is absent), --num real slices are drawn as predict.py draws them, and scored with
realism_by_grid.py's measures beside:
- the held-out slices' own top codes decoded as expected vectors under random bottom codes (modules.refiner_inputs:
  what the refiner trained on, for slices it never saw), and the same refined (SSIM with the real slice says how
  much of it the refiner restores);
- as many slices sampled at the real slices' levels as predict.py samples them, without and with the refiner.
--figure draws the rows at a few levels (the same slices in each).
"""

import argparse
from pathlib import Path

from common import ROOT, report_rows, two_level_run_and_held_out_slices

import numpy as np

from modules import SliceGenerator, refiner_inputs

FIGURE_LEVELS = (0.3, 0.4, 0.45, 0.5, 0.55, 0.65)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "pretrained",
                        help="a two-level run with a refiner (default: pretrained/)")
    parser.add_argument("--split", default="validate", choices=["validate", "test"],
                        help="the held-out split the slices are scored against (default: validate)")
    parser.add_argument("--num", type=int, default=256, help="slices per row (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="draws the real slices, the bottom codes and the samples")
    parser.add_argument("--figure", type=Path, default=None, help="also write a PNG of the rows at a few levels")
    args = parser.parse_args()
    if args.num < 1:
        parser.error("--num must be at least 1")
    loaded = two_level_run_and_held_out_slices(parser, args, "scores against")
    if loaded is None:
        return
    run, real = loaded
    if run.refiner is None:
        parser.error(f"--run {args.run} has no refiner (refiner_epochs 0): train one with python train.py")
    generator = SliceGenerator(run)
    layouts = refiner_inputs(run.vqvae, run.priors["top"], run.config, real.slices, real.levels,
                             np.random.default_rng([args.seed, 1]))
    temperature = f"t {run.config.top_decoding_temperature:g}"
    rows = {
        f"real {args.split} slices (control)": (real.slices, real.subjects),
        f"real top codes as expected vectors ({temperature}), random bottom": (layouts, real.subjects),
        "the same, refined": (generator.refined(layouts), real.subjects),
        "sampled, not refined (predict.py --no-refine)": (generator.many(real.levels, 1.0, args.seed, refine=False),
                                                          None),
        "sampled, refined (as predict.py)": (generator.many(real.levels, 1.0, args.seed), None),
    }
    report_rows(rows, real, run, args, FIGURE_LEVELS, f" ({run.config.refiner_epochs} refiner epochs)",
                f"refined and not at the {args.split} slices' levels, run {args.run.name}, seed {args.seed}")

if __name__ == "__main__":
    main()
