"""Every tunable of OASISVQ in one place, with named presets.

A `Config` is a flat, typed dataclass. Scripts pick a preset with `--preset NAME` and override single fields with
`--set KEY=VALUE`; the resolved config is written to each run as `config.json`, and predict.py / similarity.py
rebuild the models from that file, so a run always reloads with the hyperparameters it was trained with.

Presets
- `seed`: the founding report's architecture, layer for layer (a single 8x8 code grid, 16 codes of dimension 16,
  its masked PixelCNN prior), trained with an EMA codebook, dead-code restarts, MSE + (1 - SSIM), a cosine
  schedule over 80 epochs and left-right flips (the recipe, not the table, is this project's): 0.640 test and
  0.702 validation SSIM on the shared volumes; the report reached 0.70 with 128 codes.
- `default`: what `python train.py` uses. A two-level VQ-VAE (VQ-VAE-2): a 64x64 bottom grid (one stride-2 level, a
  residual block) and a 32x32 top grid above it, 16 codes each, EMA codebooks, MSE + 0.2 (1 - SSIM), cosine schedule;
  its decoder trains with 10% of the bottom codes random (bottom_code_noise), so that it renders the slips of sampled
  grids from the top codes instead of as specks, and with the whole bottom grid random for 15% of the slices
  (bottom_code_dropout), so that the top grid carries the anatomy and not only the outline. Its prior is a
  conditional gated PixelCNN over the top grid (vertical and horizontal stacks, so no blind spot; dilated blocks that
  see the whole grid; position features; the slice's axial level), whose condition map passes through per-position
  layers (top_prior_condition_layers), so that position and level meet before its gates (where the ventricles lie at
  this level). Dropout, flipped slices' codes, the codes of deformed copies of the slices (top_prior_deformed_copies)
  and the best validation epoch regularize it; it (and the VQ-VAE) trains in bfloat16 mixed precision where the
  hardware computes it natively (prior_precision, vqvae_precision). A bottom prior, off by default (prior_epochs),
  is the same network over the bottom grid that also takes the top codes and trains on partly randomized input
  codes (prior_context_corruption), so that its samples follow the top codes rather than copying their own slips.
  The top grid is sampled at 0.9 of the temperature (top_temperature_scale) and reaches the decoder as each
  position's mean codebook vector under its prior's softmax at 0.25 (top_decoding_temperature), not as the codes
  drawn, whose unpredictable speckle decodes as mottled tissue, over uniformly random bottom codes: a bottom prior
  (prior_epochs above 0) made no measurable difference to the slices and doubled the sampling time. A refiner,
  trained last against a patch critic, draws the cortex that this smooth decoding lacks (refiner_*).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from typing import Any

CONFIG_VERSION = 2


@dataclass
class Config:
    # --- data -------------------------------------------------------------------------------------------------
    image_size: int = 128
    # a slice is kept when at least `min_tissue_fraction` of its pixels exceed `tissue_intensity` (after scaling)
    tissue_intensity: float = 0.1
    min_tissue_fraction: float = 0.08
    # per-volume robust intensity scaling: these percentiles map to 0 and 1, values outside are clipped
    intensity_low_percentile: float = 0.5
    intensity_high_percentile: float = 99.5
    # axial gain levelling (dataset.level_axial_gain): each axial slice of a volume's lower half whose bright head
    # tissue is dimmer than the volume's median slice is brightened to match, by at most `axial_gain_max` (1.0:
    # off), the brightness profile smoothed over `axial_gain_sigma` slices; a 1D stand-in for the gain-field
    # correction of OASIS's own processed images, for scans whose skull base fades. At 2.5 the samples' outlines
    # pass the brain-shaped check as often as real slices' at every validate seed, where unlevelled they fell 0.05
    # short on average (EXPERIMENTS.md, The lower half only)
    axial_gain_max: float = 2.5
    axial_gain_sigma: float = 5.0
    # subject-level split ratios (train gets the rest); split_seed is kept apart from `seed` so that changing the
    # training seed never moves a subject between splits
    validate_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 42
    # subjects left out of every split, for scans that are not what their files claim to be: the MNI volume of
    # OAS1_0198 in ../shared is not atlas-registered (its head is pitched far back, so its "axial" slices turn from
    # axial to nearly coronal and a level does not hold the anatomy it holds in the other volumes; EXPERIMENTS.md).
    # Splits are drawn with them counted, so leaving a subject out never moves another one between splits.
    exclude_subjects: list[str] = field(default_factory=lambda: ["OAS1_0198"])

    # --- VQ-VAE -----------------------------------------------------------------------------------------------
    encoder_filters: list[int] = field(default_factory=lambda: [32])
    encoder_strides: list[int] = field(default_factory=lambda: [2])
    residual_blocks: int = 1  # residual 3x3 blocks after the encoder convs and before the decoder convs
    residual_filters: int = 64
    latent_dim: int = 16
    num_codes: int = 16
    beta: float = 0.25  # commitment cost
    codebook: str = "ema"  # "ema" (exponential moving averages) or "loss" (codebook loss, learned by the optimizer)
    ema_decay: float = 0.99
    dead_code_threshold: float = 1.0  # a code whose EMA usage falls below this many vectors per batch is restarted
    # a second, coarser code grid (VQ-VAE-2): more strided convs from the bottom encoder's features down to the top
    # grid (64 / 2 = 32x32 by default: each top code over 2x2 bottom codes, so the top grid holds the layout and the
    # bottom prior only the texture; a 16x16 top left the bottom prior to place anatomy it could not,
    # EXPERIMENTS.md); no strides = a single code grid
    top_filters: list[int] = field(default_factory=lambda: [64])
    top_strides: list[int] = field(default_factory=lambda: [2])
    decoder_filters: list[int] = field(default_factory=lambda: [32])
    decoder_strides: list[int] = field(default_factory=lambda: [2])
    ssim_loss_weight: float = 0.2  # loss = MSE + w * (1 - SSIM) + VQ loss; 0 gives plain MSE
    # share of the bottom (or only) grid's codes that the decoder reads as random codes in training, drawn anew per
    # batch: sampled grids hold codes that disagree with their neighbours and the top codes, which a decoder trained
    # only on clean codes renders as bright and dark specks (the mottled tissue of samples); one trained on noisy
    # codes leans on the top codes and the neighbours and renders an odd code as what they say. 0.1: 10% random
    # codes cost 0.010 of SSIM instead of 0.149, test SSIM 0.9732 (clean 0.9771); 0.2 took it to 0.9687 (EXPERIMENTS.md)
    bottom_code_noise: float = 0.1
    # share of the training slices whose whole bottom grid reaches the decoder as random codes, so that the top codes
    # alone must render them (the level-by-level reconstruction of Jukebox and HQA): without it the bottom grid holds
    # the anatomy and the top little more than the outline (real top codes under random bottom ones decoded at SSIM
    # 0.724, without ventricles), and the bottom prior had to invent the anatomy. At 0.15 they decode at 0.888 (0.891
    # at 0.2), a sampled bottom grid keeps the ventricles and the white matter of the top codes, and reconstruction
    # keeps both targets (T88 0.9634, where 0.2 gave 0.9599; EXPERIMENTS.md, Generation)
    bottom_code_dropout: float = 0.15
    # weight of the top encoder's spatial roughness (modules.spatial_roughness, about 1 for noise, 0 for a constant
    # map) in the loss: real top grids are speckled (neighbouring codes inside the tissue agree in 17%). At 0.005 they
    # agree in 22% and both priors lose 0.17 bits/code, but the samples were no more real and reconstruction fell
    # to 0.9730 / 0.9614 (test / T88); at 0.02 the samples blurred (EXPERIMENTS.md, Generation)
    top_code_smoothness: float = 0.0

    # --- VQ-VAE training --------------------------------------------------------------------------------------
    batch_size: int = 32
    epochs: int = 30
    learning_rate: float = 2e-3
    lr_schedule: str = "cosine"  # "cosine" (decay to lr_floor * lr over all epochs) or "constant"
    lr_floor: float = 0.02
    flip_augment: bool = False  # train on randomly left-right flipped slices (the priors have prior_flip)
    seed: int = 0
    # the VQ-VAE's training arithmetic, as prior_precision below; its quantizers, their codebooks and the decoder's
    # last layer (the image) stay float32. In bfloat16 the default's training steps run 2.0x faster on this
    # project's AMX CPU (bench/precision.py) and it reconstructs the test split at SSIM 0.9739 against 0.9756, the
    # T88 slices at 0.9628 against 0.9634 (README, Precision); it is scored, like the priors, in float32
    vqvae_precision: str = "auto"

    # --- PixelCNN priors --------------------------------------------------------------------------------------
    # The bottom (or only) grid's prior: prior_*; the top grid's prior of a two-level model: top_prior_*, with the
    # rest shared. Gated priors take each slice's axial level (0 = lowest slice of its volume, 1 = highest, or
    # unknown); a bottom prior also takes the top codes, through `prior_condition_filters` channels.
    prior_layout: str = "gated"  # "gated" (GatedPixelCNN) or "seed" (the report's masked PixelCNN)
    prior_filters: int = 48  # at 32 (12 epochs) the bottom prior underfits: 1.453 validation bits/code against 1.368
    prior_first_kernel: int = 7
    prior_residual_blocks: int = 4  # gated blocks after the first one (layout "gated"), else residual blocks
    prior_dilations: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # of the blocks' 3x3, cycled
    # 0 (a two-level model): no bottom prior. New slices then decode the sampled top grid over uniformly random
    # bottom codes, which the decoder learned to render from its bottom_code_dropout slices and which the refiner
    # trains on. A bottom prior trained 16 epochs (1.541 validation bits/code) scored as random codes did at
    # validate seeds 0-2, and took 3 of the 5.7 s that 64 slices took and 18 of the 81 minutes of training
    # (EXPERIMENTS.md, Generation); set it to 16 to train one
    prior_epochs: int = 0
    top_prior_filters: int = 64
    top_prior_residual_blocks: int = 6
    top_prior_dilations: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 1])  # a view of 35 rows
    # 48: validation 1.336-1.339 bits/code (1.363 on unlevelled slices) and the whole training in 49 minutes (64 on a
    # slower host); 56 reached 1.358 on unlevelled slices (an older top prior 1.369 against 1.378 at 45, its samples
    # nearer real at every validate seed), but with the training's other phases on a slow host over the hour
    # (EXPERIMENTS.md, Training time of each recipe)
    top_prior_epochs: int = 48
    prior_condition_filters: int = 32
    # per-position ReLU layers (as wide as their input) over the condition map (position, level, top codes),
    # whose output joins it in every gate: without them the gates take position and level as a sum of two biases,
    # and a brain's layout at one level (where its ventricles lie at 0.4) must be inferred from the codes above. Two
    # on the top prior (with its deformed copies): 1.400 validation bits/code against 1.405, and its samples fooled
    # the classifier two-sample test less at every seed (EXPERIMENTS.md, Generation)
    prior_condition_layers: int = 0
    top_prior_condition_layers: int = 2
    # the mirror context: the first gated block also reads the codes mirrored about the grid's middle column (the
    # brain's midline in atlas space), the rows above through a second vertical window on the flipped grid and, on
    # the right half, the code already drawn at the mirror position of the row; so a right ventricle or hemisphere
    # is drawn facing its left twin rather than from where the dilated stacks happen to reach it (top: layouts as
    # symmetric as the training slices' and outlines 0.01-0.02 more often whole, unrefined; refined, two refiner
    # trainings drew outlines no more often whole than four without it: off in the default; EXPERIMENTS.md)
    prior_mirror: bool = False
    top_prior_mirror: bool = False
    prior_condition_on_level: bool = True
    # regularization: seven training subjects are few, and an unregularized prior overfits within a few epochs
    prior_dropout: float = 0.1  # on each gated block's residual branch
    prior_level_dropout: float = 0.1  # share of training grids shown with an unknown level, so "unknown" is learned
    prior_flip: bool = True  # train on the codes of left-right flipped slices too (drawn per grid, per epoch)
    # and on the codes of this many copies of the training slices (bottom prior; top_prior_ for the top one), each
    # slice warped by its own smooth random displacement field of at most prior_deformation pixels and flipped at
    # random: new local shapes, as between subjects, for priors that have seen seven (drawn like the flips: each
    # grid its own codes or one of its variants, anew each epoch)
    # (the top prior at 4 copies: 1.405 validation bits/code against 1.434, samples more often with ventricles and
    # solid crowns; EXPERIMENTS.md, Generation)
    prior_deformed_copies: int = 0
    top_prior_deformed_copies: int = 4
    prior_deformation: float = 4.0
    # share of the codes the bottom prior reads (its input, never its targets) replaced by random codes in training,
    # drawn anew per grid and epoch: its sampler reads the prior's own draws, and a prior that learned to copy its
    # neighbours carries their slips on, where one trained on noisy context leans on the top codes and the level
    # (0.2: nearest-training SSIM of samples 0.539 against 0.503; the top prior gained nothing from it; EXPERIMENTS.md)
    prior_context_corruption: float = 0.2
    # the same for the top prior: at 0.1 its samples' nearest-training SSIM came to real's, but the classifier and
    # the level error worsened at every seed (EXPERIMENTS.md, Generation), so the default reads clean top codes
    top_prior_context_corruption: float = 0.0
    prior_batch_size: int = 64
    prior_learning_rate: float = 3e-3
    prior_lr_schedule: str = "cosine"  # like lr_schedule, with the same lr_floor
    # the priors' (and the refiner's) training arithmetic: "bfloat16" (mixed precision: float32 weights, bfloat16
    # products; the default priors' steps run 1.7x (top) and 1.6x (bottom) faster on this project's AMX CPU,
    # bench/precision.py), "float32", or "auto": bfloat16 where the hardware computes it natively (a CPU with AMX or
    # AVX-512 BF16 units under oneDNN, a GPU of compute capability 8 or more), else float32. Sampling and bits/code in
    # predict.py run in float32.
    prior_precision: str = "auto"

    # --- sampling ---------------------------------------------------------------------------------------------
    temperature: float = 1.0
    # the top grid of a two-level model (the layout) is drawn at temperature * top_temperature_scale: at 0.9 the
    # samples' nearest-training SSIM came within 0.05 of real held-out slices' at seeds 0-2 (0.033-0.042 below;
    # 0.040-0.051 at 1), with the classifier, level and outlines as at 1 (EXPERIMENTS.md, Generation)
    top_temperature_scale: float = 0.9
    # nucleus sampling of the bottom (or only) grid: each code drawn from the most probable codes holding this much of
    # the probability (on the top grid it breaks the brain's outline; EXPERIMENTS.md)
    top_p: float = 1.0
    # how a sampled top grid reaches the decoder: 0, as the codes drawn; t > 0, at each position as the mean codebook
    # vector under softmax(logits / t) of the top prior given the codes drawn before it. The top codes hold speckle
    # their prior cannot predict (2.45 bits/code inside the tissue): decoded as drawn it is mottled tissue, averaged
    # smooth tissue around the layout the drawn codes fix; at 0.25 the brain-shaped fraction came within 0.05 of
    # real's at validate seeds 0-2 with the classifier within 0.08 of its control (at 1 it was not; EXPERIMENTS.md)
    top_decoding_temperature: float = 0.25

    # --- refiner ----------------------------------------------------------------------------------------------
    # A two-level run that decodes its top grid as expected vectors draws smooth slices: the layout right, no
    # cortex, which even real top codes lose when so decoded (EXPERIMENTS.md). A refiner (modules.Refiner, a small
    # U-Net whose output is added to its input) learns the missing detail from pairs, as pix2pix does: its input is
    # a training slice's own top codes decoded as predict.py decodes a sampled grid (under random bottom codes,
    # refiner_draws draws of them per slice), its target the slice, against a patch critic (hinge loss) with feature
    # matching, an L1 of the means of every 4x4-pixel window that holds the layout (refiner_layout_weight; of a
    # sliding window, so that no fixed block grid leaves the refiner free to draw any pattern inside a block that
    # keeps the block's mean, EXPERIMENTS.md, The refiner's blocky texture) and a term against drawn sulci
    # cutting the brain's outline (refiner_outline_weight: how far the refined slice falls below tissue_intensity
    # where the real one is above it). 0 epochs: no refiner, predict.py shows the decoder's slices.
    refiner_epochs: int = 27  # of refiner_draws * training slices / refiner_batch_size steps: 27 = about 4,000
    # of its full-resolution convolutions; twice that at 1/2, four times at 1/4. 16: 64 samples in 4.59 s (1.44 s of
    # refining at 32 took them to 5.71 s, over the 5-s target) and the brain-shaped fraction within 0.01-0.02 of
    # real's at validate seeds 0-2 (0.05-0.07 below at 32; EXPERIMENTS.md)
    refiner_filters: int = 16
    # the patch critic's first layer (its next ones 2x, 4x, 4x). At 64, pix2pix's, the phase's epochs took 41 s, at 32
    # 29 s (1,117 s against 812 s in all), and validate seeds 0-2 scored classifier 0.610 / 0.593 / 0.595 against
    # 0.620 / 0.626 / 0.631 (EXPERIMENTS.md)
    refiner_critic_filters: int = 32
    refiner_draws: int = 2
    refiner_batch_size: int = 16
    refiner_learning_rate: float = 2e-4  # Adam with beta_1 0.5, both networks, as in pix2pix
    refiner_feature_weight: float = 10.0
    refiner_layout_weight: float = 50.0
    # drawn sulci cut the outline into pieces (brain-shaped fraction of the samples 0.715 without the term, real's
    # 0.777); with 32 filters at 1000, validate seeds 0-2: brain-shaped 0.754 / 0.742 / 0.723 (real 0.777 / 0.793 /
    # 0.793) and the classifier 0.591 / 0.560 / 0.564, against 0.730 / 0.734 / 0.727 and 0.614 / 0.625 / 0.617 at
    # 100 (EXPERIMENTS.md)
    refiner_outline_weight: float = 1000.0
    # how the refiner's U-Net doubles its features' size on the way up: "bilinear" or "nearest". Nearest copies drew
    # a blocky, cross-hatched texture of short straight lines where gyri should be; bilinear draws smooth white
    # matter without them (EXPERIMENTS.md, The refiner's blocky texture)
    refiner_upsampling: str = "bilinear"

    @property
    def code_grid(self) -> int:
        """Side of the bottom (or only) code grid."""
        size = self.image_size
        for stride in self.encoder_strides:
            size //= stride
        return size

    @property
    def top_grid(self) -> int | None:
        """Side of the top code grid of a two-level model, None for a single grid."""
        if not self.top_strides:
            return None
        size = self.code_grid
        for stride in self.top_strides:
            size //= stride
        return size

    @property
    def code_grids(self) -> tuple[str, ...]:
        """The code grids, coarse first: ("top", "bottom") or ("bottom",)."""
        return ("top", "bottom") if self.top_strides else ("bottom",)

    @property
    def prior_grids(self) -> tuple[str, ...]:
        """The code grids with a prior, coarse first: every grid, but the bottom one of a two-level model without a
        bottom prior (prior_epochs=0), whose codes are drawn at random."""
        return tuple(grid for grid in self.code_grids if grid == "top" or self.prior_epochs)

    def grid_side(self, grid: str) -> int:
        """Side of code grid `grid` ("top" or "bottom")."""
        return self.top_grid if grid == "top" else self.code_grid

    def prior_field(self, name: str, grid: str):
        """The prior field `name`, spelled as the bottom prior's (e.g. "prior_epochs"), for the prior of `grid`: its
        top_ twin (top_prior_epochs) for the top grid, itself for the bottom grid."""
        return getattr(self, f"top_{name}" if grid == "top" else name)

    def to_dict(self) -> dict[str, Any]:
        return {"config_version": CONFIG_VERSION, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        values = migrate(dict(values))
        version = values.pop("config_version", None)
        if version != CONFIG_VERSION:
            raise ValueError(f"config version {version} is not {CONFIG_VERSION}, the version this code reads")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}")
        return cls(**values)


def migrate(values: dict[str, Any]) -> dict[str, Any]:
    """A config dict of an older CONFIG_VERSION (or from before a field existed), rewritten to mean the same in the
    current one.

    Version 1 (single code grid, unconditioned priors, no prior regularization): the fields added in version 2 get
    the values that describe how those runs were built and trained; its prior_lr_schedule was added late and is
    "constant" where absent."""
    # runs written before prior_precision (vqvae_precision) existed trained their priors (VQ-VAE) in float32, and
    # before prior_context_corruption existed on clean codes
    values.setdefault("prior_precision", "float32")
    values.setdefault("vqvae_precision", "float32")
    values.setdefault("prior_context_corruption", 0.0)
    values.setdefault("top_prior_context_corruption", 0.0)
    # and before top_temperature_scale existed, sampled every grid at one temperature; before bottom_code_noise
    # (bottom_code_dropout) existed, their decoders trained on clean codes (on every slice's bottom codes)
    values.setdefault("top_temperature_scale", 1.0)
    # and before top_decoding_temperature existed, decoded the top codes they drew
    values.setdefault("top_decoding_temperature", 0.0)
    values.setdefault("bottom_code_noise", 0.0)
    values.setdefault("bottom_code_dropout", 0.0)
    # and before top_code_smoothness existed, their top encoders trained without a roughness term
    values.setdefault("top_code_smoothness", 0.0)
    # and before axial_gain_max existed, trained on unlevelled slices
    values.setdefault("axial_gain_max", 1.0)
    # and before the refiner existed, showed the decoder's slices
    values.setdefault("refiner_epochs", 0)
    # and before refiner_critic_filters existed, trained it against a 64-filter critic
    values.setdefault("refiner_critic_filters", 64)
    # and before refiner_upsampling existed, upsampled by nearest copies
    values.setdefault("refiner_upsampling", "nearest")
    # and before prior_deformed_copies (prior_condition_layers) existed, their priors trained on the slices and
    # their flips only (took the condition map in their gates as it was)
    for key in ("prior_deformed_copies", "top_prior_deformed_copies", "prior_condition_layers",
                "top_prior_condition_layers"):
        values.setdefault(key, 0)
    if values.get("config_version") == 1:
        values.setdefault("prior_lr_schedule", "constant")
        values.update(top_filters=[], top_strides=[], prior_condition_on_level=False, prior_dropout=0.0,
                      prior_level_dropout=0.0, prior_flip=False, config_version=2)
        defaults = Config()
        for key in (*TOP_PRIOR_KEYS, "prior_condition_filters"):
            values.setdefault(key, getattr(defaults, key))
    return values


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "seed": dict(
        axial_gain_max=1.0,  # its table was measured on unlevelled slices
        encoder_filters=[32, 32, 64, 64],
        encoder_strides=[2, 2, 2, 2],
        residual_blocks=0,
        residual_filters=128,
        decoder_filters=[64, 64, 32, 32],
        decoder_strides=[2, 2, 2, 2],
        latent_dim=16,
        top_filters=[],
        top_strides=[],
        # measured on the shared volumes: MSE alone reached 0.591 validation SSIM in 30 epochs, MSE + 0.2 (1 - SSIM)
        # 0.685 in 50 (with flips), MSE + 1.0 (1 - SSIM) 0.702 in 80, and more on every held-out set
        # (EXPERIMENTS.md); at learning rate 2e-3 this 8x8 model was unstable with either loss.
        learning_rate=1e-3,
        epochs=80,
        ssim_loss_weight=1.0,
        flip_augment=True,
        prior_filters=128,
        prior_layout="seed",
        prior_residual_blocks=4,
        prior_dilations=[1],
        prior_epochs=30,
        prior_learning_rate=1e-3,
        prior_lr_schedule="constant",
        prior_precision="float32",  # as its figures were measured; its 8x8 prior trains in minutes either way
        vqvae_precision="float32",
        prior_condition_on_level=False,
        prior_dropout=0.0,
        prior_level_dropout=0.0,
        prior_flip=False,
        prior_context_corruption=0.0,
        bottom_code_noise=0.0,
        bottom_code_dropout=0.0,
        refiner_epochs=0,
    ),
}


KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number"}
# the list fields that hold names (the other lists hold integers), read from the annotations
TEXT_LISTS = {item.name for item in dataclasses.fields(Config) if item.type == "list[str]"}


def _parse_value(key: str, text: str, current: Any) -> Any:
    """`text` as a value of the type of `current`; ValueError saying what `key` expects."""
    if key in TEXT_LISTS:
        return [part.strip() for part in text.split(",") if part.strip()]
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"{key} expects true or false, got {text!r}")
    if isinstance(current, list):
        try:
            return [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"{key} expects a comma-separated list of integers like 32,64, got {text!r}") from None
    try:
        return type(current)(text)
    except ValueError:
        raise ValueError(f"{key} expects {KIND_NAMES[type(current)]}, got {text!r}") from None


def make_config(preset: str = "default", overrides: list[str] | None = None) -> Config:
    """Builds the config of `preset` with `KEY=VALUE` overrides; raises ValueError with a one-line reason."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    config = Config(**PRESETS[preset])
    names = [f.name for f in dataclasses.fields(Config)]
    for item in overrides or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set epochs=10")
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; hyperparameters.py lists the keys"
            raise ValueError(f"--set {item!r}: unknown key {key!r}{hint}")
        try:
            setattr(config, key, _parse_value(key, text.strip(), getattr(config, key)))
        except ValueError as error:
            raise ValueError(f"--set {item!r}: {error}") from None
    validate(config)
    return config


