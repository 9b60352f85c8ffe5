"""SSIM and PSNR as measures.py computes them agree with tf.image.ssim and skimage on real and synthetic slices;
similarity.py's summary has CLI.md's fields; the brain-shape check tells an intact outline from a broken one."""

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402
from skimage.metrics import peak_signal_noise_ratio, structural_similarity  # noqa: E402

from conftest import make_slice  # noqa: E402
from dataset import load_slices, square_and_resize  # noqa: E402
from hyperparameters import make_config  # noqa: E402
from measures import brain_shaped, psnr, slice_scores, ssim  # noqa: E402
from similarity import summarize  # noqa: E402


def degraded(images: np.ndarray) -> np.ndarray:
    """Blurred, noisy copies, standing in for imperfect reconstructions."""
    rng = np.random.default_rng(0)
    blurred = (images + np.roll(images, 1, axis=1) + np.roll(images, 1, axis=2)) / 3
    return np.clip(blurred + rng.normal(0, 0.03, images.shape), 0, 1).astype(np.float32)


def assert_ssim_agrees(images: np.ndarray) -> None:
    others = degraded(images)
    ours = np.asarray(ssim(images[..., None], others[..., None]))
    reference = tf.image.ssim(images[..., None], others[..., None], max_val=1.0, filter_size=11, filter_sigma=1.5,
                              k1=0.01, k2=0.03).numpy()
    sk = np.array([structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                         data_range=1.0) for a, b in zip(images, others)])
    assert np.abs(ours - reference).max() < 1e-3
    assert np.abs(ours - sk).max() < 1e-3
    assert 0.2 < ours.mean() < 0.999  # a real comparison, not identical images


def test_ssim_agrees_with_tensorflow_and_skimage_on_synthetic_slices():
    images = square_and_resize(np.stack([make_slice(seed=seed) for seed in range(6)]).astype(np.float32), 128)
    assert_ssim_agrees(images)


def test_ssim_agrees_with_tensorflow_and_skimage_on_real_slices(shared_data, tmp_path):
    slices = load_slices(str(shared_data / "oasis1-t88-axial"), make_config(), tmp_path, progress=False)
    assert_ssim_agrees(slices.images[:24])


def test_psnr_agrees_with_skimage():
    images = square_and_resize(np.stack([make_slice(seed=seed) for seed in range(4)]).astype(np.float32), 128)
    others = degraded(images)
    reference = [peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in zip(images, others)]
    np.testing.assert_allclose(psnr(images, others), reference, rtol=1e-5)
    assert 15 < np.mean(reference) < 60  # a real comparison


def test_identical_images_score_one_and_summary_fields():
    images = square_and_resize(np.stack([make_slice(seed=seed) for seed in range(4)]).astype(np.float32), 128)
    values, decibels = slice_scores(images, images)
    np.testing.assert_allclose(values, 1.0, atol=1e-5)
    np.testing.assert_allclose(decibels, 120.0)  # MSE 0 is floored at 1e-12, not infinite
    summary = summarize(np.array([0.5, 0.7, 0.9]), np.array([20.0, 30.0, 40.0]))
    assert summary["n"] == 3 and summary["ssim"]["frac_above_0.6"] == pytest.approx(2 / 3)
    assert summary["ssim"]["median"] == pytest.approx(0.7) and summary["psnr"]["mean"] == pytest.approx(30.0)


def test_brain_shaped_accepts_one_solid_outline_and_rejects_broken_ones():
    rows, cols = np.meshgrid(np.linspace(-1, 1, 128), np.linspace(-1, 1, 128), indexing="ij")
    ellipse = ((rows / 0.8) ** 2 + (cols / 0.6) ** 2 < 1).astype(np.float32) * 0.7
    ellipse[(rows / 0.2) ** 2 + (cols / 0.1) ** 2 < 1] = 0.05  # dark ventricles inside are fine
    assert brain_shaped(ellipse, 0.1)
    split = ellipse * (np.abs(cols) > 0.1)  # two halves apart
    assert not brain_shaped(split, 0.1)
    bitten = ellipse * ~((np.abs(rows) < 0.15) & (cols > 0))  # a notch into the outline
    assert not brain_shaped(bitten, 0.1)
    assert not brain_shaped(np.zeros((128, 128), np.float32), 0.1)
