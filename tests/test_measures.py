"""The realism measures of measures.py on small synthetic images: the fast pairwise SSIM is the plain SSIM of every
pair, the AUC is the rank statistic, the classifier two-sample test tells different distributions apart and not
equal ones, and the level regressor learns a level from the image."""

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from measures import (classifier_auc, edge_strength, grouped_folds, level_mae, mean_off_diagonal,  # noqa: E402
                      mirror_asymmetry, nearest_ssim, pairwise_ssim, roc_auc, ssim)

SIZE = 32


def ellipses(count: int, seed: int, radius=None, spot: bool = False) -> np.ndarray:
    """(count, 32, 32) bright textured ellipses on black, of random size (or `radius` (count,) between 0 and 1),
    with a bright square spot in the upper left when `spot`."""
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.linspace(-1, 1, SIZE), np.linspace(-1, 1, SIZE), indexing="ij")
    radius = rng.uniform(0.5, 0.9, count) if radius is None else radius
    images = []
    for size in radius:
        image = (np.hypot(rows / size, cols / (0.8 * size)) < 1) * (0.6 + 0.2 * np.sin(6 * rows + rng.uniform(0, 6)))
        image += rng.normal(0, 0.03, image.shape)
        if spot:
            image[4:10, 4:10] = 1.0
        images.append(np.clip(image, 0, 1))
    return np.array(images, np.float32)


def test_pairwise_ssim_is_the_plain_ssim_of_every_pair():
    first = ellipses(5, seed=1)
    second = np.concatenate([ellipses(6, seed=2), first[:1]])
    fast = pairwise_ssim(first, second, chunk=4)  # chunks of 4: the last one is partial
    slow = np.array([[float(ssim(a[None, ..., None], b[None, ..., None])[0]) for b in second] for a in first])
    assert fast.shape == (5, 7)
    np.testing.assert_allclose(fast, slow, atol=1e-5)
    np.testing.assert_allclose(nearest_ssim(first, second), slow.max(axis=1), atol=1e-5)
    assert nearest_ssim(first[:1], second)[0] == pytest.approx(1.0, abs=1e-5)  # its own copy is in `second`
    assert 0.1 < slow[:, :6].mean() < 0.95  # the pairs differ: a real check, not only copies
    # slices of another size in the same process (predict.py scoring two runs' slices, a bench comparing them)
    first, second = first[:, 4:28, 6:26], second[:, 4:28, 6:26]
    slow = np.array([[float(ssim(a[None, ..., None], b[None, ..., None])[0]) for b in second] for a in first])
    np.testing.assert_allclose(pairwise_ssim(first, second, chunk=4), slow, atol=1e-5)


def test_mean_off_diagonal_leaves_out_each_slice_against_itself():
    assert mean_off_diagonal(np.array([[1.0, 0.2], [0.4, 1.0]])) == pytest.approx(0.3)
    assert np.isnan(mean_off_diagonal(np.ones((1, 1))))


def test_edge_strength_is_the_mean_gradient_inside_the_tissue_and_falls_with_blur():
    from scipy import ndimage

    step = np.zeros((1, 8, 8), np.float32)
    step[0, :, 4:] = 1.0  # tissue in columns 4-7, flat: the edge is measured at column 3, which is not tissue
    assert edge_strength(step, tissue=0.5)[0] == 0.0
    step[0, :, 4:6] = 0.6  # two tissue levels: an edge of 0.4 at column 5, 1 of the 3 tissue columns measured
    assert edge_strength(step, tissue=0.5)[0] == pytest.approx(0.4 / 3)
    assert np.isnan(edge_strength(np.zeros((1, 8, 8), np.float32), tissue=0.5)[0])  # no tissue, no figure
    sharp = ellipses(4, seed=3)
    sharp[:, ::4] *= 0.5  # stripes: edges inside the tissue
    blurred = np.stack([ndimage.gaussian_filter(image, 1.5) for image in sharp])
    assert (edge_strength(blurred, 0.1) < 0.6 * edge_strength(sharp, 0.1)).all()


def test_mirror_asymmetry_sees_a_lopsided_cavity_not_a_head_off_the_midline():
    rows, cols = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    head = (np.hypot((rows - 15.5) / 13, (cols - 15.5) / 11) < 1) * 0.8
    paired, lopsided = head.copy(), head.copy()
    for cols_of_cavity in (slice(11, 13), slice(19, 21)):  # mirror images about the midline (columns 15 | 16)
        paired[12:20, cols_of_cavity] = 0.05
    lopsided[12:20, 9:13] = 0.05  # as large and dark, one side only
    images = np.stack([head, np.roll(head, 1, axis=1), paired, lopsided]).astype(np.float32)
    asymmetry = mirror_asymmetry(images, tissue=0.1)
    assert asymmetry[0] < 1e-4 and asymmetry[1] < 1e-4  # symmetric, and symmetric about a shifted midline
    assert asymmetry[2] < 1e-4 < 0.05 < asymmetry[3]
    assert np.isnan(mirror_asymmetry(np.zeros((1, SIZE, SIZE), np.float32), tissue=0.1)[0])