SAMPLING_KEYS = ("temperature", "top_temperature_scale", "top_p", "top_decoding_temperature")
# the fields that only the bottom prior of a two-level model reads (the top prior reads the other prior_* fields)
BOTTOM_PRIOR_KEYS = ("prior_filters", "prior_residual_blocks", "prior_dilations", "prior_epochs",
                     "prior_condition_filters", "prior_context_corruption", "prior_deformed_copies",
                     "prior_condition_layers", "prior_mirror")
# the fields that only the top prior reads
TOP_PRIOR_KEYS = ("top_prior_filters", "top_prior_residual_blocks", "top_prior_dilations", "top_prior_epochs",
                  "top_prior_context_corruption", "top_prior_deformed_copies",
                  "top_prior_condition_layers", "top_prior_mirror")


# the refiner's fields: no other model reads them (its own reads every field but the bottom prior's)
REFINER_KEYS = tuple(item.name for item in dataclasses.fields(Config) if item.name.startswith("refiner_"))


def _differences(first: dict[str, Any], second: dict[str, Any], free) -> list[str]:
    # the seed draws a training's randomness, not the model it makes: a model reused by another run (train.py
    # --vqvae-from) serves it whatever seed that run trains its own models with
    keys = set(first) | set(second)
    return sorted(key for key in keys if not free(key) and key not in REFINER_KEYS and key != "seed"
                  and first.get(key) != second.get(key))


