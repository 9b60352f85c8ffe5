"""Generates new brain slices with a trained run, and measures how real they look.

    python predict.py                                   # the shipped pretrained run, 16 generated slices
    python predict.py --data ../shared/data/oasis1-mni-volumes --split test --num 256 --seed 0
    python predict.py --run runs/mni --level 0.6 --sweep 8

Writes into --out: `generated.png` (a grid of the generated slices), `generated/sample_NNN.png` (each one, 128x128
grayscale), with data `reconstructions.png` (original, reconstruction, code maps, error, for up to 16 slices of
the split), with --sweep `sweep.png`, and `generation.json` with every figure (null where skipped, with the
reason under "skipped"):
- classifier two-sample test: out-of-fold AUC of a small CNN telling generated slices from real training slices
  (0.5 = indistinguishable, 1 = always told apart), beside the same test of real held-out slices against the same
  training slices (the control: what real brains the run never saw score); folds grouped by subject, so that the
  CNN cannot recognise a subject from its neighbouring slices (measures.classifier_auc);
- level check: mean absolute error of a CNN's predicted axial level of generated slices against the level asked
  for, beside its error on real held-out slices (level-conditioned runs on data with levels);
- nearest-training-slice SSIM of generated and of real held-out slices (samples as close to real anatomy as unseen
  real brains are, and not copies of training slices when clearly below 1);
- diversity: mean pairwise SSIM among generated and among real slices (lower is more varied);
- brain-shaped fraction: slices whose tissue is one piece with an intact outline (measures.brain_shaped), of
  generated, of real held-out and of real training slices (those the classifier compares with, at the training
  levels that unconditional samples draw from: how intact the outlines are that the run learned from);
- edge strength: mean gradient magnitude inside the tissue of generated and of real slices (lower: blurrier;
  measures.edge_strength);
- the prior's bits per code on the codes of the real slices compared (held-out ones with the default --split test),
  per code grid (4 bits is a uniform guess over 16 codes).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from cli import (DEFAULT_PRETRAINED, PROJECT_ROOT, ArgumentParser, UserError, add_data_args, add_progress_arg,
                 check_output_path, configure_tensorflow, plural, run_main, shown_path)
from rundir import RunDir

if TYPE_CHECKING:
    from dataset import RealSlices

SHOWN = 16  # slices in reconstructions.png
SWEEP_COLUMNS = 4  # generated slices per level in sweep.png, and real ones at most (one per subject)
FOLDS = 5  # of the classifier two-sample test, fewer when a side has fewer subjects
SWEEP_STREAM = 2 ** 31 - 1  # the sweep's seed stream, one no generation chunk uses


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Generate new brain slices with a trained run and measure how real they look. Writes into "
                    "--out: generated.png (a grid), generated/sample_NNN.png (each slice, 128x128 grayscale), "
                    "with data reconstructions.png (up to 16 slices of the split), with --sweep sweep.png, and "
                    "generation.json: the realism figures (classifier two-sample AUC against training slices "
                    "beside its real held-out control, level error, nearest-training SSIM, pairwise SSIM, "
                    "brain-shaped fraction, edge strength, bits per code; explained at the top of predict.py).",
        epilog="Without --data, the data the run was trained on is used when that folder is on this machine (the "
               "first line printed says so); otherwise only generation runs and the figures that need real slices "
               "are skipped.")
    parser.add_argument("--run", type=Path, default=DEFAULT_PRETRAINED,
                        help="run directory made by train.py (default: the shipped pretrained/ run)")
    add_data_args(parser, default_data="", default_split="test")
    parser.add_argument("--num", type=int, default=16,
                        help="slices to generate, and real slices of the split to compare them with (default: 16; "
                             "the figures are noisy on so few, use 256 for a table)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature: below 1 is more conservative, above 1 more varied "
                             "(default: the run's, 1.0)")
    parser.add_argument("--top-temperature-scale", type=float, default=None, metavar="S",
                        help="two-level runs: the top (layout) grid is drawn at the temperature times S, the bottom "
                             "grid at the temperature; S > 0, 1 = one temperature for both (default: the run's "
                             "top_temperature_scale, 0.9 for the default preset; EXPERIMENTS.md, Generation)")
    parser.add_argument("--top-p", type=float, default=None, metavar="P",
                        help="nucleus sampling of the bottom (detail) grid, for runs with a bottom prior (not the "
                             "default's): each code is drawn from the most probable codes whose probabilities sum "
                             "to at least P, never from the unlikely rest; 0 < P <= 1, 1 = none (default: the "
                             "run's top_p; EXPERIMENTS.md, Generation)")
    parser.add_argument("--top-decoding-temperature", type=float, default=None, metavar="T",
                        help="two-level runs: how the sampled top (layout) grid reaches the decoder: 0 = as the "
                             "codes drawn; T > 0 = at each position as the mean codebook vector under the top "
                             "prior's softmax(logits / T) there, smooth tissue instead of the mottle of codes the "
                             "prior cannot predict (1: smoothest; lower keeps more edges); the codes are drawn alike "
                             "(default: the run's top_decoding_temperature, 0.25 for the default preset; "
                             "EXPERIMENTS.md, Generation)")
    parser.add_argument("--random-bottom", action="store_true",
                        help="two-level runs with a bottom prior: draw the bottom codes uniformly at random instead, "
                             "as a run without one (the default preset) does, to see what the bottom prior adds "
                             "(EXPERIMENTS.md, Generation)")
    parser.add_argument("--no-refine", action="store_true",
                        help="runs with a refiner (the default preset's): show the decoder's slices as they are, "
                             "without the refiner that draws the cortex into them (to see what it adds)")
    parser.add_argument("--guidance", type=float, default=1.0, metavar="W",
                        help="classifier-free guidance on the level (level-conditioned runs): codes are drawn from "
                             "u + W (c - u), c and u being the top prior's logits given the level and not; above 1 "
                             "holds each slice closer to its level but makes the slices less real (EXPERIMENTS.md, "
                             "Generation); 1 = none (default)")
    parser.add_argument("--level", type=float, default=None,
                        help="axial level of every generated slice, 0.0 (lowest slice of a volume) to 1.0 "
                             "(highest); needs a level-conditioned run. Without it levels are drawn from the "
                             "training split's levels, or unknown when the data has none")
    parser.add_argument("--sweep", type=int, default=None, metavar="N",
                        help=f"also write sweep.png: N levels evenly from the lowest to the highest level of the "
                             f"split's real slices, one row each: each held-out subject's slice nearest that level (up "
                             f"to {SWEEP_COLUMNS} subjects) beside {SWEEP_COLUMNS} generated at it")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the sampler and the realism figures: which real slices are compared and "
                             "shown, the levels drawn, the classifiers' training (default: 0)")
    parser.add_argument("--out", type=Path, default=Path("predictions"),
                        help="folder for the figures and generation.json (default: predictions/); its generated/ "
                             "subfolder is replaced as a whole, so it only ever holds this call's samples")
    add_progress_arg(parser)
    return parser


def check_arguments(args) -> None:
    """UserError for flag values no run could honour, before anything is read."""
    if args.num < 1:
        raise UserError("--num must be at least 1")
    if args.temperature is not None and not 0 < args.temperature < float("inf"):
        raise UserError("--temperature must be a positive number")
    if args.top_temperature_scale is not None and not 0 < args.top_temperature_scale < float("inf"):
        raise UserError("--top-temperature-scale must be a positive number")
    if args.top_decoding_temperature is not None and not 0 <= args.top_decoding_temperature < float("inf"):
        raise UserError("--top-decoding-temperature must be 0 (decode the codes drawn) or a positive number")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError("--top-p must be above 0 and at most 1")
    if not 0 <= args.guidance < float("inf"):
        raise UserError("--guidance must be a number from 0 (no level) upward; 1 is plain sampling")
    if args.level is not None and not 0.0 <= args.level <= 1.0:
        raise UserError(f"--level {args.level}: must be between 0.0 (the lowest axial slice of a volume) and 1.0 "
                        f"(the highest)")
    if args.sweep is not None and args.sweep < 2:
        raise UserError(f"--sweep {args.sweep}: give at least 2 levels")
    check_output_path(args.out, "--out", folder=True)


class Source(NamedTuple):
    """Where the real slices come from: `path` to read, `shown` as the user (or the run) gave it, and whether it
    was found `automatic`ally, as the run's training data."""
    path: str
    shown: str
    automatic: bool


