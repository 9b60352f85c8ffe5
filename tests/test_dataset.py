"""dataset.py on data the tests make (every source type, splits, tissue threshold, cache, bad input), and on the
real OASIS subset in ../shared/data when it is present."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import re
import subprocess
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

import dataset
from conftest import (PROJECT_ROOT, RGB_DTYPE, make_slice, make_volume, subprocess_env, write_analyze,
                      write_jpeg, write_nifti, write_png)
from hyperparameters import make_config


def load(folder, config, cache, **kwargs) -> dataset.SliceSet:
    """load_slices in-process (workers=1, so monkeypatching dataset functions takes effect), no progress bars."""
    kwargs.setdefault("workers", 1)
    return dataset.load_slices(str(folder), config, cache, progress=False, **kwargs)


def assert_clean_slices(slice_set: dataset.SliceSet, size: int = 128) -> None:
    images = slice_set.images
    assert images.dtype == np.float32
    assert images.ndim == 3 and images.shape[1:] == (size, size) and len(images) > 0
    assert np.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert images.max() > 0.5  # scaled to use the range, not left near zero
    n = len(images)
    assert len(slice_set.subjects) == len(slice_set.sources) == len(slice_set.indices) == len(slice_set.splits) == n
    assert slice_set.levels.dtype == np.float32 and slice_set.levels.shape == (n,)
    known = slice_set.levels[np.isfinite(slice_set.levels)]
    assert ((known >= 0) & (known <= 1)).all()
    assert set(slice_set.splits) <= {*dataset.SPLITS, dataset.EXCLUDED}


def subjects_by_split(slice_set: dataset.SliceSet) -> dict[str, set[str]]:
    found = defaultdict(set)
    for subject, split in zip(slice_set.subjects, slice_set.splits):
        found[str(split)].add(str(subject))
    return found


def assert_no_subject_in_two_splits(slice_set: dataset.SliceSet) -> None:
    found = subjects_by_split(slice_set)
    for first in dataset.SPLITS:
        for second in dataset.SPLITS:
            if first < second:
                assert not found[first] & found[second], f"subjects in both {first} and {second}"


def nifti_folder(root: Path, subjects: list[str], shape=(40, 48, 40)) -> Path:
    for number, name in enumerate(subjects):
        write_nifti(root / f"{name}.nii.gz", make_volume(shape, seed=number))
    return root


# ---------------------------------------------------------------------------------------------------------------
# Subject ids
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("OAS1_0061_MR1_mpr_n4_anon_111_t88_masked_gfc.hdr", "OAS1_0061"),
    ("OAS1_0061_MR2_mpr_n4_anon_111_t88_masked_gfc.hdr", "OAS1_0061"),  # a second session: the same subject
    ("OAS1_0003_MR1_a.jpg", "OAS1_0003"),
    ("sub-0061_T1w_jdac.nii.gz", "OAS1_0061"),  # the MNI files name the same subject this way
    ("case_012_slice_7.nii.png", "case_012"),
    ("OAS2_0001_MR1_mpr-1.nifti.hdr", "OAS2_0001"),
    ("brain.nii.gz", "brain"),
])
def test_subject_id(name, expected):
    assert dataset.subject_id(Path("some/folder") / name) == expected


def test_subject_id_uses_the_file_name_not_its_folder():
    assert dataset.subject_id(Path("OAS1_0001_MR1/sub-0002_T1w.nii.gz")) == "OAS1_0002"


# ---------------------------------------------------------------------------------------------------------------
# Each source type
# ---------------------------------------------------------------------------------------------------------------

def test_folder_of_nifti(tmp_path, config, cache):
    folder = tmp_path / "volumes"
    nifti_folder(folder / "nested", ["OAS1_0001_MR1", "OAS1_0002_MR1", "sub-0003_T1w"])
    write_nifti(folder / "OAS1_0004_MR1.nii", make_volume(seed=4))  # uncompressed .nii too
    (folder / "notes.txt").write_text("not data")  # other files are ignored
    slices = load(folder, config, cache)
    assert_clean_slices(slices)
    assert set(slices.subjects) == {"OAS1_0001", "OAS1_0002", "OAS1_0003", "OAS1_0004"}
    assert set(slices.sources) == {"nested/OAS1_0001_MR1.nii.gz", "nested/OAS1_0002_MR1.nii.gz",
                                   "nested/sub-0003_T1w.nii.gz", "OAS1_0004_MR1.nii"}
    assert slices.skipped == []
    assert slices.source == str(folder)
    for subject in set(slices.subjects):  # 24 of the 40 axial slices of each synthetic volume carry tissue
        assert (slices.subjects == subject).sum() == 24
    assert slices.indices.dtype.kind == "i"
    assert sorted(slices.indices[slices.subjects == "OAS1_0001"]) == list(range(8, 32))


def test_folder_of_analyze_big_endian(tmp_path, config, cache):
    folder = tmp_path / "analyze"
    for number in (1, 2, 3):
        hdr = write_analyze(folder / f"OAS1_000{number}_MR1_mpr_n4_anon_111_t88_masked_gfc.hdr",
                            make_volume(seed=number))
        assert hdr.read_bytes()[:4] == (348).to_bytes(4, "big")  # really big-endian, like the OASIS discs
        assert hdr.with_suffix(".img").exists()
    slices = load(folder, config, cache)
    assert_clean_slices(slices)
    assert set(slices.subjects) == {"OAS1_0001", "OAS1_0002", "OAS1_0003"}
    assert all(source.endswith(".hdr") for source in slices.sources)  # one entry per pair, never the .img


def test_analyze_and_nifti_of_the_same_volume_agree(tmp_path, config):
    volume = make_volume(seed=7)
    nifti = write_nifti(tmp_path / "a.nii.gz", volume, np.diag([-1.0, 1.0, 1.0, 1.0]))  # LAS like Analyze
    analyze = write_analyze(tmp_path / "b.hdr", volume)
    from_nifti, keep_nifti, levels_nifti = dataset.volume_slices(nifti, config)
    from_analyze, keep_analyze, levels_analyze = dataset.volume_slices(analyze, config)
    assert np.array_equal(keep_nifti, keep_analyze) and np.array_equal(levels_nifti, levels_analyze)
    assert np.abs(from_nifti - from_analyze).max() < 0.01  # int16 quantisation only


def test_folder_of_images(tmp_path, config, cache):
    folder = tmp_path / "pngs"
    for subject in range(1, 7):
        for index in range(3):
            write_png(folder / f"OAS1_{subject:04d}_MR1_slice_{index}.png", make_slice(seed=subject * 10 + index),
                      bits=16 if subject % 2 else 8)
    write_png(folder / "OAS1_0007_MR1_rgb.png", make_slice(seed=70), rgb=True)
    write_jpeg(folder / "OAS1_0008_MR1_a.jpg", make_slice(seed=80))
    write_jpeg(folder / "OAS1_0009_MR1_a.jpeg", make_slice(seed=90))
    slices = load(folder, config, cache)
    assert_clean_slices(slices)
    assert len(slices) == 6 * 3 + 3
    assert set(slices.subjects) == {f"OAS1_{number:04d}" for number in range(1, 10)}
    assert (slices.indices == 0).all()  # a 2D image is one slice
    assert np.isnan(slices.levels).all()  # and does not say where in the head it was cut
    assert set(slices.splits) == set(dataset.SPLITS)  # assigned by subject
    assert_no_subject_in_two_splits(slices)


def test_8_and_16_bit_png_give_the_same_slice(tmp_path, config):
    image = make_slice(seed=3)
    eight, _, _ = dataset.image_slices(write_png(tmp_path / "a.png", image, bits=8), config)
    sixteen, _, _ = dataset.image_slices(write_png(tmp_path / "b.png", image, bits=16), config)
    rgb, _, _ = dataset.image_slices(write_png(tmp_path / "c.png", image, rgb=True), config)
    assert eight.shape == sixteen.shape == rgb.shape == (1, 128, 128)
    assert np.abs(eight - sixteen).max() < 0.02
    assert np.abs(eight - rgb).max() < 0.02


def make_course_layout(root: Path, cases: dict[str, list[int]], slices_per_case: int = 2) -> Path:
    data = root / "keras_png_slices_data"
    for split, numbers in cases.items():
        for case in numbers:
            for index in range(slices_per_case):
                write_png(data / f"keras_png_slices_{split}" / f"case_{case:03d}_slice_{index}.nii.png",
                          make_slice((64, 64), seed=case * 100 + index))
    # segmentation masks: bright, non-empty images that would be kept if they were read
    for case in cases["train"]:
        mask = np.zeros((64, 64), np.float32)
        mask[10:50, 10:50] = 1.0
        write_png(data / "keras_png_slices_seg_train" / f"seg_{case:03d}_slice_0.nii.png", mask)
    return data


def test_course_layout_keeps_its_own_split_and_ignores_masks(tmp_path, config, cache):
    cases = {"train": [1, 2, 3, 4], "validate": [10, 11], "test": [20]}
    data = make_course_layout(tmp_path, cases)
    slices = load(data, config, cache)
    assert_clean_slices(slices)
    assert len(slices) == 7 * 2
    assert not any("seg" in source for source in slices.sources)
    by_split = subjects_by_split(slices)
    for split, numbers in cases.items():
        assert by_split[split] == {f"case_{number:03d}" for number in numbers}
        assert set(slices.select(split).subjects) == by_split[split]
    assert len(slices.select("all")) == len(slices)
    # the folders decide the split whatever split_seed says
    other = load(data, make_config(overrides=["split_seed=7"]), cache)
    assert np.array_equal(other.splits, slices.splits)


def test_course_layout_found_from_a_parent_folder(tmp_path, config, cache):
    make_course_layout(tmp_path / "download", {"train": [1, 2], "validate": [3], "test": [4]}, slices_per_case=1)
    slices = load(tmp_path / "download", config, cache)
    assert dict(zip(slices.subjects, slices.splits)) == {"case_001": "train", "case_002": "train",
                                                         "case_003": "validate", "case_004": "test"}


# ---------------------------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------------------------

def test_splits_by_subject_disjoint_and_deterministic(tmp_path, config):
    folder = tmp_path / "volumes"
    names = [f"OAS1_{number:04d}_MR1" for number in range(1, 11)]
    nifti_folder(folder, names, shape=(24, 28, 24))
    # second sessions of two subjects: they must land in the same split as the first session
    write_nifti(folder / "OAS1_0001_MR2.nii.gz", make_volume((24, 28, 24), seed=50))
    write_nifti(folder / "sub-0002_T1w.nii.gz", make_volume((24, 28, 24), seed=51))
    first = load(folder, config, tmp_path / "cache1")
    second = load(folder, config, tmp_path / "cache2")  # built again from scratch
    assert len(set(first.subjects)) == 10
    assert_no_subject_in_two_splits(first)
    assert set(first.splits) == set(dataset.SPLITS)
    assert np.array_equal(first.subjects, second.subjects)
    assert np.array_equal(first.splits, second.splits)
    for subject in ("OAS1_0001", "OAS1_0002"):  # both sessions/files of a subject together
        assert len(set(first.splits[first.subjects == subject])) == 1
    assert (first.select("train").splits == "train").all()
    assert sum(len(first.select(split)) for split in dataset.SPLITS) == len(first)

    assignments = set()
    for seed in range(6):
        seeded = load(folder, make_config(overrides=[f"split_seed={seed}"]), tmp_path / "cache1")
        assert_no_subject_in_two_splits(seeded)
        assignments.add(tuple(seeded.splits))
    assert len(assignments) > 1  # the seed does move subjects


def test_excluded_subjects_are_in_no_split_and_move_no_other_subject(tmp_path, config, cache):
    folder = nifti_folder(tmp_path / "volumes", [f"OAS1_{number:04d}_MR1" for number in range(1, 8)],
                          shape=(24, 28, 24))
    kept = load(folder, make_config(overrides=["exclude_subjects="]), cache)
    left_out = ["OAS1_0003", "OAS1_0005"]
    excluded = load(folder, make_config(overrides=[f"exclude_subjects={','.join(left_out)}"]), cache)
    assert config.exclude_subjects == ["OAS1_0198"]  # the default: the shared volume that is not registered
    gone = np.isin(excluded.subjects, left_out)
    assert gone.any() and (excluded.splits[gone] == dataset.EXCLUDED).all()
    assert np.array_equal(excluded.splits[~gone], kept.splits[~gone])  # the others keep their splits
    for split in (*dataset.SPLITS, "all"):
        assert not set(left_out) & set(excluded.select(split).subjects)
    assert len(excluded.select("all")) == (~gone).sum()
    assert excluded.fingerprint() == kept.fingerprint()  # runs made before a subject was left out still match


def test_assign_splits_fractions_and_seed(config):
    subjects = [f"OAS1_{number:04d}" for number in range(100)]
    assignment = dataset.assign_splits(subjects + subjects[:10], config)  # duplicates do not matter
    assert set(assignment) == set(subjects)
    counts = {split: sum(1 for value in assignment.values() if value == split) for split in dataset.SPLITS}
    assert counts == {"train": 70, "validate": 15, "test": 15}
    assert dataset.assign_splits(list(reversed(subjects)), config) == assignment  # order of input is irrelevant
    assert dataset.assign_splits(subjects, make_config(overrides=["split_seed=1"])) != assignment
    small = dataset.assign_splits(["a", "b", "c"], config)
    assert sorted(small.values()) == ["test", "train", "validate"]  # every split gets one when it can


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------------------------

def test_tissue_threshold_drops_empty_slices(tmp_path, config, cache):
    volume = make_volume()
    empty = np.flatnonzero(volume.max(axis=(0, 1)) == 0)
    assert len(empty) >= 10  # the synthetic volume has empty slices at both ends
    path = write_nifti(tmp_path / "v" / "OAS1_0001_MR1.nii.gz", volume)
    slices, keep, _ = dataset.volume_slices(path, config)
    assert len(slices) == len(keep) < volume.shape[2]
    assert not set(keep) & set(empty)
    assert volume.shape[2] // 2 in keep
    # every kept slice really has the required tissue fraction (at the volume's own resolution)
    scaled = dataset.robust_scale(volume, config)
    fractions = (scaled > config.tissue_intensity).mean(axis=(0, 1))
    assert (fractions[keep] >= config.min_tissue_fraction).all()
    dropped = np.setdiff1d(np.arange(volume.shape[2]), keep)
    assert (fractions[dropped] < config.min_tissue_fraction).all()
    # with no threshold every slice is kept
    everything, keep_all, _ = dataset.volume_slices(path, make_config(overrides=["min_tissue_fraction=0"]))
    assert list(keep_all) == list(range(volume.shape[2]))

    blank = tmp_path / "blank"
    write_png(blank / "OAS1_0001_MR1_a.png", make_slice(blank=True))
    write_png(blank / "OAS1_0002_MR1_a.png", make_slice(seed=1))
    only = load(blank, config, cache)
    assert list(only.subjects) == ["OAS1_0002"]  # the blank image gave no slice, and was not "skipped"
    assert only.skipped == []


def with_fading_base(volume: np.ndarray, dimmest: float = 0.12, top: int = 20) -> np.ndarray:
    """`volume` (RAS) dimmed from its lowest slice (times `dimmest`) up to axial slice `top` (unchanged), as a
    scan whose skull base fades."""
    fade = np.clip(dimmest + (1 - dimmest) * np.arange(volume.shape[2]) / top, dimmest, 1.0)
    return (volume * fade).astype(np.float32)


def bright_profile(volume: np.ndarray, slices: np.ndarray) -> np.ndarray:
    return np.array([np.percentile(volume[..., z][volume[..., z] > 0.1], 90) for z in slices])


def test_axial_gain_levelling_brightens_a_fading_base_and_only_that(tmp_path, config):
    original = make_volume()  # tissue in axial slices 8 to 31
    faded = with_fading_base(original)
    assert dataset.level_axial_gain(faded, make_config("seed")) is faded  # off in the seed preset

    levelled_config = make_config(overrides=["axial_gain_max=10", "axial_gain_sigma=1"])
    scaled = dataset.robust_scale(faded, config)
    levelled = dataset.level_axial_gain(scaled, levelled_config)
    typical = np.median(bright_profile(scaled, range(8, 32)))  # the slices with at least 1% head
    assert np.array_equal(levelled[..., 18:31], scaled[..., 18:31])  # slices as bright as typical: left alone
    base = range(9, 14)
    assert (bright_profile(scaled, base) < 0.8 * typical).all()
    np.testing.assert_allclose(bright_profile(levelled, base), typical, rtol=0.1)

    dim_crown = scaled.copy()
    dim_crown[..., 27:32] *= 0.5  # dim, but in the head's upper half: a crown, not a fading base
    assert np.array_equal(dataset.level_axial_gain(dim_crown, levelled_config)[..., 20:], dim_crown[..., 20:])

    capped = dataset.level_axial_gain(scaled, make_config(overrides=["axial_gain_max=1.5"]))
    assert (capped <= 1.5 * scaled + 1e-6).all() and (capped > scaled).any()

    # volume_slices levels each volume after scaling it: the base brighter, the middle as it was
    path = write_nifti(tmp_path / "v" / "OAS1_0001_MR1.nii.gz", faded)
    plain, kept, _ = dataset.volume_slices(path, make_config("seed"))
    brighter, kept_levelled, _ = dataset.volume_slices(path, levelled_config)
    assert list(kept) == list(kept_levelled)
    assert brighter[1].mean() > 1.3 * plain[1].mean()
    assert np.array_equal(brighter[kept == 24], plain[kept == 24])
    with pytest.raises(ValueError, match="axial_gain_max must be 1"):
        make_config(overrides=["axial_gain_max=0.5"])


def test_no_slice_with_tissue_is_an_error(tmp_path, config, cache):
    write_nifti(tmp_path / "v" / "OAS1_0001_MR1.nii.gz", np.zeros((20, 20, 20), np.float32))
    with pytest.raises(dataset.DataError, match="no slice with enough tissue"):
        load(tmp_path / "v", config, cache)


def test_orientation_anterior_top_and_left_left(tmp_path, config):
    volume = make_volume(seed=1)
    marker = np.zeros_like(volume)
    marker[8:14, 34:40, 17:23] = 1.0  # left (low x) and anterior (high y) in RAS
    volume = np.maximum(volume, marker)
    ras = write_nifti(tmp_path / "ras.nii.gz", volume)
    las = write_nifti(tmp_path / "las.nii.gz", volume[::-1], np.diag([-1.0, 1.0, 1.0, 1.0]))
    from_ras, keep_ras, _ = dataset.volume_slices(ras, config)
    from_las, keep_las, _ = dataset.volume_slices(las, config)
    assert np.array_equal(keep_ras, keep_las)
    assert np.abs(from_ras - from_las).max() < 1e-5  # the same anatomy, whatever the stored orientation
    middle = from_ras[list(keep_ras).index(20)]
    quadrants = {"top-left": middle[:64, :64], "top-right": middle[:64, 64:],
                 "bottom-left": middle[64:, :64], "bottom-right": middle[64:, 64:]}
    brightest = max(quadrants, key=lambda name: (quadrants[name] > 0.95).sum())
    assert brightest == "top-left"


def test_non_square_slices_padded_and_nan_cleaned(tmp_path, config):
    volume = make_volume((30, 60, 20))
    volume[0, 0, 0] = np.nan
    slices, keep, _ = dataset.volume_slices(write_nifti(tmp_path / "v.nii.gz", volume), config)
    assert slices.shape[1:] == (128, 128) and np.isfinite(slices).all()
    middle = slices[len(slices) // 2]
    assert middle[:, :10].max() < 0.01 and middle[:, -10:].max() < 0.01  # zero padding left and right


def test_4d_volume_with_a_single_frame_is_read_as_3d(tmp_path, config):
    path = write_nifti(tmp_path / "v.nii.gz", make_volume()[..., None])
    assert dataset.read_volume(path).shape == (40, 48, 40)


def test_image_size_from_config(tmp_path, cache):
    config = make_config(overrides=["image_size=64"])
    slices = load(nifti_folder(tmp_path / "v", ["OAS1_0001_MR1"]), config, cache)
    assert slices.images.shape[1:] == (64, 64)


def test_process_pool_gives_the_same_result(tmp_path, config):
    folder = nifti_folder(tmp_path / "v", [f"OAS1_{number:04d}_MR1" for number in range(1, 7)], (24, 28, 24))
    serial = load(folder, config, tmp_path / "c1", workers=1)
    pooled = load(folder, config, tmp_path / "c2", workers=2)
    assert np.array_equal(serial.images, pooled.images)
    assert np.array_equal(serial.sources, pooled.sources)
    assert np.array_equal(serial.splits, pooled.splits)


# ---------------------------------------------------------------------------------------------------------------
# Slice levels: 0 the lowest axial slice of its volume, 1 the highest, NaN unknown
# ---------------------------------------------------------------------------------------------------------------

def with_inferior_marker(volume: np.ndarray) -> np.ndarray:
    """`volume` (40 axial slices) with a bright block low in the brain, at RAS z 10 to 13, so that the inferior
    and the superior end differ."""
    marked = volume.copy()
    marked[16:24, 20:28, 10:14] = 1.0
    return marked


def marker_level(slices: np.ndarray, levels: np.ndarray) -> float:
    """The level of the slice that shows most of the marker."""
    return float(levels[np.argmax((slices > 0.9).sum(axis=(1, 2)))])


def store(storage: str, folder: Path, volume: np.ndarray) -> Path:
    """`volume` (RAS) written as `storage` says; every file holds the same anatomy."""
    if storage == "RAS NIfTI":
        return write_nifti(folder / "ras.nii.gz", volume)
    if storage == "NIfTI with the axial axis flipped":  # the top slice stored first, as the affine says
        affine = np.diag([1.0, 1.0, -1.0, 1.0])
        affine[2, 3] = volume.shape[2] - 1
        return write_nifti(folder / "flipped.nii.gz", volume[:, :, ::-1], affine)
    if storage == "NIfTI stored LPI":
        affine = np.diag([-1.0, -1.0, -1.0, 1.0])
        affine[:3, 3] = np.array(volume.shape) - 1
        return write_nifti(folder / "lpi.nii.gz", volume[::-1, ::-1, ::-1], affine)
    return write_analyze(folder / "analyze.hdr", volume[::-1])  # nibabel reads Analyze as LAS


def test_volume_levels_count_every_axial_slice(tmp_path, config):
    path = write_nifti(tmp_path / "v.nii.gz", make_volume())  # 40 axial slices, the middle 24 carry tissue
    _, keep, levels = dataset.volume_slices(path, config)
    assert list(keep) == list(range(8, 32))
    assert levels.dtype == np.float32
    assert np.array_equal(levels, (np.arange(8, 32) / 39).astype(np.float32))  # over all 40, empty ones included
    _, _, every = dataset.volume_slices(path, make_config(overrides=["min_tissue_fraction=0"]))
    assert every[0] == 0.0 and every[-1] == 1.0 and (np.diff(every) > 0).all()


@pytest.mark.parametrize("storage", ["RAS NIfTI", "NIfTI with the axial axis flipped", "NIfTI stored LPI",
                                     "Analyze"])
def test_levels_run_inferior_to_superior_whatever_the_stored_orientation(storage, tmp_path, config):
    volume = with_inferior_marker(make_volume(seed=3))
    reference, reference_keep, reference_levels = dataset.volume_slices(store("RAS NIfTI", tmp_path, volume),
                                                                         config)
    slices, keep, levels = dataset.volume_slices(store(storage, tmp_path, volume), config)
    assert 10 / 39 - 1e-6 <= marker_level(slices, levels) <= 13 / 39 + 1e-6  # the marker is low: low level
    assert np.array_equal(keep, reference_keep) and np.array_equal(levels, reference_levels)
    assert np.abs(slices - reference).max() < 0.01  # int16 quantisation (Analyze) only


@pytest.mark.parametrize("name, level", [
    ("case_001_slice_0.nii.png", 0.0), ("case_001_slice_31.nii.png", 1.0), ("case_412_slice_12.nii.png", 12 / 31),
    ("case_001_slice_32.nii.png", None),  # not one of a case's 32 slices
    ("case_001_slice_5.png", None), ("slice_5.png", None), ("OAS1_0003_MR1_a.jpg", None), ("brain.tif", None),
])
def test_image_level(name, level):
    found = dataset.image_level(Path("folder") / name)
    if level is None:
        assert np.isnan(found)
    else:
        assert found == pytest.approx(level, abs=1e-12)


def test_course_layout_levels(tmp_path, config, cache):
    data = make_course_layout(tmp_path, {"train": [1], "validate": [2], "test": [3]}, slices_per_case=32)
    slices = load(data, config, cache)
    assert len(slices) == 3 * 32
    numbers = np.array([int(re.search(r"_slice_(\d+)", source).group(1)) for source in slices.sources])
    assert np.array_equal(slices.levels, (numbers / 31).astype(np.float32))
    for case in set(slices.subjects):
        mine = slices.levels[slices.subjects == case]
        assert mine.min() == 0.0 and mine.max() == 1.0


def test_level_range():
    assert dataset.level_range(np.array([0.5, 0.1, 0.9], np.float32)) == "0.10-0.90"
    assert dataset.level_range(np.array([np.nan, np.nan], np.float32)) == "unknown"
    assert dataset.level_range(np.array([0.2, np.nan], np.float32)) == "0.20-0.20 (1 unknown)"
    assert dataset.level_range(np.array([], np.float32)) == "-"


# ---------------------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------------------

def counting_preprocess(monkeypatch) -> list:
    calls = []
    original = dataset._preprocess_one

    def counted(item):
        calls.append(item[0].path)
        return original(item)

    monkeypatch.setattr(dataset, "_preprocess_one", counted)
    return calls


def test_cache_is_reused(tmp_path, config, cache, monkeypatch):
    folder = nifti_folder(tmp_path / "v", ["OAS1_0001_MR1", "OAS1_0002_MR1", "OAS1_0003_MR1"])
    first = load(folder, config, cache)
    cached = list((cache / "slices").glob("*.npz"))
    assert len(cached) == 1 and cached[0].name.startswith("v-")
    mtime = cached[0].stat().st_mtime_ns

    def fail(item):
        raise AssertionError(f"preprocessed {item[0].path} again instead of reading the cache")

    monkeypatch.setattr(dataset, "_preprocess_one", fail)
    second = load(folder, config, cache)
    assert cached[0].stat().st_mtime_ns == mtime
    assert np.array_equal(first.images, second.images)  # bit for bit: the first result was read back quantised
    for column in ("subjects", "sources", "indices", "levels", "splits"):
        assert np.array_equal(getattr(first, column), getattr(second, column))
    assert second.images.dtype == np.float32


def test_cache_rebuilt_when_a_preprocessing_parameter_changes(tmp_path, config, cache, monkeypatch):
    folder = nifti_folder(tmp_path / "v", ["OAS1_0001_MR1", "OAS1_0002_MR1"])
    first = load(folder, config, cache)
    calls = counting_preprocess(monkeypatch)

    # the split seed is not a preprocessing parameter: same cache entry
    load(folder, make_config(overrides=["split_seed=3"]), cache)
    assert calls == []

    for override in ("tissue_intensity=0.3", "min_tissue_fraction=0.3", "intensity_high_percentile=99",
                     "axial_gain_max=2", "image_size=64"):
        changed = load(folder, make_config(overrides=[override]), cache)
        assert len(calls) == 2, override
        calls.clear()
    assert len(list((cache / "slices").glob("*.npz"))) == 6
    stricter = load(folder, make_config(overrides=["min_tissue_fraction=0.3"]), cache)  # now cached as well
    assert calls == []
    assert 0 < len(stricter) < len(first)
    assert changed.images.shape[1:] == (64, 64)


def test_cache_rebuilt_when_a_source_file_changes(tmp_path, config, cache, monkeypatch):
    folder = nifti_folder(tmp_path / "v", ["OAS1_0001_MR1", "OAS1_0002_MR1"])
    load(folder, config, cache)
    calls = counting_preprocess(monkeypatch)
    path = folder / "OAS1_0002_MR1.nii.gz"
    write_nifti(path, make_volume(seed=99))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    load(folder, config, cache)
    assert len(calls) == 2
    calls.clear()
    write_nifti(folder / "OAS1_0003_MR1.nii.gz", make_volume(seed=3))  # a new file
    assert len(set(load(folder, config, cache).subjects)) == 3
    assert len(calls) == 3


def test_corrupt_cache_entry_is_rebuilt(tmp_path, config, cache, monkeypatch):
    folder = nifti_folder(tmp_path / "v", ["OAS1_0001_MR1"])
    first = load(folder, config, cache)
    (entry,) = (cache / "slices").glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:100])  # a truncated file, as a kill mid-write could leave without atomics
    calls = counting_preprocess(monkeypatch)
    again = load(folder, config, cache)
    assert len(calls) == 1
    assert np.array_equal(first.images, again.images)
    calls.clear()
    load(folder, config, cache)
    assert calls == []  # and the rebuilt entry is good
    assert not list((cache / "slices").glob(".*.tmp"))  # no temporary file left behind


def test_levels_survive_the_cache_and_select(tmp_path, config, cache, monkeypatch):
    folder = nifti_folder(tmp_path / "mixed", ["OAS1_0001_MR1", "OAS1_0002_MR1", "OAS1_0003_MR1"])
    write_png(folder / "OAS1_0004_MR1_a.png", make_slice(seed=4))  # a lone image: its level is unknown
    first = load(folder, config, cache)
    expected = np.where(first.subjects == "OAS1_0004", np.nan, first.indices / 39).astype(np.float32)
    assert np.array_equal(first.levels, expected, equal_nan=True)

    def fail(item):
        raise AssertionError(f"preprocessed {item[0].path} again instead of reading the cache")

    monkeypatch.setattr(dataset, "_preprocess_one", fail)
    second = load(folder, config, cache)
    assert second.levels.dtype == np.float32
    assert np.array_equal(second.levels, first.levels, equal_nan=True)
    for split in (*dataset.SPLITS, "all"):
        chosen = second.select(split)
        wanted = second.levels if split == "all" else second.levels[second.splits == split]
        assert np.array_equal(chosen.levels, wanted, equal_nan=True)
        assert len(chosen.levels) == len(chosen)


def test_fingerprint_does_not_depend_on_levels(tmp_path, config, cache):
    """Runs record the fingerprint: the same slices keep the one they had before slices had levels."""
    slices = load(nifti_folder(tmp_path / "v", ["OAS1_0001_MR1", "OAS1_0002_MR1"]), config, cache)
    digest = hashlib.sha1()
    for array in (slices.subjects, slices.sources, slices.indices):
        digest.update("\n".join(map(str, array)).encode())
    assert slices.fingerprint() == digest.hexdigest()[:16]
    assert dataclasses.replace(slices, levels=np.zeros_like(slices.levels)).fingerprint() == slices.fingerprint()


def test_a_cache_entry_without_levels_is_rebuilt(tmp_path, config, cache, monkeypatch):
    folder = nifti_folder(tmp_path / "v", ["OAS1_0001_MR1"])
    first = load(folder, config, cache)
    (entry,) = (cache / "slices").glob("*.npz")
    with np.load(entry) as stored:
        columns = {name: stored[name] for name in stored.files if name != "levels"}
    np.savez(entry, **columns)  # what an entry held before slices had levels
    calls = counting_preprocess(monkeypatch)
    again = load(folder, config, cache)
    assert len(calls) == 1
    assert np.array_equal(again.levels, first.levels)


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------

def test_missing_path(tmp_path, config):
    with pytest.raises(dataset.DataError, match="no such file or folder"):
        load(tmp_path / "nowhere", config, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # refused before anything was written


def test_empty_folder(tmp_path, config):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no data here")
    with pytest.raises(dataset.DataError, match="no volumes .* found"):
        load(tmp_path / "empty", config, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_path_that_is_a_file(tmp_path, config, cache):
    path = write_nifti(tmp_path / "OAS1_0001_MR1.nii.gz", make_volume())
    with pytest.raises(dataset.DataError, match="is a file"):
        load(path, config, cache)


def _missing_img(folder: Path) -> Path:
    hdr = write_analyze(folder / "OAS1_0090_MR1_mpr_n4_anon_111_t88_masked_gfc.hdr", make_volume())
    hdr.with_suffix(".img").unlink()
    return hdr


def _garbage_nii_gz(folder: Path) -> Path:
    path = folder / "OAS1_0091_MR1.nii.gz"
    path.write_bytes(b"this is not a NIfTI file at all" * 10)
    return path


def _truncated_nii_gz(folder: Path) -> Path:
    path = write_nifti(folder / "OAS1_0092_MR1.nii.gz", make_volume(seed=2))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _gzip_of_garbage(folder: Path) -> Path:
    path = folder / "OAS1_0093_MR1.nii.gz"
    path.write_bytes(gzip.compress(b"\x00" * 100))  # a valid gzip holding no NIfTI header
    return path


def _four_d(folder: Path) -> Path:
    return write_nifti(folder / "OAS1_0094_MR1.nii.gz", np.stack([make_volume()] * 3, axis=-1))


def _rgb(folder: Path) -> Path:
    volume = make_volume()
    rgb = np.zeros(volume.shape, RGB_DTYPE)
    for channel in "RGB":
        rgb[channel] = np.round(volume / volume.max() * 255).astype(np.uint8)
    return write_nifti(folder / "OAS1_0095_MR1.nii.gz", rgb)


def _bad_png(folder: Path) -> Path:
    path = folder / "OAS1_0096_MR1_a.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken" * 20)
    return path


BAD_FILES = {"missing .img beside .hdr": (_missing_img, r"\.img is missing"),
             "not a NIfTI file": (_garbage_nii_gz, "not a readable volume"),
             "truncated .nii.gz": (_truncated_nii_gz, "not a readable volume"),
             "gzip without a header": (_gzip_of_garbage, "not a readable volume"),
             "4D volume": (_four_d, r"4D volume of shape \(40, 48, 40, 3\)"),
             "RGB volume": (_rgb, "RGB volume"),
             "broken PNG": (_bad_png, "not a readable image")}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_one_bad_file_is_skipped_with_a_warning_or_fatal_when_strict(kind, tmp_path, config, cache):
    make_bad, message = BAD_FILES[kind]
    folder = tmp_path / "mixed"
    if kind == "broken PNG":
        for number in (1, 2):
            write_png(folder / f"OAS1_000{number}_MR1_a.png", make_slice(seed=number))
    else:
        nifti_folder(folder, ["OAS1_0001_MR1", "OAS1_0002_MR1"])
    bad = make_bad(folder)

    with pytest.raises(dataset.DataError, match=message) as raised:
        load(folder, config, cache, strict=True)
    assert str(bad) in str(raised.value)
    assert not (cache / "slices").exists() or not list((cache / "slices").glob("*.npz"))

    with pytest.warns(UserWarning, match=f"skipped {bad}"):
        slices = load(folder, config, cache)
    assert slices.skipped == [str(bad)]
    assert set(slices.subjects) == {"OAS1_0001", "OAS1_0002"}
    assert_clean_slices(slices)

    with warnings.catch_warnings():  # read back from the cache: the skipped file is still reported
        warnings.simplefilter("ignore")
        again = load(folder, config, cache)
    assert again.skipped == [str(bad)]


def test_read_volume_errors_are_data_errors(tmp_path):
    for make_bad, message in BAD_FILES.values():
        if make_bad is _bad_png:
            continue
        with pytest.raises(dataset.DataError, match=message):
            dataset.read_volume(make_bad(tmp_path))


def test_only_bad_files_is_an_error(tmp_path, config, cache):
    folder = tmp_path / "bad"
    folder.mkdir()
    _garbage_nii_gz(folder)
    _four_d(folder)
    with pytest.warns(UserWarning):
        with pytest.raises(dataset.DataError, match=r"no slice with enough tissue in 2 file\(s\) \(2 unreadable\)"):
            load(folder, config, cache)


# ---------------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------------

def run_dataset_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "dataset.py", *args], cwd=PROJECT_ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def make_bad_source(kind: str, tmp_path: Path) -> tuple[Path, str]:
    if kind == "missing":
        return tmp_path / "nowhere", "no such file or folder"
    if kind == "file":
        return write_nifti(tmp_path / "OAS1_0001_MR1.nii.gz", make_volume((20, 20, 20))), "is a file"
    if kind == "empty":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty", "no volumes"
    folder = tmp_path / "strict"
    nifti_folder(folder, ["OAS1_0001_MR1"], shape=(20, 20, 20))
    return _truncated_nii_gz(folder), "not a readable volume"


@pytest.mark.parametrize("kind", ["missing", "file", "empty", "strict"])
def test_cli_bad_data_exits_2_with_one_line(kind, tmp_path):
    bad, message = make_bad_source(kind, tmp_path)
    args = ["--data", str(bad if kind != "strict" else bad.parent), "--cache", str(tmp_path / "cache"),
            "--no-progress"] + (["--strict"] if kind == "strict" else [])
    result = run_dataset_cli(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("error: ") and message in lines[0]
    assert str(bad) in lines[0]
    assert result.stdout == ""
    assert not (tmp_path / "cache").exists()  # nothing written for a source that cannot be used


def test_cli_bad_flags_exit_2(tmp_path):
    folder = nifti_folder(tmp_path / "v", ["OAS1_0001_MR1"], shape=(20, 20, 20))
    result = run_dataset_cli("--data", str(folder), "--cache", str(tmp_path / "cache"), "--set", "nonsense=1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "nonsense" in result.stderr


def test_cli_summary_and_preview(tmp_path):
    folder = nifti_folder(tmp_path / "v", [f"OAS1_{number:04d}_MR1" for number in range(1, 5)], (24, 28, 24))
    preview = tmp_path / "preview.png"
    result = run_dataset_cli("--data", str(folder), "--cache", str(tmp_path / "cache"), "--split", "train",
                             "--preview", str(preview), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    out = result.stdout
    assert f"source: {folder}" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()
            if line.split() and line.split()[0] in (*dataset.SPLITS, "all")}
    assert set(rows) == {*dataset.SPLITS, "all"}
    assert int(rows["all"][0]) == 4
    assert sum(int(rows[split][1]) for split in dataset.SPLITS) == int(rows["all"][1])
    for split, row in rows.items():  # the level range, inside 0-1: the empty slices at both ends are dropped
        found = re.fullmatch(r"(\d\.\d\d)-(\d\.\d\d)", " ".join(row[2:]))
        assert found and 0 < float(found.group(1)) < 0.5 < float(found.group(2)) < 1, (split, row)
    assert "slice shape (128, 128), float32" in out and "time " in out
    assert preview.exists() and preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_summary_says_unknown_levels_for_lone_images(tmp_path):
    folder = tmp_path / "pngs"
    for number in range(1, 4):
        write_png(folder / f"OAS1_{number:04d}_MR1_a.png", make_slice(seed=number))
    result = run_dataset_cli("--data", str(folder), "--cache", str(tmp_path / "cache"), "--no-progress")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[:1] in (["train"], ["all"])]
    assert [row[3:] for row in rows] == [["unknown"], ["unknown"]]


# ---------------------------------------------------------------------------------------------------------------
# The real OASIS-1 subset in ../shared/data (skipped when absent)
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def mni_slices(shared_data, tmp_path_factory) -> dataset.SliceSet:
    folder = shared_data / "oasis1-mni-volumes"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    return dataset.load_slices(str(folder), make_config(), tmp_path_factory.mktemp("mni-cache"), progress=False)


def test_shared_mni_volumes(mni_slices):
    assert_clean_slices(mni_slices)
    subjects = set(mni_slices.subjects)
    assert subjects == {f"OAS1_{number}" for number in
                        "0061 0096 0139 0143 0144 0190 0198 0260 0296 0300 0384".split()}
    assert mni_slices.skipped == []
    for subject in subjects:
        count = int((mni_slices.subjects == subject).sum())
        assert 150 <= count <= 185, (subject, count)
    assert_no_subject_in_two_splits(mni_slices)
    assert set(mni_slices.splits) == {*dataset.SPLITS, dataset.EXCLUDED}
    assert set(mni_slices.subjects[mni_slices.splits == dataset.EXCLUDED]) == {"OAS1_0198"}
    # every slice of a subject comes from its one volume, with distinct slice indices
    for subject in subjects:
        indices = mni_slices.indices[mni_slices.subjects == subject]
        assert len(set(indices)) == len(indices)
        assert len(set(mni_slices.sources[mni_slices.subjects == subject])) == 1


def test_shared_mni_levels_run_from_the_bottom_to_the_top_of_the_head(mni_slices):
    """Looked at, level 0.15 cuts the orbits and the cerebellum and 0.9 the crown. Checked here: the least tissue
    of a subject is near the crown (level > 0.8), where the head ends in a small cap, never at the bottom, where
    the slices still cut the neck and the cerebellum."""
    for subject in set(mni_slices.subjects):
        mine = mni_slices.subjects == subject
        levels = mni_slices.levels[mine]
        assert np.array_equal(levels, (mni_slices.indices[mine] / 191).astype(np.float32))  # 192 axial slices
        area = (mni_slices.images[mine] > 0.1).mean(axis=(1, 2))
        assert levels[np.argmin(area)] > 0.8, subject


def test_the_excluded_shared_volume_is_the_one_not_in_atlas_position(shared_data, config):
    """Why OAS1_0198 is left out: its head is tilted far back, so the share of tissue along the front-to-back axis
    of its volume follows a curve unlike every other subject's, which agree closely with one another."""
    profiles = {}
    for path in sorted((shared_data / "oasis1-mni-volumes").glob("*.nii.gz")):
        tissue = dataset.robust_scale(dataset.read_volume(path), config) > config.tissue_intensity
        profiles[dataset.subject_id(path)] = tissue.mean(axis=(0, 2))  # RAS: axis 1 runs back to front
    names, stacked = list(profiles), np.stack(list(profiles.values()))
    agreement = {name: np.corrcoef(stacked[index], np.median(np.delete(stacked, index, 0), 0))[0, 1]
                 for index, name in enumerate(names)}
    assert min(agreement, key=agreement.get) == "OAS1_0198"
    assert agreement.pop("OAS1_0198") < 0.96 < 0.985 < min(agreement.values()), agreement