def vqvae_differences(first: dict[str, Any], second: dict[str, Any]) -> list[str]:
    """The keys of two config dicts that differ, ignoring the priors' (prior_*, top_prior_*), the refiner's
    (REFINER_KEYS), sampling's (SAMPLING_KEYS) and the seed: two configs without differences describe the same
    VQ-VAE trained the same way on the same data."""
    return _differences(first, second, lambda key: key.startswith(("prior_", "top_prior_")) or key in SAMPLING_KEYS)


def top_prior_differences(first: dict[str, Any], second: dict[str, Any]) -> list[str]:
    """Like vqvae_differences, ignoring only the bottom prior's, the refiner's and sampling's fields: two configs
    without differences describe the same VQ-VAE and top prior, trained the same way on the same data."""
    return _differences(first, second, lambda key: key in BOTTOM_PRIOR_KEYS or key in SAMPLING_KEYS)


def bottom_prior_differences(first: dict[str, Any], second: dict[str, Any]) -> list[str]:
    """Like vqvae_differences, ignoring only the top prior's, the refiner's and sampling's fields: two configs
    without differences describe the same VQ-VAE and bottom (or only) prior, trained the same way on the same data."""
    return _differences(first, second, lambda key: key in TOP_PRIOR_KEYS or key in SAMPLING_KEYS)