def find_source(args) -> Source | None:
    """--data, or else the data the run was trained on when that folder is on this machine (as the run recorded
    it, or relative to the project, where train.py runs); None when neither."""
    if args.data:
        return Source(args.data, args.data, False)
    try:
        data = RunDir(args.run).read_summary()["data"]
    except (UserError, KeyError, TypeError):
        return None
    for candidate in (Path(data), PROJECT_ROOT / data):
        if candidate.is_dir():
            return Source(str(candidate), data, True)
    return None


def announce(args, source: Source | None) -> None:
    """The first line: which run, which data and split, and where the data came from."""
    if source is None:
        data = "no data (--data not given and the run's training data is not on this machine): generation only"
    else:
        origin = " (found automatically: the data this run was trained on)" if source.automatic else ""
        data = f"data {source.shown}{origin}, split {args.split}"
    print(f"run {shown_path(args.run)}; {data}; {plural(args.num, 'slice')}, seed {args.seed}", flush=True)


def check_run(run, args) -> None:
    """UserError when --level, --sweep or --guidance asks a run that cannot take a level, --random-bottom a run with
    one grid, or --top-p a run without a bottom prior (or with --random-bottom)."""
    if args.random_bottom and not run.config.top_grid:
        raise UserError(f"--random-bottom: run {shown_path(args.run)} has a single code grid, which its prior draws")
    if args.top_p not in (None, 1.0) and args.random_bottom:
        raise UserError("--top-p: --random-bottom draws the bottom codes uniformly at random, not from a nucleus; "
                        "give one of them")
    if args.top_p not in (None, 1.0) and "bottom" not in run.priors:
        raise UserError(f"--top-p: run {shown_path(args.run)} has no bottom prior (prior_epochs=0), its bottom codes "
                        f"are drawn uniformly at random; train one with --set prior_epochs=N to draw them from a "
                        f"nucleus")
    if (args.level is not None or args.sweep or args.guidance != 1.0) and not run.level_conditioned:
        flag = "--level" if args.level is not None else "--sweep" if args.sweep else "--guidance"
        raise UserError(f"{flag}: run {shown_path(args.run)} is not level-conditioned, its priors ignore the level; "
                        f"train one with python train.py (the default preset, prior_condition_on_level=true) "
                        f"and pass it with --run")


