"""Which part of a two-level run costs realism: the decoder, the bottom prior or the top prior.

    python bench/realism_by_grid.py --run RUN [--split validate] [--num 256] [--seed 0]
        [--figure Images/realism/by_grid.png]

On a held-out split of the shared MNI volumes (--split, skipped with a message when ../shared is absent), --num real
slices are drawn as predict.py draws them (dataset.draw_real_slices: same --seed, same slices), and eight sets of as
many slices, at the same levels, are scored with predict.py's classifier two-sample test (against as many training
slices, the same for every row), brain-shaped fraction, nearest-training SSIM (mean over the row of each slice's
SSIM with its most similar training slice, against every training slice), edge strength (measures.edge_strength:
lower is blurrier) and, for the rows made from the real slices, the mean SSIM of each slice with its real slice:
- real: the held-out slices themselves (the classifier's control);
- real, blurred: the same slices under a Gaussian blur of BLUR_SIGMA pixels, as soft as the samples (edge strength
  about 0.08 against 0.10): what softness alone does to each figure (the classifier hardly notices it; the
  brain-shaped check passes more of them, the blur closing small gaps in the outline);
- reconstructed: their reconstructions through both quantizers (what the decoder can show);
- real top, random bottom: their own top codes with uniformly random bottom codes (what the top grid carries alone);
- real top as expected vectors, random bottom: the same, each top position decoded as predict.py decodes a sampled
  one (the codebook vectors weighted by the top prior's softmax at the run's top_decoding_temperature, here of its
  logits given the real codes before it): what that decoding keeps of a real layout, and so the most a perfect
  layout could show through it; the row is left out for a run that decodes the drawn codes (temperature 0);
- real top, sampled bottom: their own top codes, with bottom codes sampled from the bottom prior given them;
- real top, bottom at temperature 0.3: the same, the bottom codes drawn near the prior's most likely ones (what the
  bottom prior adds at its surest: if this row is no closer to the real slices than random bottom codes, the bottom
  prior has not learned the detail the real bottom codes hold);
- sampled: both grids sampled (SliceGenerator.many, as predict.py generates, here at the real slices' levels),
  without the refiner of a run that has one (bench/refiner.py scores what it adds).
The steps from one row to the next show what each part loses. Rows built from real slices keep their subjects as
the classifier's groups (neighbouring slices of a subject are near copies); sampled rows are each their own group.
--figure draws the eight sets side by side at a few levels (the same slices in each set), for what no figure here
measures: whether the anatomy is there.
"""

import argparse
from pathlib import Path

from common import report_rows, two_level_run_and_held_out_slices

import numpy as np

from measures import reconstruct
from modules import SliceGenerator, encode_all, expected_top_decoding, uniform_codes

FIGURE_LEVELS = (0.2, 0.35, 0.45, 0.55, 0.65, 0.75)
BLUR_SIGMA = 0.8  # pixels: real slices this soft have the samples' edge strength


def blurred(slices: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return np.stack([ndimage.gaussian_filter(image, BLUR_SIGMA) for image in slices]).astype(np.float32)


def expected_top_row(run, codes, levels, bottom, subjects) -> dict:
    """{name: (slices, subjects)} of the real top codes decoded as expected vectors under the top prior's logits
    given them (teacher forcing) at the run's top_decoding_temperature, over `bottom`; empty when that is 0."""
    temperature = run.config.top_decoding_temperature
    if not temperature:
        return {}
    return {f"real top codes as expected vectors (t {temperature:g}), random bottom":
            (expected_top_decoding(run.vqvae, run.priors["top"], codes, levels, bottom, temperature), subjects)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True,
                        help="a two-level run with a bottom prior (the default preset trains none; README's "
                             "runs/whole_bf16 has one)")
    parser.add_argument("--split", default="validate", choices=["validate", "test"],
                        help="the held-out split (default: validate, the one with two subjects of the shared volumes "
                             "once OAS1_0198 is excluded; the classifier's control needs two)")
    parser.add_argument("--num", type=int, default=256, help="slices per row (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="draws the real slices and seeds the samplers")
    parser.add_argument("--figure", type=Path, default=None,
                        help="also write a PNG: each set's slices at the real slices nearest a few levels")
    args = parser.parse_args()
    loaded = two_level_run_and_held_out_slices(parser, args, "scores against", bottom_prior=True)
    if loaded is None:
        return
    run, real = loaded
    generator = SliceGenerator(run)
    codes = encode_all(run.vqvae, real.slices)
    top = codes["top"]
    random_bottom = uniform_codes(run.config, "bottom", len(top), np.random.default_rng(args.seed))
    rows = {
        f"real {args.split} slices (control)": (real.slices, real.subjects),
        f"real, blurred (Gaussian, sigma {BLUR_SIGMA:g} px)": (blurred(real.slices), real.subjects),
        "reconstructed": (reconstruct(run.vqvae, real.slices, progress=False), real.subjects),
        "real top codes, random bottom": (generator.render({"top": top, "bottom": random_bottom}), real.subjects),
        **expected_top_row(run, codes, real.levels, random_bottom, real.subjects),
        "real top codes, sampled bottom": (generator.many(real.levels, 1.0, args.seed, top=top, refine=False),
                                           real.subjects),
        "real top codes, bottom at temperature 0.3": (
            generator.many(real.levels, 0.3, args.seed, top=top, refine=False), real.subjects),
        "sampled (both grids)": (generator.many(real.levels, 1.0, args.seed, refine=False), None),
    }
    report_rows(rows, real, run, args, FIGURE_LEVELS, "",
                f"the same {args.split} slices' levels in each row, run {args.run.name}, seed {args.seed}")

if __name__ == "__main__":
    main()