def refiner_differences(first: dict[str, Any], second: dict[str, Any]) -> list[str]:
    """Like vqvae_differences, ignoring the bottom prior's fields and sampling's but not the refiner's: two configs
    without differences describe the same VQ-VAE, top prior and refiner (which trains on real top codes under random
    bottom ones, so it does not depend on the bottom prior)."""
    keys = set(first) | set(second)
    return sorted(key for key in keys if key not in BOTTOM_PRIOR_KEYS and key not in SAMPLING_KEYS
                  and first.get(key) != second.get(key))


def validate(config: Config) -> None:
    """Raises ValueError, naming the key, for a config no model can be built or trained from."""
    _validate_geometry(config)
    _validate_choices(config)
    _validate_ranges(config)


def _validate_geometry(config: Config) -> None:
    """The encoder, decoder and top-grid strides fit together and the image size."""
    for name in ("encoder", "decoder", "top"):
        if len(getattr(config, f"{name}_filters")) != len(getattr(config, f"{name}_strides")):
            raise ValueError(f"{name}_filters and {name}_strides must have the same length")
    down, up = math.prod(config.encoder_strides), math.prod(config.decoder_strides)
    if down != up or config.image_size % down:
        raise ValueError(f"encoder downsamples by {down} and decoder upsamples by {up}: they must match and divide "
                         f"image_size {config.image_size}")
    top_down = math.prod(config.top_strides)
    if config.code_grid % top_down:
        raise ValueError(f"top_strides downsample by {top_down}, which must divide the code grid {config.code_grid}")