def remove(path: Path) -> None:
    """Deletes a file or a folder with its contents, if there."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def write_samples(folder: Path, images: np.ndarray) -> None:
    """Each slice as `folder`/sample_NNN.png (8-bit grayscale). They are written into a fresh hidden folder beside
    it, which then replaces `folder` whole: `folder` never holds two calls' samples, and a killed call leaves the
    previous set (and a hidden leftover that the next call removes)."""
    from PIL import Image

    staging, previous = folder.with_name(f".{folder.name}.new"), folder.with_name(f".{folder.name}.old")
    for leftover in (staging, previous):
        remove(leftover)
    staging.mkdir()
    digits = max(3, len(str(len(images) - 1)))
    for index, image in enumerate(images):
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(staging / f"sample_{index:0{digits}d}.png")
    if folder.exists() or folder.is_symlink():
        folder.rename(previous)
    staging.rename(folder)
    remove(previous)


def requested_levels(args, run, real, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """(levels, summary): --level for every slice; else levels drawn from the training split's known levels, read
    from the data or, without it, from the run's summary.json; else NaN (unknown). The summary's "of_each" lists
    each slice's level (null: unknown) in the order of generated/sample_NNN.png."""
    known = np.array([]) if real is None else real.train.levels[np.isfinite(real.train.levels)]
    if args.level is not None:
        levels, source = np.full(args.num, args.level, np.float32), "--level"
    elif len(known):
        levels, source = rng.choice(known, args.num).astype(np.float32), "drawn from the training split's levels"
    elif run.training_levels:
        levels = rng.choice(np.array(run.training_levels), args.num).astype(np.float32)
        source = "drawn from the training levels recorded with the run"
    else:
        levels, source = np.full(args.num, np.nan, np.float32), "unknown (no data with levels)"
    if not run.level_conditioned:
        source += ", ignored: the run is not level-conditioned"
    finite = levels[np.isfinite(levels)]
    summary = {"source": source, "known": int(len(finite))}
    if len(finite):
        summary.update(min=round(float(finite.min()), 4), median=round(float(np.median(finite)), 4),
                       max=round(float(finite.max()), 4))
    summary["of_each"] = [round(float(level), 4) if np.isfinite(level) else None for level in levels]
    return levels, summary


