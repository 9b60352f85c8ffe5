"""The measures of OASISVQ, in one place: SSIM and PSNR of reconstructions, bits per code of a prior, and the
realism figures of generated slices. similarity.py, predict.py, train.py, modules.py and bench/ import them from
here.

Images are float32 in [0, 1], shaped (n, h, w) unless a docstring says otherwise; SSIM is always the statistic of
Wang et al. (2004) with data_range 1, an 11x11 Gaussian window of sigma 1.5, K1 0.01, K2 0.03, valid positions only.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import NamedTuple

import numpy as np
import keras
import tensorflow as tf
from keras import layers, ops

WINDOW, SIGMA, K1, K2 = 11, 1.5, 0.01, 0.03


# ---------------------------------------------------------------------------------------------------------------
# Reconstruction: SSIM, PSNR, bits per code
# ---------------------------------------------------------------------------------------------------------------

def gaussian_filter_matrix(length: int, size: int = WINDOW, sigma: float = SIGMA) -> np.ndarray:
    """(length - size + 1, length) matrix whose rows are the normalised 1D Gaussian window at each valid offset."""
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    window = np.exp(-offsets ** 2 / (2 * sigma ** 2))
    window /= window.sum()
    matrix = np.zeros((length - size + 1, length), np.float32)
    for row in range(length - size + 1):
        matrix[row, row:row + size] = window
    return matrix


def ssim(images, reconstructions, size: int = WINDOW, sigma: float = SIGMA, k1: float = K1, k2: float = K2):
    """Per-image SSIM (Wang et al., 2004) of (batch, h, w, 1) images in [0, 1], data_range 1.

    The same statistic as tf.image.ssim and skimage's structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False): local means, variances and covariance under an 11x11 Gaussian window (valid
    positions only), averaged over the map. The separable window is applied as two matrix products, many times
    faster on a CPU than a single-channel 2D convolution; training reports SSIM every step, so this matters.
    """
    reconstructions = ops.clip(reconstructions, 0.0, 1.0)
    height, width = images.shape[1], images.shape[2]
    rows = ops.convert_to_tensor(gaussian_filter_matrix(height, size, sigma))
    cols = ops.convert_to_tensor(gaussian_filter_matrix(width, size, sigma).T)
    a, b = images[..., 0], reconstructions[..., 0]
    # the five maps stacked on the batch axis: two batched matmuls (an einsum over a channel axis was 2x slower)
    filtered = ops.matmul(ops.matmul(rows, ops.concatenate([a, b, a * a, b * b, a * b], axis=0)), cols)
    mean_a, mean_b, square_a, square_b, product = ops.split(filtered, 5, axis=0)
    variance_a = square_a - mean_a ** 2
    variance_b = square_b - mean_b ** 2
    covariance = product - mean_a * mean_b
    c1, c2 = k1 ** 2, k2 ** 2
    ssim_map = ((2 * mean_a * mean_b + c1) * (2 * covariance + c2)) / (
        (mean_a ** 2 + mean_b ** 2 + c1) * (variance_a + variance_b + c2))
    return ops.mean(ssim_map, axis=(1, 2))


def psnr(images: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
    """(n,) PSNR in dB of (n, h, w) [0, 1] images: 10 log10(1 / MSE), MSE floored at 1e-12 (identical images give
    120 dB, not infinity)."""
    mse = ((np.asarray(images, np.float64) - reconstructions) ** 2).mean(axis=(1, 2))
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-12))


def slice_scores(images: np.ndarray, reconstructions: np.ndarray, batch_size: int = 256):
    """(ssim, psnr): two (n,) arrays, the SSIM and PSNR (dB) of each (n, h, w) [0, 1] image against its
    reconstruction, in batches of `batch_size` to bound memory."""
    scores = [np.asarray(ssim(images[start:start + batch_size, ..., None],
                              reconstructions[start:start + batch_size, ..., None]))
              for start in range(0, len(images), batch_size)]
    return np.concatenate(scores), psnr(images, reconstructions)


def reconstruct(vqvae, images: np.ndarray, batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """(n, h, w) images -> (n, h, w) reconstructions through the VQ-VAE's quantizer, clipped to [0, 1]; a progress
    bar on stderr unless `progress` is false."""
    from tqdm import tqdm

    outputs = []
    for start in tqdm(range(0, len(images), batch_size), desc="reconstructing", unit="batch", disable=not progress,
                      file=sys.stderr):
        outputs.append(np.asarray(vqvae(images[start:start + batch_size, ..., None]))[..., 0])
    return np.clip(np.concatenate(outputs), 0.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# Realism of generated slices: SSIM to other slices
# ---------------------------------------------------------------------------------------------------------------

class _Moments(NamedTuple):
    """What SSIM needs of each image on its own, computed once: the image, its local means, and its halves of
    SSIM's two denominators (mean^2 + C1/2 and variance + C2/2), each (n, h - 10, w - 10) but the image."""
    images: tf.Tensor
    means: tf.Tensor
    luminance: tf.Tensor
    contrast: tf.Tensor