def _validate_choices(config: Config) -> None:
    """The keys that name one of a few options, and the options that exclude each other."""
    if config.codebook not in ("ema", "loss"):
        raise ValueError(f"codebook must be 'ema' or 'loss', not {config.codebook!r}")
    for key in ("lr_schedule", "prior_lr_schedule"):
        if getattr(config, key) not in ("cosine", "constant"):
            raise ValueError(f"{key} must be 'cosine' or 'constant', not {getattr(config, key)!r}")
    for key in ("vqvae_precision", "prior_precision"):
        if getattr(config, key) not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"{key} must be auto, float32 or bfloat16, not {getattr(config, key)!r}")
    if config.refiner_upsampling not in ("bilinear", "nearest"):
        raise ValueError(f"refiner_upsampling must be bilinear or nearest, not {config.refiner_upsampling!r}")
    if config.prior_layout not in ("gated", "seed"):
        raise ValueError(f"prior_layout must be gated or seed, not {config.prior_layout!r}")
    if config.prior_layout == "seed" and (config.prior_mirror or config.top_prior_mirror):
        raise ValueError("prior_mirror and top_prior_mirror need prior_layout gated: the mirror context enters the "
                         "gated prior's first block")
    if config.prior_layout == "seed" and (config.top_strides or config.prior_condition_on_level):
        raise ValueError("prior_layout seed (the report's masked PixelCNN) takes no condition: it needs "
                         "top_strides= (one code grid) and prior_condition_on_level=false")
    if not config.prior_epochs and not (config.top_strides and config.bottom_code_dropout):
        raise ValueError("prior_epochs=0 (no bottom prior) needs a top grid (top_strides) and bottom_code_dropout "
                         "above 0: new slices then decode the sampled top grid over random bottom codes, which the "
                         "decoder learns to render from the dropped slices; else set prior_epochs=N to train one")
    if config.bottom_code_dropout and not config.top_strides:
        raise ValueError("bottom_code_dropout needs a top grid (top_strides) to render the dropped slices from")
    if config.refiner_epochs and not (config.top_strides and config.top_decoding_temperature):
        raise ValueError("refiner_epochs needs a top grid (top_strides) decoded as expected vectors "
                         "(top_decoding_temperature above 0): the refiner trains on such decodings; set "
                         "refiner_epochs=0")