def test_roc_auc_is_the_rank_statistic():
    assert roc_auc([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.2]) == 1.0
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.9, 0.8]) == 0.0
    assert roc_auc([1, 0, 1, 0], [0.5, 0.5, 0.7, 0.1]) == pytest.approx(0.875)  # one tie counts half
    with pytest.raises(ValueError):
        roc_auc([1, 1], [0.2, 0.3])


def test_grouped_folds_keep_groups_whole_and_labels_in_proportion():
    labels = np.array([1] * 10 + [0] * 15)
    folds = grouped_folds(labels, np.arange(25), 5, seed=0)  # every sample its own group: plain stratified folds
    for fold in range(5):
        assert (labels[folds == fold] == 1).sum() == 2 and (labels[folds == fold] == 0).sum() == 3
    assert not np.array_equal(folds, grouped_folds(labels, np.arange(25), 5, seed=1))
    subjects = np.array(list("aabbccddee") + list("fffffggggghhhhh"))
    folds = grouped_folds(labels, subjects, 5, seed=0)
    assert all(len(set(folds[subjects == subject])) == 1 for subject in set(subjects))
    assert set(folds) == {0, 1, 2}  # label 0 has only 3 subjects: 3 folds


def test_classifier_auc_is_near_1_for_different_distributions():
    test = classifier_auc(ellipses(64, seed=3, spot=True), ellipses(64, seed=4), seed=0, steps=60)
    assert test.auc > 0.95 and test.folds == 5
    # each slice's out-of-fold score comes back with it, and the AUC is theirs
    assert test.first_scores.shape == (64,) and test.second_scores.shape == (64,)
    assert test.auc == roc_auc(np.r_[np.ones(64), np.zeros(64)], np.r_[test.first_scores, test.second_scores])


def test_classifier_auc_is_near_half_for_one_distribution():
    """128 + 128 slices: at 64 + 64 the cross-validated AUC of some same-distribution samples strayed to 0.3."""
    assert abs(classifier_auc(ellipses(128, seed=5), ellipses(128, seed=6), seed=0, steps=60).auc - 0.5) < 0.15


def test_classifier_auc_grouped_by_subject_does_not_recognise_subjects():
    """Both sides: 16 "subjects" of one distribution, 6 near-copies each (as neighbouring slices are). Split plainly,
    the CNN learns which subject is on which side (AUC 0.78 to 0.80 over three draws of subjects); grouped, it has
    nothing to go on (0.29 to 0.57: few groups make a noisy test)."""
    first, second = (np.repeat(ellipses(16, seed=seed), 6, axis=0) for seed in (9, 10))
    first, second = (np.clip(images + np.random.default_rng(11).normal(0, 0.02, images.shape), 0, 1)
                     .astype(np.float32) for images in (first, second))
    subjects = np.repeat(np.arange(16), 6)
    assert classifier_auc(first, second, seed=0, steps=100).auc > 0.7
    assert classifier_auc(first, second, subjects, subjects, seed=0, steps=100).auc < 0.62


def test_classifier_auc_is_seeded():
    first, second = ellipses(30, seed=7), ellipses(30, seed=8, spot=True)
    auc = classifier_auc(first, second, seed=3, steps=10).auc  # barely trained: scores vary by seed
    assert classifier_auc(first, second, seed=3, steps=10).auc == auc
    assert classifier_auc(first, second, seed=4, steps=10).auc != auc


def test_level_check_learns_a_level_from_the_image():
    levels = np.random.default_rng(7).uniform(0, 1, 260).astype(np.float32)
    images = ellipses(260, seed=8, radius=0.3 + 0.6 * levels)  # the level sets the ellipse's size
    train_levels = levels[:200].copy()
    train_levels[:20] = np.nan  # unknown levels are left out of training
    errors = level_mae(images[:200], train_levels, {"right": (images[200:], levels[200:]),
                                                    "wrong": (images[200:], 1 - levels[200:]),
                                                    "unknown": (images[:3], np.full(3, np.nan))}, seed=0)
    assert errors["right"] < 0.08  # guessing 0.5 scores about 0.25
    assert errors["wrong"] > 0.15  # against other levels than the slices show, it is far off
    assert np.isnan(errors["unknown"])
