"""Where the classifier two-sample test tells generated slices from real ones: by axial level, and which slices.

    python bench/classifier_view.py --generated predictions/FOLDER [--figure Images/realism/classifier_view.png]
        [--count 8]

FOLDER is a predict.py --out folder made with --data on a held-out split: its generated/sample_NNN.png files, and
the run, data, split, --num, seed and level of each sample in its generation.json. The real slices are drawn as
predict.py drew them (dataset.draw_real_slices, the same seed), and predict.py's classifier test is run again
(measures.classifier_auc, the same seed, folds and groups) for the generated slices and for the real held-out ones
(the control, where the split has two subjects or more), each against the same training slices; the PNGs hold 8 bits
a pixel, so the AUC can differ from generation.json's by about 0.01. Every slice keeps its out-of-fold score, and
the table gives the AUC over all slices and within each band of levels, each set against the training slices of the
same band: a band near 0.5 is one where the classifier cannot tell them apart. --figure shows the --count generated
slices it scored most like generated ones and the --count it scored least, each above the held-out slice nearest its
level, to see what it sees.
"""

import argparse
import json
from pathlib import Path

from common import (LEVEL_FIFTH_HEADERS, LEVEL_FIFTHS, ROOT, generated_slices, in_band, nearest_levels,
                    print_table)

import numpy as np

from cli import DEFAULT_CACHE
from dataset import draw_real_slices, load_slices
from figures import save_strips
from measures import classifier_auc, roc_auc
from rundir import load_run


def recorded_path(recorded: str) -> Path:
    """A path generation.json records: as it is where it exists from here, else from the project's root (where
    predict.py is usually run)."""
    return Path(recorded) if Path(recorded).exists() else ROOT / recorded


def band_auc(scores, levels, reference_scores, reference_levels, low: float, high: float) -> str:
    """A table cell: the AUC of the slices with a level in the band (common.in_band) against the
    reference slices in the same band, with both counts; "-" where either side is empty."""
    first, second = scores[in_band(levels, low, high)], reference_scores[in_band(reference_levels, low, high)]
    if not len(first) or not len(second):
        return "-"
    auc = roc_auc(np.r_[np.ones(len(first)), np.zeros(len(second))], np.r_[first, second])
    return f"{auc:.3f} ({len(first)}/{len(second)})"


def auc_row(name: str, test, levels, reference_levels, recorded) -> list[str]:
    """A table row of a classifier test (measures.TwoSampleTest) of slices at `levels` against reference slices at
    `reference_levels`: its AUC beside the one generation.json `recorded`, then its AUC in each band."""
    return [name, f"{test.auc:.3f} ({recorded})", *[band_auc(test.first_scores, levels, test.second_scores,
                                                             reference_levels, *band) for band in LEVEL_FIFTHS]]


def figure_strips(generated, levels, scores, held_out, count: int) -> list:
    """save_strips rows: the `count` most generated-like samples and the `count` least, each row followed by the
    held-out slices nearest their levels."""
    order = np.argsort(-scores)
    strips = []
    for name, picks in (("scored most like generated slices", order[:count]),
                        ("scored least like generated slices", order[::-1][:count])):
        strips.append((f"generated, {name}", [(generated[i], f"{levels[i]:.2f}: {scores[i]:+.1f}") for i in picks]))
        nearest = nearest_levels(held_out.levels, levels[picks])
        strips.append(("real held-out slices of the same levels",
                       [(held_out.images[i], f"{held_out.levels[i]:.2f} {held_out.subjects[i]}") for i in nearest]))
    return strips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generated", type=Path, required=True, help="a predict.py --out folder (with --data)")
    parser.add_argument("--figure", type=Path, help="PNG of the slices scored most and least like generated ones")
    parser.add_argument("--count", type=int, default=8, help="slices of each kind in --figure (default 8)")
    args = parser.parse_args()
    info = json.loads((args.generated / "generation.json").read_text())
    if info.get("data") is None:
        parser.error(f"{args.generated}: made without --data, so there are no real slices to compare with")
    data = recorded_path(info["data"])
    if not data.is_dir():
        print(f"skipped: {info['data']} is absent (the data {args.generated} was scored against)")
        return
    run = load_run(recorded_path(info["run"]))
    everything = load_slices(str(data), run.config, DEFAULT_CACHE, progress=False)
    real = draw_real_slices(everything, info["split"], info["num"], np.random.default_rng(info["seed"]))
    generated, levels = generated_slices(args.generated)
    seed, count = info["seed"], len(real.slices)
    test = classifier_auc(generated, real.reference, None, real.reference_subjects, seed=seed)
    print(f"{args.generated}: run {info['run']}, split {info['split']}, seed {seed}; AUC against the training slices "
          f"of the same band (counts: the set's / the training slices')")
    rows = [auc_row("generated", test, levels, real.reference_levels, info["classifier_auc_generated_vs_train"])]
    if len(set(real.subjects)) > 1:  # the control's folds are grouped by subject, as predict.py's
        control = classifier_auc(real.slices, real.reference[:count], real.subjects, real.reference_subjects[:count],
                                 seed=seed)
        rows.append(auc_row("real held-out (the control)", control, real.levels, real.reference_levels[:count],
                            info["classifier_auc_heldout_vs_train"]))
    print_table(["slices", "all (generation.json)", *LEVEL_FIFTH_HEADERS], rows)
    if args.figure:
        save_strips(args.figure, figure_strips(generated, levels, test.first_scores, real.split, args.count),
                    f"{info['run']}, {info['split']} seed {seed}: the classifier's out-of-fold scores")
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