# What each figure needs, and why it is skipped without: checked in this order.
NEEDS = {"classifier_auc_generated_vs_train": ("data", "train", "groups"),
         "classifier_auc_heldout_vs_train": ("data", "train", "held-out", "groups", "held-out groups"),
         "level_mae_generated": ("data", "level", "train"),
         "level_mae_real_heldout": ("data", "level", "train", "held-out"),
         "nearest_train_ssim_generated": ("data", "train"),
         "nearest_train_ssim_real_heldout": ("data", "train", "held-out"),
         "diversity_pairwise_ssim_generated": ("pairs",), "diversity_pairwise_ssim_real": ("data", "real pairs"),
         "brain_shaped_fraction_generated": (), "brain_shaped_fraction_real": ("data",),
         "brain_shaped_fraction_train": ("data", "train"),
         "edge_strength_generated": (), "edge_strength_real": ("data",),
         "prior_bits_per_code": ("data",), "reconstruction_ssim_mean": ("data",)}


def skip_reasons(run, args, real: RealSlices | None) -> dict:
    """{need: why it is not met} for the needs of NEEDS that this call does not meet."""
    reasons = {} if args.num >= 2 else {"pairs": "pairwise SSIM needs at least 2 slices"}
    if real is None:
        return {**reasons, "data": "no data: pass --data"}
    if len(real.slices) < 2:
        reasons["real pairs"] = f"pairwise SSIM needs at least 2 slices; --split {args.split} has 1"
    if args.num < 2 or len(set(real.reference_subjects)) < 2:
        reasons["groups"] = "the classifier test needs 2 generated slices and training slices of 2 subjects"
    if len(set(real.subjects)) < 2:
        reasons["held-out groups"] = f"the classifier test needs real slices of 2 subjects; --split {args.split} " \
                                     f"has {plural(len(set(real.subjects)), 'subject')}"
    if not len(real.train):
        reasons["train"] = "the data has no training split to compare with"
    if args.split in ("train", "all"):
        reasons["held-out"] = f"--split {args.split} holds training slices; this figure needs held-out ones " \
                              f"(--split test)"
    if not run.level_conditioned:
        reasons["level"] = "the run is not level-conditioned"
    elif not np.isfinite(real.train.levels).any() or not np.isfinite(real.levels).any():
        reasons["level"] = "the data has no axial levels"
    return reasons


def rounded(value: float) -> float:
    return round(float(value), 4)