_TAPS = [float(weight) for weight in gaussian_filter_matrix(WINDOW)[0]]  # the 1D Gaussian window


def _shifted_sum(maps, axis: int):
    """`maps` Gaussian-filtered along `axis` (1: rows, 2: columns), valid positions only: the 11 taps as a sum of
    shifted slices, which XLA turns into one vectorised loop. It skips the zeros of the band that the filter matrix
    product of `ssim` multiplies: measured on 2 cores, 14 us a 128x128 map against 36 us."""
    length = maps.shape[axis] - WINDOW + 1
    window = (lambda tap: maps[:, tap:tap + length]) if axis == 1 else (lambda tap: maps[:, :, tap:tap + length])
    return tf.add_n([weight * window(tap) for tap, weight in enumerate(_TAPS)])


def _compiled_per_size(function):
    """`function` compiled by XLA once for each size of its first argument's maps: batches of any length reuse that
    size's trace (reduce_retracing), but images of another size get their own, because _shifted_sum slices by the
    maps' static size, which one trace relaxed over two sizes would leave unknown (a TypeError)."""
    traces = {}

    @functools.wraps(function)
    def call(*args):
        size = tuple(args[0].shape[1:])
        if size not in traces:
            traces[size] = tf.function(function, jit_compile=True, reduce_retracing=True)
        return traces[size](*args)

    return call


# Rows and columns are filtered in separate compiled calls: fused into one, XLA recomputes the 11 row taps for
# each of the 11 column taps.
@_compiled_per_size
def _filtered_rows(first, second):
    return _shifted_sum(first * second, axis=1)


@_compiled_per_size
def _filtered_columns(maps):
    return _shifted_sum(maps, axis=2)


@_compiled_per_size
def _ssim_from_rows(rows, mean, luminance, contrast, others: _Moments):
    """(m,) SSIM of one image against m others, from `rows`, the row-filtered products of the image with each of
    the others (m, h - 10, w), and the moments of both: only this covariance term is computed per pair."""
    means = mean[None] * others.means
    covariance = _shifted_sum(rows, axis=2) - means
    ssim_map = (2 * means + K1 ** 2) * (2 * covariance + K2 ** 2) / (
        (luminance[None] + others.luminance) * (contrast[None] + others.contrast))
    return tf.reduce_mean(ssim_map, axis=(1, 2))


def _moments(images: np.ndarray, chunk: int = 256) -> _Moments:
    """The _Moments of (n, h, w) images, in chunks of `chunk` images."""
    parts = []
    for start in range(0, len(images), chunk):
        batch = tf.constant(images[start:start + chunk], tf.float32)
        means = _filtered_columns(_filtered_rows(tf.ones_like(batch[:1]), batch))
        variances = _filtered_columns(_filtered_rows(batch, batch)) - means * means
        parts.append((means, means * means + K1 ** 2 / 2, variances + K2 ** 2 / 2))
    return _Moments(tf.constant(images, tf.float32), *(tf.concat(part, 0) for part in zip(*parts)))


def pairwise_ssim(first: np.ndarray, second: np.ndarray, chunk: int = 512) -> np.ndarray:
    """(len(first), len(second)) matrix of the SSIM of every slice of `first` against every slice of `second`, both
    (n, h, w) in [0, 1] of one shape; the same values as `ssim` on each pair (a test checks to 1e-5).

    Exact and fast: each image's local means and variances are computed once, not once per pair; per pair only
    the filtered product (the covariance term) remains, batched over `chunk` images of `second` at once (memory:
    about 200 kB per image of the chunk). Measured by bench/realism.py on 2 cores beside a training job: 256
    generated and 256 real slices against 1,182 training slices (605,000 pairs) in 42 s, 70 us a pair, where one
    `ssim` call per pair took about 3 ms."""
    mine, all_theirs = _moments(first), _moments(second)
    theirs = [_Moments(*(part[start:start + chunk] for part in all_theirs)) for start in range(0, len(second), chunk)]
    rows = []
    for index in range(len(first)):
        image, *moments = (part[index] for part in mine)
        rows.append(np.concatenate([np.asarray(_ssim_from_rows(_filtered_rows(image[None], others.images), *moments,
                                                               others)) for others in theirs]))
    return np.stack(rows) if rows else np.zeros((0, len(second)), np.float32)