def _validate_ranges(config: Config) -> None:
    """Shares, counts, sizes and temperatures within their ranges."""
    for key in ("prior_dropout", "prior_level_dropout", "prior_context_corruption", "top_prior_context_corruption",
                "bottom_code_noise", "bottom_code_dropout"):
        if not 0 <= getattr(config, key) < 1:
            raise ValueError(f"{key} must be in [0, 1)")
    for key in ("prior_deformed_copies", "top_prior_deformed_copies", "prior_condition_layers",
                "top_prior_condition_layers"):
        if getattr(config, key) < 0:
            raise ValueError(f"{key} must be 0 or more")
    for key in ("prior_epochs", "refiner_epochs", "refiner_feature_weight", "refiner_layout_weight",
                "refiner_outline_weight"):
        if not 0 <= getattr(config, key) < float("inf"):
            raise ValueError(f"{key} must be 0 or more")
    for key in ("refiner_filters", "refiner_critic_filters", "refiner_draws", "refiner_batch_size"):
        if getattr(config, key) < 1:
            raise ValueError(f"{key} must be at least 1")
    if not 0 < config.refiner_learning_rate < float("inf"):
        raise ValueError("refiner_learning_rate must be a positive number")
    if config.refiner_epochs and config.image_size % 8:
        raise ValueError("the refiner needs image_size divisible by 8 (its critic halves it three times)")
    if not 1 <= config.axial_gain_max < float("inf") or not 0 < config.axial_gain_sigma < float("inf"):
        raise ValueError("axial_gain_max must be 1 (off) or more and axial_gain_sigma a positive number of slices")
    if config.top_code_smoothness < 0:
        raise ValueError("top_code_smoothness must be 0 or more")
    if not 0 < config.prior_deformation < config.image_size / 4:
        raise ValueError("prior_deformation must be a positive number of pixels below a quarter of image_size")
    if not 0 <= config.validate_fraction + config.test_fraction < 1:
        raise ValueError("validate_fraction + test_fraction must be in [0, 1)")
    for key in ("prior_dilations", "top_prior_dilations"):
        if not getattr(config, key) or min(getattr(config, key)) < 1:
            raise ValueError(f"{key} must be a non-empty list of positive integers")
    if config.prior_first_kernel < 3 or config.prior_first_kernel % 2 == 0:
        raise ValueError("prior_first_kernel must be odd and at least 3")
    for key in ("temperature", "top_temperature_scale"):
        if not 0 < getattr(config, key) < float("inf"):
            raise ValueError(f"{key} must be a positive number")
    if not 0 < config.top_p <= 1:
        raise ValueError("top_p must be above 0 and at most 1")
    if not 0 <= config.top_decoding_temperature < float("inf"):
        raise ValueError("top_decoding_temperature must be 0 (decode the codes drawn) or a positive number")
