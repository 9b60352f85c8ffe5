"""Which part of a two-level run costs realism: the decoder, the bottom prior or the top prior.

    python bench/realism_by_grid.py [--run pretrained] [--num 256] [--seed 0]

On the shared MNI volumes' test split (skipped with a message when ../shared is absent), --num real test slices
are drawn as predict.py draws them (same --seed, same slices), and four sets of as many slices, at the same levels,
are scored with predict.py's classifier two-sample test (against as many training slices, the same for every row)
and brain-shaped fraction:
- real: the test slices themselves (the classifier's control);
- reconstructed: their reconstructions through both quantizers (what the decoder can show);
- real top, sampled bottom: their own top codes, with bottom codes sampled from the bottom prior given them;
- sampled: both grids sampled, as predict.py generates.
The steps from one row to the next show what each part loses. Rows built from real slices keep their subjects as
the classifier's groups (neighbouring slices of a subject are near copies); sampled rows are each their own group.
"""

import argparse
from pathlib import Path

from common import ROOT, SHARED_VOLUMES, machine, print_table

import numpy as np

from cli import DEFAULT_CACHE
from dataset import load_slices
from measures import brain_shaped_fraction, classifier_auc, reconstruct
from modules import SliceGenerator, encode_all, sampler_for
from rundir import load_run

CHUNK = 64  # slices per sampler call, as predict.py


def sampled_bottom(run, top_codes: np.ndarray, levels: np.ndarray, seed: int) -> np.ndarray:
    """Slices decoded from the given top codes and bottom codes sampled given them (temperature 1)."""
    sampler, slices = sampler_for(run.priors["bottom"]), []
    for start in range(0, len(levels), CHUNK):
        top = top_codes[start:start + CHUNK]
        bottom = sampler.sample(len(top), 1.0, seed + start, levels=levels[start:start + CHUNK], top=top)
        slices.append(np.asarray(run.vqvae.decode_codes({"top": top, "bottom": bottom}))[..., 0])
    return np.clip(np.concatenate(slices), 0.0, 1.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "pretrained", help="a two-level run (default: pretrained/)")
    parser.add_argument("--num", type=int, default=256, help="slices per row (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="draws the real slices and seeds the samplers")
    args = parser.parse_args()
    if not SHARED_VOLUMES.is_dir():
        print(f"skipped: {SHARED_VOLUMES} is absent (the shared MNI volumes this benchmark scores against)")
        return
    run = load_run(args.run)
    if run.config.top_grid is None:
        parser.error(f"--run {args.run} has a single code grid; this benchmark splits a two-level run")
    slices = load_slices(str(SHARED_VOLUMES), run.config, DEFAULT_CACHE, progress=False)
    test, train = slices.select("test"), slices.select("train")
    rng = np.random.default_rng(args.seed)  # the draws of predict.py's real_slices
    picks = np.sort(rng.choice(len(test), min(args.num, len(test)), replace=False))
    reference = np.sort(rng.choice(len(train), min(args.num, len(train)), replace=False))
    real, levels, subjects = test.images[picks], test.levels[picks], test.subjects[picks]
    generate = SliceGenerator(run)
    rows = {
        "real test slices (control)": (real, subjects),
        "reconstructed": (reconstruct(run.vqvae, real, progress=False), subjects),
        "real top codes, sampled bottom": (sampled_bottom(run, encode_all(run.vqvae, real)["top"], levels,
                                                          args.seed), subjects),
        "sampled (both grids)": (np.concatenate([generate(levels[start:start + CHUNK], 1.0, args.seed + start)
                                                 for start in range(0, len(levels), CHUNK)]), None),
    }
    table = []
    for name, (images, groups) in rows.items():
        test_result = classifier_auc(images, train.images[reference], groups, train.subjects[reference],
                                     seed=args.seed)
        table.append([name, f"{test_result.auc:.4f}",
                      f"{brain_shaped_fraction(images, run.config.tissue_intensity):.4f}"])
    print(f"{len(real)} slices per row at the levels of the real test slices, run {args.run}, seed {args.seed}; "
          f"{machine()}")
    print_table(["slices", "classifier AUC vs training slices", "brain-shaped fraction"], table)


if __name__ == "__main__":
    main()