def nearest_ssim(images: np.ndarray, references: np.ndarray) -> np.ndarray:
    """(n,) SSIM of each of (n, h, w) `images` to its nearest (most similar) slice of `references`: near 1 for a
    copy of a reference; real slices of unseen subjects show how close new anatomy comes to the references."""
    return pairwise_ssim(images, references).max(axis=1)


def mean_off_diagonal(matrix: np.ndarray) -> float:
    """Mean of a square matrix without its diagonal (a slice's SSIM to itself); NaN for a 1x1 matrix. Of a
    pairwise_ssim(x, x) matrix, the diversity of x: lower is more varied."""
    mask = ~np.eye(len(matrix), dtype=bool)
    return float(matrix[mask].mean()) if mask.any() else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# Realism of generated slices: shape and sharpness
# ---------------------------------------------------------------------------------------------------------------

def brain_shaped(image: np.ndarray, tissue: float, min_share: float = 0.98, min_solidity: float = 0.9) -> bool:
    """Whether a (h, w) [0, 1] slice's tissue (pixels above `tissue`, holes filled) is one piece with an intact
    outline: its largest connected piece holds at least `min_share` of it and fills at least `min_solidity` of its
    convex hull. Of the 1,857 slices of the shared MNI volumes, 99% of the middle 60% of each volume pass, 75% of
    all (the lowest and highest slices, where the brain is small, often fall apart into pieces); a sample whose
    outline breaks off, frays or splits fails."""
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
    """Share of (n, h, w) slices that are brain_shaped with tissue threshold `tissue` (the run's
    config.tissue_intensity)."""
    return float(np.mean([brain_shaped(image, tissue) for image in images]))


def edge_strength(images: np.ndarray, tissue: float) -> np.ndarray:
    """Sharpness of each (n, h, w) [0, 1] slice: the mean gradient magnitude (forward differences) over its pixels
    above `tissue`, NaN for a slice with none. Edges between cortex, white matter and fluid make it: the validate
    slices of the shared MNI volumes score 0.103 and their reconstructions 0.100, where blurred or washed-out
    tissue scores less, which the outline and nearest-SSIM figures do not see (EXPERIMENTS.md, Generation)."""
    images = np.asarray(images, np.float32)
    corner = images[:, :-1, :-1]
    magnitude = np.hypot(images[:, :-1, 1:] - corner, images[:, 1:, :-1] - corner)
    mask = corner > tissue
    counts = mask.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, (magnitude * mask).sum(axis=(1, 2)) / counts, np.nan)