def test_shared_t88_jpegs(shared_data, tmp_path, config):
    folder = shared_data / "oasis1-t88-axial"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    slices = load(folder, config, tmp_path / "cache")
    assert_clean_slices(slices)
    everything = slices.select("all")
    assert len(everything) == 96
    assert len(set(everything.subjects)) == 96
    assert all(subject.startswith("OAS1_") for subject in everything.subjects)
    assert_no_subject_in_two_splits(slices)
    assert sum(len(slices.select(split)) for split in dataset.SPLITS) == 96


def test_deformed_slices_move_each_pixel_at_most_the_given_distance_and_are_seeded():
    """A lone bright dot lands within `pixels` of where it was (or of its mirror image, for the flipped half of the
    slices; none without `flip`), each slice gets its own field, a uniform image stays uniform away from the border,
    and one seed gives the same copies."""
    images = np.zeros((40, 64, 64), np.float32)
    images[:, 30, 20] = 1.0
    warped = dataset.deformed_slices(images, np.random.default_rng(0), pixels=3.0)
    assert warped.shape == images.shape and warped.dtype == images.dtype
    flipped = 0
    for image in warped:
        rows, cols = np.nonzero(image > 0)
        assert len(rows), "the dot must survive the warp"
        mirrored = abs(cols.mean() - (63 - 20)) < abs(cols.mean() - 20)
        flipped += mirrored
        assert np.hypot(rows - 30, cols - (63 - 20 if mirrored else 20)).max() <= 3.0 + 1.5
    assert 8 < flipped < 32
    assert len({image.tobytes() for image in warped}) == len(warped)
    uniform = dataset.deformed_slices(np.full((2, 64, 64), 0.5, np.float32), np.random.default_rng(1), 3.0)
    np.testing.assert_allclose(uniform[:, 4:-4, 4:-4], 0.5, atol=1e-6)
    np.testing.assert_array_equal(dataset.deformed_slices(images, np.random.default_rng(0), 3.0), warped)
    unflipped = dataset.deformed_slices(images, np.random.default_rng(0), 3.0, flip=False)
    assert all(abs(np.nonzero(image > 0)[1].mean() - 20) <= 3.0 + 1.5 for image in unflipped)