class Scorer:
    """The realism figures of `generated` slices (asked for at `levels`) against `real` ones (None without data):
    `figures` holds every key of NEEDS, None where `skipped` says why, and the classifier tests' fold counts."""

    def __init__(self, run, generated: np.ndarray, levels: np.ndarray, real: RealSlices | None, args):
        self.run, self.generated, self.levels, self.real, self.args = run, generated, levels, real, args
        reasons = skip_reasons(run, args, real)
        self.skipped = {key: next(reasons[need] for need in needs if need in reasons)
                        for key, needs in NEEDS.items() if any(need in reasons for need in needs)}
        self.figures = {**dict.fromkeys(NEEDS), "classifier_folds": None}

    def wanted(self, *keys: str) -> bool:
        return any(key not in self.skipped for key in keys)

    def steps(self) -> list:
        """[(name, method)] of the steps with at least one figure to compute."""
        steps = [("reconstructions", self.reconstructions, ["reconstruction_ssim_mean"]),
                 ("brain-shaped fraction", self.brain_shape, ["brain_shaped_fraction_generated"]),
                 ("edge strength", self.edges, ["edge_strength_generated"]),
                 ("prior bits per code", self.bits, ["prior_bits_per_code"]),
                 ("pairwise SSIM", self.diversity, ["diversity_pairwise_ssim_generated"]),
                 ("nearest-training SSIM", self.nearest, ["nearest_train_ssim_generated"]),
                 ("classifier two-sample test", self.classifier, ["classifier_auc_generated_vs_train"]),
                 ("level check", self.level, ["level_mae_generated"])]
        return [(name, method) for name, method, keys in steps if self.wanted(*keys)]

    def reconstructions(self) -> None:
        from figures import save_reconstructions
        from measures import reconstruct, slice_scores
        from modules import encode_all

        shown = self.real.slices[:SHOWN]
        rebuilt = reconstruct(self.run.vqvae, shown, progress=False)
        ssim_values, _ = slice_scores(shown, rebuilt)
        save_reconstructions(self.args.out / "reconstructions.png", shown, rebuilt, encode_all(self.run.vqvae, shown),
                             ssim_values, self.run.config.num_codes)
        self.figures["reconstruction_ssim_mean"] = rounded(ssim_values.mean())

    def brain_shape(self) -> None:
        from measures import brain_shaped_fraction

        tissue = self.run.config.tissue_intensity
        self.figures["brain_shaped_fraction_generated"] = rounded(brain_shaped_fraction(self.generated, tissue))
        if self.wanted("brain_shaped_fraction_real"):
            self.figures["brain_shaped_fraction_real"] = rounded(brain_shaped_fraction(self.real.slices, tissue))
        if self.wanted("brain_shaped_fraction_train"):
            self.figures["brain_shaped_fraction_train"] = rounded(brain_shaped_fraction(self.real.reference, tissue))

    def edges(self) -> None:
        from measures import edge_strength

        tissue = self.run.config.tissue_intensity
        sets = {"edge_strength_generated": self.generated}
        if self.wanted("edge_strength_real"):  # no real slices without data
            sets["edge_strength_real"] = self.real.slices
        for key, slices in sets.items():
            strengths = edge_strength(slices, tissue)
            if np.isfinite(strengths).any():
                self.figures[key] = rounded(np.nanmean(strengths))
            else:  # a mean of nothing: NaN, which is not JSON
                self.skipped[key] = f"no slice has pixels above the tissue intensity {tissue}"

    def bits(self) -> None:
        from modules import prior_bits_per_code

        bits = prior_bits_per_code(self.run, self.real.slices, self.real.levels)
        self.figures["prior_bits_per_code"] = {grid: rounded(value) for grid, value in bits.items()}

    def diversity(self) -> None:
        from measures import mean_off_diagonal, pairwise_ssim

        self.figures["diversity_pairwise_ssim_generated"] = rounded(mean_off_diagonal(
            pairwise_ssim(self.generated, self.generated)))
        if self.wanted("diversity_pairwise_ssim_real"):
            self.figures["diversity_pairwise_ssim_real"] = rounded(mean_off_diagonal(
                pairwise_ssim(self.real.slices, self.real.slices)))

    def nearest(self) -> None:
        from measures import nearest_ssim

        train = self.real.train.images
        self.figures["nearest_train_ssim_generated"] = rounded(nearest_ssim(self.generated, train).mean())
        if self.wanted("nearest_train_ssim_real_heldout"):
            self.figures["nearest_train_ssim_real_heldout"] = rounded(nearest_ssim(self.real.slices, train).mean())

    def classifier(self) -> None:
        """Generated slices, then real held-out ones, against the same training slices (as many, at most)."""
        from measures import classifier_auc

        real, seed = self.real, self.args.seed
        test = classifier_auc(self.generated, real.reference, None, real.reference_subjects, FOLDS, seed)
        self.figures["classifier_auc_generated_vs_train"] = rounded(test.auc)
        self.figures["classifier_folds"] = {"generated_vs_train": test.folds}
        if self.wanted("classifier_auc_heldout_vs_train"):
            count = len(real.slices)
            test = classifier_auc(real.slices, real.reference[:count], real.subjects, real.reference_subjects[:count],
                                  FOLDS, seed)
            self.figures["classifier_auc_heldout_vs_train"] = rounded(test.auc)
            self.figures["classifier_folds"]["heldout_vs_train"] = test.folds

    def level(self) -> None:
        from measures import level_mae

        train = self.real.train
        errors = level_mae(train.images, train.levels, {"generated": (self.generated, self.levels),
                                                        "real": (self.real.slices, self.real.levels)},
                           seed=self.args.seed)
        self.figures["level_mae_generated"] = rounded(errors["generated"])
        if self.wanted("level_mae_real_heldout"):
            self.figures["level_mae_real_heldout"] = rounded(errors["real"])

    def run_steps(self, progress: bool) -> None:
        """Every step, under a progress bar on stderr (or a line per step with progress off)."""
        from tqdm import tqdm

        steps = self.steps()
        with tqdm(total=len(steps), desc="scoring", unit="step", disable=not progress, file=sys.stderr) as bar:
            for name, method in steps:
                bar.set_postfix_str(name)
                if not progress:
                    print(f"scoring: {name}", file=sys.stderr, flush=True)
                method()
                bar.update()