def mirror_asymmetry(images: np.ndarray, tissue: float, sigma: float = 2.0, max_shift: int = 3) -> np.ndarray:
    """Left-right asymmetry of each (n, h, w) [0, 1] slice's layout: the mean absolute difference between the slice
    and its mirror image, both blurred by a Gaussian of `sigma` pixels (the layout, not the grain, which no two
    hemispheres share), over the pixels above `tissue` in either, at the best of the mirror image's shifts by up
    to `max_shift` pixels (a head up to max_shift / 2 pixels off the atlas midline is not asymmetric); NaN for a
    slice with no tissue. Two hemispheres with a ventricle each score low; one lopsided cavity scores high."""
    from scipy import ndimage

    images = ndimage.gaussian_filter(np.asarray(images, np.float32), (0, sigma, sigma))
    best = np.full(len(images), np.inf, np.float32)
    for shift in range(-max_shift, max_shift + 1):
        mirrored = np.roll(images[:, :, ::-1], shift, axis=2)
        mask = (images > tissue) | (mirrored > tissue)
        counts = mask.sum(axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            best = np.minimum(best, (np.abs(images - mirrored) * mask).sum(axis=(1, 2)) / counts)
    return np.where(np.isfinite(best), best, np.nan)


# ---------------------------------------------------------------------------------------------------------------
# Realism of generated slices: small CNNs (classifier two-sample test, level check)
# ---------------------------------------------------------------------------------------------------------------

def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of (n,) `scores` for (n,) 0/1 `labels`: the probability that a random positive
    scores above a random negative (ties count half), as the Mann-Whitney rank statistic."""
    from scipy.stats import rankdata

    labels = np.asarray(labels).astype(bool)
    positives, negatives = labels.sum(), (~labels).sum()
    if not positives or not negatives:
        raise ValueError("roc_auc needs both labels")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def grouped_folds(labels: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """(n,) fold index of each sample, stratified by label and grouped: each label's groups (e.g. subjects), in a
    seeded random order, are dealt round the folds whole, so no group is on both sides of a split and every fold
    holds each label's groups in the same proportion (to one group). Fewer folds than asked when a label has fewer
    groups: min(folds, the fewest groups of any label)."""
    rng = np.random.default_rng(seed)
    labels, groups = np.asarray(labels), np.asarray(groups)
    count = min([folds] + [len(np.unique(groups[labels == label])) for label in np.unique(labels)])
    assignment = np.zeros(len(labels), np.int64)
    for label in np.unique(labels):
        mine = labels == label
        for index, group in enumerate(rng.permutation(np.unique(groups[mine]))):
            assignment[mine & (groups == group)] = index % count
    return assignment


def small_cnn(image_shape: tuple[int, int], output_activation: str | None = None) -> keras.Model:
    """The CNN of the classifier test and the level check: (b, h, w, 1) -> (b, 1). 2x2 average pooling (half
    resolution keeps the outline and coarse texture at a quarter of the cost), three stride-2 3x3 convolutions
    (8, 16, 32 filters, ReLU), and one output from the flattened map: flattened, not pooled, because where tissue
    lies matters (brains sit in atlas position). About 8,000 weights at 128x128; an epoch over 400 slices takes
    about 0.3 s on 2 cores."""
    inputs = keras.Input((*image_shape, 1))
    features = layers.AveragePooling2D(2)(inputs)
    for filters in (8, 16, 32):
        features = layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu")(features)
    outputs = layers.Dense(1, activation=output_activation)(layers.Flatten()(features))
    return keras.Model(inputs, outputs)


MAX_PASSES = 24  # over its training slices, for a classifier or level regressor


class _Trainer:
    """A compiled small_cnn that can be trained afresh many times: each fit starts again from the weights that
    `restart(seed)` drew and a new optimizer state, so the folds of a classifier test, and later tests on slices of
    the same shape, reuse one traced training step instead of paying about 2 s of tracing each."""

    def __init__(self, image_shape: tuple[int, int], regression: bool, learning_rate: float = 2e-3):
        self.image_shape, self.regression = image_shape, regression
        self.model = small_cnn(image_shape, "sigmoid" if regression else None)
        loss = "mean_squared_error" if regression else keras.losses.BinaryCrossentropy(from_logits=True)
        self.model.compile(keras.optimizers.Adam(learning_rate), loss)
        self.model.optimizer.build(self.model.trainable_variables)
        self.optimizer_start = [variable.numpy() for variable in self.model.optimizer.variables]
        self.forward = tf.function(lambda images: self.model(images, training=False), reduce_retracing=True)
        self.restart(0)

    def restart(self, seed: int) -> None:
        """Seeds Keras (keras.utils.set_random_seed) and draws the first weights of every following fit."""
        keras.utils.set_random_seed(seed)
        self.seed = seed
        self.first_weights = small_cnn(self.image_shape, "sigmoid" if self.regression else None).get_weights()

    def fit(self, images, targets, steps: int, batch_size: int = 32) -> None:
        """Trains afresh on `steps` batches drawn from (n, h, w) `images` and (n,) `targets`, reshuffled each pass
        (seeded): one Keras epoch of `steps` steps, since per-epoch overhead would dominate on a few images. At
        most MAX_PASSES passes over the images: a few slices (predict.py --num 8) need no 150 steps, and the
        tables' 256 samples and real training splits reach `steps` first."""
        steps = min(steps, math.ceil(MAX_PASSES * len(images) / batch_size))
        self.model.set_weights(self.first_weights)
        for variable, value in zip(self.model.optimizer.variables, self.optimizer_start):
            variable.assign(value)
        data = tf.data.Dataset.from_tensor_slices((images[..., None], np.asarray(targets, np.float32)))
        data = data.shuffle(len(images), seed=self.seed).repeat().batch(batch_size)
        self.model.fit(data, epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0)

    def predict(self, images, batch_size: int = 256) -> np.ndarray:
        """(n,) outputs for (n, h, w) slices (Keras's predict costs 0.2 s a call to set up; this, nothing)."""
        return np.concatenate([np.asarray(self.forward(images[start:start + batch_size, ..., None]))[:, 0]
                               for start in range(0, len(images), batch_size)])


@functools.lru_cache(maxsize=4)
def _trainer(image_shape: tuple[int, int], regression: bool) -> _Trainer:
    return _Trainer(image_shape, regression)


class TwoSampleTest(NamedTuple):
    """The result of classifier_auc: the out-of-fold `auc`, the number of `folds` it used, and each slice's
    out-of-fold score (a logit: higher, more like the first set), (n,) `first_scores` and (m,) `second_scores`."""
    auc: float
    folds: int
    first_scores: np.ndarray
    second_scores: np.ndarray


def classifier_auc(first: np.ndarray, second: np.ndarray, first_groups=None, second_groups=None, folds: int = 5,
                   seed: int = 0, steps: int = 150) -> TwoSampleTest:
    """Classifier two-sample test: out-of-fold ROC AUC of a small CNN trained to tell (n, h, w) slices `first`
    (label 1, e.g. generated) from (m, h, w) slices `second` (label 0, e.g. real training slices).

    Cross-validation stratified by label and grouped by (n,) `first_groups` and (m,) `second_groups` (e.g. each
    real slice's subject; None: every slice its own group), see grouped_folds: for each fold a fresh small_cnn is
    trained on the other folds (Adam 2e-3, about `steps` batches of 32, at most MAX_PASSES passes over them) and
    scores the fold; the AUC is of all n + m held-out scores together. Grouping matters: neighbouring slices of one
    subject are near copies, and with a subject on both sides of a split the CNN recognises the subject instead of
    judging the slice (measured on the shared MNI volumes: real training against real test slices scored AUC 0.99
    in plain 5-fold, 0.57 grouped by subject). 0.5: the CNN cannot tell the two apart; 1 (or 0): it always can.
    Seeded by `seed` (it resets Keras's global seeds, keras.utils.set_random_seed): the same inputs and seed give the
    same AUC on one machine.
    """
    # groups are only compared within a label: the two sides may use the same names
    first_groups = np.arange(len(first)) if first_groups is None else np.asarray(first_groups)
    second_groups = np.arange(len(second)) if second_groups is None else np.asarray(second_groups)
    images = np.concatenate([first, second]).astype(np.float32)
    labels = np.concatenate([np.ones(len(first)), np.zeros(len(second))])
    fold_of = grouped_folds(labels, np.concatenate([first_groups.astype(str), second_groups.astype(str)]), folds,
                            seed)
    if fold_of.max() < 1:
        raise ValueError("classifier_auc needs at least 2 groups on each side")
    trainer = _trainer(images.shape[1:], regression=False)
    trainer.restart(seed)
    scores = np.zeros(len(images), np.float32)
    for fold in range(fold_of.max() + 1):
        held_out = fold_of == fold
        trainer.fit(images[~held_out], labels[~held_out], steps)
        scores[held_out] = trainer.predict(images[held_out])
    return TwoSampleTest(roc_auc(labels, scores), int(fold_of.max() + 1), scores[:len(first)], scores[len(first):])


def level_mae(images: np.ndarray, levels: np.ndarray, evaluations: dict, seed: int = 0, steps: int = 400) -> dict:
    """Level check: a small CNN (sigmoid output) learns the axial level in [0, 1] from (n, h, w) slices `images`
    with (n,) `levels` (Adam 2e-3, mean squared error, about `steps` batches of 32 or MAX_PASSES passes, whichever
    is fewer; slices with a NaN level are left out), then predicts the level of each set of `evaluations`,
    {name: ((m, h, w) slices, (m,) levels)}.
    Returns {name: mean absolute error of the predicted against the given levels}: the requested level for
    generated slices, the true one for real slices; NaN for a set with no known level. Seeded like classifier_auc.
    """
    known = np.isfinite(levels)
    if not known.any():
        raise ValueError("level_mae needs training slices with known levels")
    trainer = _trainer(images.shape[1:], regression=True)
    trainer.restart(seed)
    trainer.fit(np.asarray(images[known], np.float32), levels[known], steps)
    errors = {}
    for name, (slices, targets) in evaluations.items():
        known = np.isfinite(targets)
        if not known.any():
            errors[name] = float("nan")
            continue
        predicted = trainer.predict(np.asarray(slices[known], np.float32))
        errors[name] = float(np.abs(predicted - targets[known]).mean())
    return errors
