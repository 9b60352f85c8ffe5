"""Where the mottled tissue of generated slices comes from: the top codes or the bottom grid.

    python bench/top_codes.py --run RUN [--split validate] [--num 256] [--seed 0] [--figure PATH]

On --num real slices of a held-out split of the shared MNI volumes (drawn as predict.py draws them; skipped with a
message when ../shared is absent):
- the top prior's bits per code on their real top codes, at the positions inside the tissue (whose pixels average
  above the run's tissue_intensity) and outside; 4 bits is a uniform guess over 16 codes;
- how often a top code equals the one above it and the one left of it, in those real top grids and in as many
  top grids sampled at the same levels (the run's temperature and top_temperature_scale), over the whole grid and
  inside the tissue (of the real slices; of the sampled grids decoded under their sampled bottom grid);
- the sampled top grids decoded under three bottom grids: sampled by the bottom prior (as predict.py did before
  top_decoding_temperature), sampled at temperature 0.3 (nearly its most likely codes), and uniformly random codes;
  and, under the sampled bottom grid, decoded as expected top vectors (each position's codebook vectors weighted by
  the top prior's softmax at --top-decoding-temperature, as predict.py does); each scored by predict.py's
  classifier two-sample test against as many training slices, brain-shaped fraction and edge strength.
If the three decodings of the drawn codes score and look alike, the detail of a sample, and its blotches, is set by
its top codes; the fourth shows what is left once the part of them the prior cannot predict is averaged out.
--figure draws the real slices and the four decodings at a few levels.
"""

import argparse
from pathlib import Path

from common import machine, print_table, save_rows_figure, two_level_run_and_held_out_slices

import keras
import numpy as np

from measures import brain_shaped_fraction, classifier_auc, edge_strength
from modules import (SliceGenerator, encode_all, neighbour_agreement, teacher_forced_logits, top_decoding_weights,
                     uniform_codes)

FIGURE_LEVELS = (0.2, 0.35, 0.45, 0.55, 0.65, 0.75)


def tissue_positions(slices: np.ndarray, side: int, tissue_intensity: float) -> np.ndarray:
    """(n, side, side) booleans: the code positions of (n, h, w) slices whose pixels average above
    `tissue_intensity`."""
    pixels = slices.shape[1] // side
    return slices.reshape(len(slices), side, pixels, side, pixels).mean(axis=(2, 4)) > tissue_intensity


def top_bits_by_region(run, codes: dict, levels: np.ndarray, tissue: np.ndarray,
                       batch_size: int = 64) -> tuple[float, float]:
    """Mean bits per code of the top prior on the slices' real top codes (`codes`, encode_all's), at the `tissue`
    positions and outside them."""
    logits = teacher_forced_logits(run.priors["top"], "top", codes, levels, batch_size)
    bits = keras.ops.convert_to_numpy(keras.losses.sparse_categorical_crossentropy(
        codes["top"], logits, from_logits=True)) / np.log(2.0)
    return float(bits[tissue].mean()), float(bits[~tissue].mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True,
                        help="a two-level run with a bottom prior (the default preset trains none; README's "
                             "runs/whole_bf16 has one)")
    parser.add_argument("--split", default="validate", choices=["validate", "test"],
                        help="the held-out split whose slices are encoded and whose levels are sampled at")
    parser.add_argument("--num", type=int, default=256, help="slices (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="draws the real slices and seeds the samplers")
    parser.add_argument("--top-decoding-temperature", type=float, default=0.25, metavar="T",
                        help="the softmax temperature of the expected-vector row, > 0 (default: 0.25, the default "
                             "preset's top_decoding_temperature)")
    parser.add_argument("--figure", type=Path, default=None, help="also write a PNG of the four decodings")
    args = parser.parse_args()
    if not 0 < args.top_decoding_temperature < float("inf"):
        parser.error("--top-decoding-temperature must be a positive number")
    loaded = two_level_run_and_held_out_slices(parser, args, "encodes", bottom_prior=True)
    if loaded is None:
        return
    run, real = loaded
    real_codes = encode_all(run.vqvae, real.slices)
    side, tissue_intensity = run.config.top_grid, run.config.tissue_intensity
    real_tissue = tissue_positions(real.slices, side, tissue_intensity)
    inside, outside = top_bits_by_region(run, real_codes, real.levels, real_tissue)
    generator = SliceGenerator(run)
    temperature = run.config.temperature
    top, top_logits = generator.samplers["top"].sample(len(real.levels), temperature * run.config.top_temperature_scale,
                                                       args.seed, levels=real.levels, return_logits=True)
    bottom_sampler = generator.samplers["bottom"]
    bottoms = {"sampled bottom grid": bottom_sampler.sample(len(top), temperature, args.seed + 1, levels=real.levels,
                                                            top=top),
               "bottom grid at temperature 0.3": bottom_sampler.sample(len(top), 0.3, args.seed + 1,
                                                                       levels=real.levels, top=top),
               "random bottom codes": uniform_codes(run.config, "bottom", len(top), np.random.default_rng(args.seed))}
    decoded = {name: generator.render({"top": top, "bottom": bottom}) for name, bottom in bottoms.items()}
    expected = top_decoding_weights(top, top_logits, args.top_decoding_temperature)
    decoded[f"sampled bottom grid, top decoded at {args.top_decoding_temperature:g}"] = generator.render(
        {"top": top, "bottom": bottoms["sampled bottom grid"]}, expected)
    print(f"{len(real.slices)} {args.split} slices, run {args.run}, seed {args.seed}; {machine()}")
    print(f"top prior on the real top codes: {inside:.3f} bits/code inside the tissue, {outside:.3f} outside")
    sampled_tissue = tissue_positions(decoded["sampled bottom grid"], side, tissue_intensity)
    print(f"neighbouring top codes equal: real grids {float(neighbour_agreement(real_codes['top'])):.3f} "
          f"({float(neighbour_agreement(real_codes['top'], real_tissue)):.3f} inside the tissue), sampled grids "
          f"{float(neighbour_agreement(top)):.3f} ({float(neighbour_agreement(top, sampled_tissue)):.3f})")
    table = []
    for name, images in decoded.items():
        auc = classifier_auc(images, real.reference, None, real.reference_subjects, seed=args.seed).auc
        table.append([f"sampled top codes, {name}", f"{auc:.4f}",
                      f"{brain_shaped_fraction(images, run.config.tissue_intensity):.4f}",
                      f"{np.nanmean(edge_strength(images, run.config.tissue_intensity)):.4f}"])
    print_table(["slices", "classifier AUC vs training slices", "brain-shaped fraction", "edge strength"], table)
    if args.figure:
        save_rows_figure(args.figure, {name: (images, None) for name, images in
                                       {f"real {args.split} slices": real.slices, **decoded}.items()},
                         real.levels, FIGURE_LEVELS, f"sampled top codes under three bottom grids and decoded as "
                                                     f"expected vectors, run {args.run.name}")

if __name__ == "__main__":
    main()