def sweep_levels(real: RealSlices | None, args) -> np.ndarray:
    """The --sweep levels: evenly from the lowest to the highest known level of the split's slices; UserError
    when there are none, before any generation."""
    if real is None:
        raise UserError("--sweep shows real slices beside generated ones: pass --data (a folder of volumes)")
    known = real.split.levels[np.isfinite(real.split.levels)]
    if not len(known):
        raise UserError(f"--sweep: the slices of {args.data or 'the data'} have no axial levels (2D images do not "
                        f"say where they were cut); pass a folder of volumes with --data")
    return np.linspace(known.min(), known.max(), args.sweep).astype(np.float32)


def sweep_rows(split_levels: np.ndarray, subjects: np.ndarray, levels: np.ndarray, columns: int) -> list[list[int]]:
    """Per level of `levels`, the indices of the real slices sweep.png shows: each subject's slice nearest that level,
    the nearest subjects first, up to `columns`. One slice per head: neighbouring slices of one volume look alike,
    so a split of two subjects shows two slices, not each twice."""
    known = np.flatnonzero(np.isfinite(split_levels))
    rows = []
    for level in levels:
        by_distance = known[np.argsort(np.abs(split_levels[known] - level), kind="stable")]
        _, first_of_each = np.unique(subjects[by_distance], return_index=True)
        rows.append([int(index) for index in by_distance[np.sort(first_of_each)][:columns]])
    return rows


def save_sweep_figure(generator, real: RealSlices, levels: np.ndarray, temperature: float, args, progress: str) -> None:
    """sweep.png: per level, real slices of the split near it (sweep_rows), and SWEEP_COLUMNS generated at it."""
    from figures import save_sweep
    from modules import sub_seed

    rows = [[(real.split.images[index], real.split.levels[index]) for index in row]
            for row in sweep_rows(real.split.levels, real.split.subjects, levels, SWEEP_COLUMNS)]
    generated = generator.many(np.repeat(levels, SWEEP_COLUMNS), temperature, sub_seed(args.seed, SWEEP_STREAM),
                               progress=progress, guidance=args.guidance, top_p=args.top_p,
                               top_temperature_scale=args.top_temperature_scale,
                               top_decoding_temperature=args.top_decoding_temperature, refine=args.refine)
    save_sweep(args.out / "sweep.png", levels, rows, generated.reshape(len(levels), SWEEP_COLUMNS,
                                                                       *generated.shape[1:]),
               f"real {args.split} slices (left) and generated ones (right) by axial level; temperature "
               f"{temperature}{guided(args)}, seed {args.seed}")


