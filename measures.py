"""The measures of OASISVQ, in one place: SSIM and PSNR of reconstructions, bits per code of a prior, and the
realism figures of generated slices. similarity.py, predict.py, train.py and bench/ import them from here."""

from __future__ import annotations

import numpy as np
import keras
from keras import ops


def gaussian_filter_matrix(length: int, size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """(length - size + 1, length) matrix whose rows are the normalised 1D Gaussian window at each valid offset."""
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    window = np.exp(-offsets ** 2 / (2 * sigma ** 2))
    window /= window.sum()
    matrix = np.zeros((length - size + 1, length), np.float32)
    for row in range(length - size + 1):
        matrix[row, row:row + size] = window
    return matrix


def ssim(images, reconstructions, size: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03):
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


def bits_per_code(logits, codes):
    """Mean negative log-likelihood of `codes` under `logits`, in bits."""
    nll = keras.losses.sparse_categorical_crossentropy(codes, logits, from_logits=True)
    return ops.mean(nll) / np.log(2.0)