# (what, (part, key), (part, key)) of each printed line of figures
PRINTED = [("classifier two-sample AUC against training slices (0.5: indistinguishable)",
            ("generated", "classifier_auc_generated_vs_train"),
            ("real held-out (the control)", "classifier_auc_heldout_vs_train")),
           ("level error, mean absolute", ("generated vs the level asked for", "level_mae_generated"),
            ("real held-out vs their own", "level_mae_real_heldout")),
           ("SSIM to the nearest training slice, mean", ("generated", "nearest_train_ssim_generated"),
            ("real held-out", "nearest_train_ssim_real_heldout")),
           ("pairwise SSIM, mean (lower: more varied)", ("generated", "diversity_pairwise_ssim_generated"),
            ("real", "diversity_pairwise_ssim_real")),
           ("brain-shaped fraction", ("generated", "brain_shaped_fraction_generated"),
            ("real", "brain_shaped_fraction_real"), ("real training", "brain_shaped_fraction_train")),
           ("edge strength, mean gradient inside the tissue (lower: blurrier)",
            ("generated", "edge_strength_generated"), ("real", "edge_strength_real"))]


def print_figures(report: dict) -> None:
    """The figures of `report`, one line each, a skipped one with its reason."""
    skipped = report["skipped"]
    for what, *parts in PRINTED:
        reasons = {skipped.get(key) for _, key in parts}
        if None not in reasons and len(reasons) == 1:
            print(f"{what}: skipped ({reasons.pop()})")
            continue
        print(f"{what}: " + "; ".join(f"{part} {report[key]}" if report[key] is not None
                                      else f"{part} skipped ({skipped[key]})" for part, key in parts))
    bits = report["prior_bits_per_code"]
    if bits is not None:
        print("prior bits per code on the real slices' codes: " + ", ".join(f"{grid} {value}"
                                                                            for grid, value in bits.items()))
    if report["reconstruction_ssim_mean"] is not None:
        print(f"reconstruction SSIM of the shown slices, mean: {report['reconstruction_ssim_mean']}")


def load_real(args, run, source: Source | None, rng: np.random.Generator) -> RealSlices | None:
    from dataset import draw_real_slices, load_slices

    if source is None:
        return None
    everything = load_slices(source.path, run.config, args.cache, args.oasis_url, args.discs, args.delete_archives,
                             args.strict, progress=not args.no_progress)
    if not len(everything.select(args.split)):
        raise UserError(f"--split {args.split}: no slices of the data in this split; try --split all")
    return draw_real_slices(everything, args.split, args.num, rng)


def guided(args) -> str:
    """", top grid at S x temperature", ", top grid decoded at T" (top_decoding_temperature), ", random bottom
    codes", ", refined", ", top-p P" and ", guidance W" for titles and reports when they are on, else nothing."""
    scaled = args.top_temperature_scale not in (None, 1.0)
    return (f", top grid at {args.top_temperature_scale:g}x temperature" if scaled else "") + \
        (f", top grid decoded at {args.top_decoding_temperature:g}" if args.top_decoding_temperature else "") + \
        (", random bottom codes" if args.random_bottom else "") + \
        (", refined" if args.refine else "") + \
        (f", top-p {args.top_p}" if args.top_p != 1.0 else "") + \
        (f", guidance {args.guidance}" if args.guidance != 1.0 else "")


def timed(function, *arguments):
    """(what function(*arguments) returns, seconds it took)."""
    start = time.perf_counter()
    return function(*arguments), time.perf_counter() - start


def write_generated(args, generated: np.ndarray, temperature: float) -> None:
    """generated/sample_NNN.png and the grid generated.png."""
    from figures import save_grid

    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"--out {args.out}: cannot create it ({error.strerror}); choose a writable folder") from None
    write_samples(args.out / "generated", generated)
    level = f", level {args.level}" if args.level is not None else ""
    save_grid(args.out / "generated.png", generated, f"{plural(len(generated), 'generated slice')} (temperature "
                                                     f"{temperature}{guided(args)}, seed {args.seed}{level})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_arguments(args)
    source = find_source(args)
    announce(args, source)
    configure_tensorflow()
    from modules import SliceGenerator
    from rundir import atomic_write_text, load_run

    run = load_run(args.run)
    check_run(run, args)
    if args.random_bottom:  # the run as if it had no bottom prior
        run = run._replace(priors={grid: prior for grid, prior in run.priors.items() if grid != "bottom"})
    args.random_bottom = "bottom" not in run.priors  # the titles say so for every two-level run drawing them so
    # the titles and the report read the settings in use
    args.top_p = args.top_p or run.config.top_p
    # (None for a run with one grid, which has no top grid to scale)
    args.top_temperature_scale = (args.top_temperature_scale or run.config.top_temperature_scale
                                  if run.config.top_grid else None)
    if not run.config.top_grid:
        args.top_decoding_temperature = None
    elif args.top_decoding_temperature is None:
        args.top_decoding_temperature = run.config.top_decoding_temperature
    args.refine = run.refiner is not None and not args.no_refine
    rng = np.random.default_rng(args.seed)
    real = load_real(args, run, source, rng)
    sweep = sweep_levels(real, args) if args.sweep else None
    levels, levels_summary = requested_levels(args, run, real, rng)
    temperature, progress = args.temperature or run.config.temperature, not args.no_progress
    generator, chunks = SliceGenerator(run), "bar" if progress else "lines"
    generated, generation_seconds = timed(generator.many, levels, temperature, args.seed, None, chunks,
                                          args.guidance, args.top_p, args.top_temperature_scale,
                                          args.top_decoding_temperature, args.refine)
    write_generated(args, generated, temperature)
    scorer = Scorer(run, generated, levels, real, args)
    _, scoring_seconds = timed(scorer.run_steps, progress)
    if sweep is not None:
        save_sweep_figure(generator, real, sweep, temperature, args, chunks)
    report = {"run": shown_path(args.run), "data": source and source.shown,
              "data_found_automatically": bool(source and source.automatic), "split": source and args.split,
              "level_conditioned": run.level_conditioned, "num": args.num,
              "real_slices": len(real.slices) if real else 0, "temperature": temperature,
              "top_temperature_scale": args.top_temperature_scale,
              "top_decoding_temperature": args.top_decoding_temperature, "refined": args.refine, "top_p": args.top_p,
              "bottom_codes": "prior" if "bottom" in run.priors else "random", "guidance": args.guidance,
              "seed": args.seed,
              "levels": levels_summary, "generation_seconds": round(generation_seconds, 3),
              "scoring_seconds": round(scoring_seconds, 3), **scorer.figures, "skipped": scorer.skipped}
    atomic_write_text(args.out / "generation.json", json.dumps(report, indent=2) + "\n")
    print(f"generated {plural(args.num, 'slice')} in {generation_seconds:.1f} s, scored in {scoring_seconds:.1f} s "
          f"(temperature {temperature}{guided(args)}, seed {args.seed}; levels {levels_summary['source']})")
    print_figures(report)
    written = ["reconstructions.png"] * (report["reconstruction_ssim_mean"] is not None) + ["generated.png"] + \
        ["sweep.png"] * (sweep is not None) + ["generation.json"]
    print("wrote " + ", ".join(str(args.out / name) for name in written)
          + f" and {plural(args.num, 'PNG')} in {args.out / 'generated'}")
    return 0


if __name__ == "__main__":
    run_main(main)
