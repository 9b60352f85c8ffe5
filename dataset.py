"""OASIS brain MRI -> clean 128x128 axial slices in [0, 1], split by subject.

Sources (`--data`):
- `oasis`: the official OASIS-1 discs. Each `oasis_cross-sectional_discN.tar.gz` is streamed to a `.part` file
  (resumed with an HTTP Range request after a cut), checked against its size (and md5 where known) and renamed
  into place; only the atlas-registered, skull-stripped volume of each session
  (`PROCESSED/MPRAGE/T88_111/*_t88_masked_gfc.{hdr,img}`) is extracted.
- `oasis2`: the OASIS-2 RAW archives; one MPRAGE (`mpr-1`) per visit, RAW (no registration, skull kept).
- a folder of volumes (`.nii`, `.nii.gz`, Analyze `.hdr/.img`), read with nibabel;
- a folder of 2D images (`.png`, `.jpg`, `.jpeg`, `.tif`, `.tiff`), including the course layout
  `keras_png_slices_data/keras_png_slices_{train,validate,test}` whose folders are its split.

Preprocessing (parameters in hyperparameters.py): volumes are reoriented to RAS and cut into axial slices shown
with anterior at the top; each volume (or 2D image) is scaled to [0, 1] by robust percentiles (and a volume's
inferior-superior gain drift levelled, where axial_gain_max is above 1); slices with too little tissue are dropped;
each slice is padded to a square and resized to 128x128 with antialiasing.
Each slice carries its level, its height in its volume: 0 for the lowest axial slice, 1 for the highest (NaN for
a lone 2D image, whose height is unknown).
Subjects are assigned to train/validate/test with a seeded shuffle, so no subject is ever in two splits.
Preprocessed slices are cached under `--cache` keyed by the source fingerprint and preprocessing parameters.
"""

from __future__ import annotations

import argparse
import errno
import functools
import hashlib
import json
import os
import re
import socket
import ssl
import sys
import tarfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

import numpy as np

from cli import (OFFICIAL_OASIS_URL, UserError, add_config_args, add_data_args, configure_tensorflow, parse_discs,
                 run_main)
from hyperparameters import Config, make_config
from rundir import atomic_write, atomic_write_text

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".hdr")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
SPLITS = ("train", "validate", "test")
EXCLUDED = "excluded"  # the split of config.exclude_subjects' slices: in no split, not even "all"
COURSE_SPLIT = re.compile(r"keras_png_slices_(train|validate|test)$")
# the course PNGs are 32 axial slices per case, `case_NNN_slice_S.nii.png` with S = 0 the lowest
COURSE_SLICE = re.compile(r"case_\d+_slice_(\d+)\.nii\.png$")
COURSE_DEPTH = 32
# part of the cache key: an entry of another format (other columns, other preprocessing) is rebuilt, never read
CACHE_FORMAT = 3

OASIS1_ARCHIVE = "oasis_cross-sectional_disc{}.tar.gz"
OASIS1_MEMBER = re.compile(r"(OAS1_\d{4}_MR\d)/PROCESSED/MPRAGE/T88_111/\1_mpr_n\d+_anon_111_t88_masked_gfc\.(hdr|img)$")
OASIS2_ARCHIVES = ("OAS2_RAW_PART1.tar.gz", "OAS2_RAW_PART2.tar.gz")
OASIS2_MEMBER = re.compile(r"(OAS2_\d{4}_MR\d+)/RAW/mpr-1\.nifti\.(hdr|img)$")
# md5 of the official archives, where published; other servers may publish `<archive>.md5` beside each archive
KNOWN_MD5 = {OASIS1_ARCHIVE.format(1): "c83e216ef8654a7cc9e2a30a4cdbe0cc"}
OFFLINE_ADVICE = ("download and extract the OASIS archives yourself and pass --data FOLDER, or run python "
                  "predict.py, which works offline with the shipped model")


class DataError(UserError):
    """A data source, file or download that cannot be used; the message names it and says what to do."""


# ---------------------------------------------------------------------------------------------------------------
# Downloads
# ---------------------------------------------------------------------------------------------------------------

class _Transient(Exception):
    """A failed request that may pass if tried again (a timeout, a 5xx answer, a cut transfer)."""


def download(url: str, dest: Path, expected_md5: str | None = None, timeout: float = 30.0, retries: int = 4,
             backoff: float = 2.0, progress: bool = True) -> Path:
    """Streams `url` to `dest` through `dest.part`, resuming after cuts with HTTP Range requests.

    Only what may pass is retried, with exponential back-off: timeouts, 5xx answers and cut transfers. A host that
    cannot be reached (name not resolved, connection refused) or a 4xx answer fails at once, since waiting does not
    change it. The file is renamed into place only once its size matches Content-Length and its md5 matches
    `expected_md5` (when given); a bad file is deleted, never trusted. Raises DataError naming the URL or host.
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    part = dest.with_name(dest.name + ".part")
    total = None
    attempt = 0
    while True:
        try:
            total = _fetch(url, part, total, timeout, progress)
            break
        except _Transient as error:
            attempt += 1
            if attempt > retries:
                raise _given_up(url, part, error, retries) from None
            time.sleep(backoff * 2 ** (attempt - 1))
    _verify(url, part, total, expected_md5)
    os.replace(part, dest)
    return dest


def _fetch(url: str, part: Path, total: int | None, timeout: float, progress: bool) -> int | None:
    """One request for what `part` still lacks of `url`, appended to it; returns the whole file's size (None when
    the server does not say). Raises _Transient for a failure worth retrying, DataError for one that is not."""
    import requests

    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with requests.get(url, stream=True, timeout=timeout, headers=headers) as response:
            if response.status_code == 416 and have and have in (total, _announced_size(response)):
                return have  # a run killed after the last byte: nothing left to send; the checks still apply
            _check_status(url, response, part)
            if response.status_code == 200 and have:
                have = 0  # the server ignored the range: start over
            length = response.headers.get("Content-Length")
            if length is not None:
                total = have + int(length)
            _stream(response, part, have, total, progress)
    except requests.RequestException as error:
        raise _classify(url, error, timeout) from None
    except OSError as error:
        raise DataError(f"cannot write {part}: {error.strerror}; choose a writable --cache") from None
    size = part.stat().st_size
    if total is not None and size < total:
        raise _Transient(f"connection closed at {size} of {total} bytes")
    return total


def _announced_size(response) -> int | None:
    """The file size a 416 answer announces (`Content-Range: bytes */SIZE`), if any."""
    whole = re.fullmatch(r"bytes \*/(\d+)", response.headers.get("Content-Range", "").strip())
    return int(whole.group(1)) if whole else None


def _check_status(url: str, response, part: Path) -> None:
    """5xx may pass (_Transient); 4xx will not (DataError, and what `part` holds is not trusted)."""
    code = response.status_code
    if code >= 500:
        raise _Transient(f"HTTP {code}")
    if code >= 400:
        part.unlink(missing_ok=True)
        hint = "; check --oasis-url and --discs" if code in (403, 404, 410) else ""
        raise DataError(f"{url}: HTTP {code}{hint}")


def _stream(response, part: Path, have: int, total: int | None, progress: bool) -> None:
    """Writes the body into `part` (appended after `have` bytes); the folder is made only now, so a server that
    cannot be reached leaves nothing on disk."""
    from tqdm import tqdm

    part.parent.mkdir(parents=True, exist_ok=True)
    with open(part, "ab" if have else "wb") as out, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, desc=part.stem,
            disable=not progress, file=sys.stderr) as bar:
        for chunk in response.iter_content(chunk_size=1 << 20):
            out.write(chunk)
            bar.update(len(chunk))


def _classify(url: str, error: Exception, timeout: float) -> Exception:
    """A failed request as DataError when trying again cannot help, else as _Transient, in a few words (requests'
    own message runs to hundreds of characters of urllib3 internals)."""
    import requests
    import urllib3

    causes = _causes(error)
    unreachable = next(filter(None, map(_unreachable_reason, causes)), None)
    if unreachable:
        return DataError(f"cannot reach {urlsplit(url).netloc} ({unreachable}); {OFFLINE_ADVICE}")
    if any(isinstance(cause, (TimeoutError, urllib3.exceptions.TimeoutError, requests.Timeout)) for cause in causes):
        return _Transient(f"no answer within {timeout:g} s")
    if isinstance(error, (requests.ConnectionError, requests.exceptions.ChunkedEncodingError)):
        return _Transient("connection cut")
    return DataError(f"{url}: {error}; check --oasis-url")  # a malformed URL, too many redirects...


def _causes(error: BaseException) -> list[BaseException]:
    """`error` and every exception behind it: requests and urllib3 wrap the socket's error two or three deep."""
    found, pending = [], [error]
    while pending:
        current = pending.pop()
        if not isinstance(current, BaseException) or any(current is seen for seen in found):
            continue
        found.append(current)
        pending += [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
    return found


def _unreachable_reason(cause: BaseException) -> str | None:
    """Why a server cannot be reached at all, in words, for the failures that no retry fixes; else None."""
    if isinstance(cause, socket.gaierror):
        return "name not resolved: no network?"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused: wrong --oasis-url, or the server is down?"
    if isinstance(cause, OSError) and cause.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return "network unreachable: no network?"
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {cause.verify_message}"
    return None


def _given_up(url: str, part: Path, error: _Transient, retries: int) -> DataError:
    """The error after the last retry; a .part that received bytes is kept for the next run, an empty one is not."""
    if part.exists() and part.stat().st_size:
        return DataError(f"{url}: {error} after {retries} retries; the partial file {part} is kept, run again to "
                         f"resume")
    part.unlink(missing_ok=True)
    return DataError(f"{url}: {error} after {retries} retries; run again later")


def _verify(url: str, part: Path, total: int | None, expected_md5: str | None) -> None:
    """Deletes `part` and raises DataError when its size or md5 is not the expected one."""
    size = part.stat().st_size
    if total is not None and size != total:
        part.unlink()
        raise DataError(f"{url}: got {size} bytes where the server announced {total}; the file was deleted, "
                        f"run again")
    if expected_md5:
        digest = file_md5(part)
        if digest != expected_md5.lower():
            part.unlink()
            raise DataError(f"{url}: md5 {digest} does not match the expected {expected_md5}; the file was "
                            f"deleted, run again (or check --oasis-url)")


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def published_md5(base_url: str, name: str, timeout: float = 30.0) -> str | None:
    """The md5 for archive `name`: the known one for the official server, else a `<name>.md5` the server serves."""
    import requests

    if base_url.rstrip("/") == OFFICIAL_OASIS_URL.rstrip("/"):
        return KNOWN_MD5.get(name)
    try:
        response = requests.get(base_url.rstrip("/") + "/" + name + ".md5", timeout=timeout)
    except requests.RequestException:
        return None
    if response.status_code != 200:
        return None
    words = response.text.split()
    return words[0].lower() if words and re.fullmatch(r"[0-9a-fA-F]{32}", words[0]) else None


def extract_members(archive: Path, pattern: re.Pattern, dest: Path) -> list[Path]:
    """Extracts the members of `archive` whose path matches `pattern` into `dest`, flat, named by their session.

    Members are read in one streaming pass; nothing else of the archive touches the disk, and a member can never
    be written outside `dest` (names are flattened, links and special files are ignored).
    """
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        with tarfile.open(archive, "r|gz") as tar:
            for member in tar:
                found = pattern.search(member.name)
                if not member.isfile() or not found:
                    continue
                source = tar.extractfile(member)
                name = Path(member.name).name
                target = dest / (name if name.startswith(found.group(1)) else f"{found.group(1)}_{name}")
                atomic_write(target, lambda out: _copy(source, out))
                written.append(target)
    except (tarfile.TarError, EOFError, OSError) as error:
        if isinstance(error, PermissionError):
            raise DataError(f"cannot write into {dest}: permission denied; choose a writable --cache") from None
        raise DataError(f"{archive}: not a readable .tar.gz ({error}); delete it and run again") from None
    return written


def _copy(source, out) -> None:
    for block in iter(lambda: source.read(1 << 22), b""):
        out.write(block)


def fetch_archives(base_url: str, names: list[str], pattern: re.Pattern, cache: Path, volume_dir: Path,
                   delete_archives: bool, progress: bool = True) -> Path:
    """Downloads and extracts each archive once; a `.extracted` marker records a finished archive."""
    for name in names:
        marker = volume_dir / f".{name}.extracted"
        if marker.exists():
            continue
        archive = cache / "downloads" / name
        url = base_url.rstrip("/") + "/" + name
        download(url, archive, published_md5(base_url, name), progress=progress)
        members = extract_members(archive, pattern, volume_dir)
        if not members:
            raise DataError(f"{archive}: no member matches {pattern.pattern}; is this an OASIS archive?")
        atomic_write_text(marker, "\n".join(path.name for path in members) + "\n")
        if delete_archives:
            archive.unlink()
    return volume_dir


# ---------------------------------------------------------------------------------------------------------------
# Reading and preprocessing
# ---------------------------------------------------------------------------------------------------------------

def subject_id(path: Path) -> str:
    """OAS1_0061 from '.../OAS1_0061_MR1_...', 'sub-0061_...' (the same subject); case_012; OAS2_0001; else stem."""
    name = path.name
    for regex, template in ((r"(OAS[12]_\d{4})", "{}"), (r"sub-(\d{4})", "OAS1_{}"), (r"(case_\d+)", "{}")):
        found = re.search(regex, name)
        if found:
            return template.format(found.group(1))
    return name.split(".")[0]


def robust_scale(values: np.ndarray, config: Config) -> np.ndarray:
    low, high = np.percentile(values, [config.intensity_low_percentile, config.intensity_high_percentile])
    if high <= low:
        return np.zeros(values.shape, np.float32)
    return np.clip((values.astype(np.float32) - low) / (high - low), 0.0, 1.0)


def level_axial_gain(volume: np.ndarray, config: Config) -> np.ndarray:
    """A [0, 1] RAS volume (x, y, z) with its skull base's fade levelled: each axial slice's bright head tissue
    (the 90th percentile of its voxels above `tissue_intensity`) is measured, the profile smoothed along z by a
    Gaussian of `axial_gain_sigma` slices (slices with under 1% head take their neighbours' value), and a slice of
    the head's lower half (below the middle of the slices with 1% head or more) that is below the profile's median
    is scaled up to it, by at most `axial_gain_max`; brighter slices and the upper half are left alone. E.g. a scan
    whose skull base reads 0.5 where its median slice reads 0.8 gets a gain of 1.6 there, so the base's tissue
    clears the tissue threshold as a brighter scan's does. Only the lower half, because the fade is the head coil's
    sensitivity falling off toward the neck; a crown reads dim for another reason (thin scalp in few voxels), and
    lifting it turns scalp rings into tissue-bearing slices. Returns float32."""
    from scipy import ndimage

    if config.axial_gain_max <= 1.0:
        return volume
    head = volume > config.tissue_intensity
    enough = head.mean(axis=(0, 1)) >= 0.01
    if not enough.any():
        return volume
    measured = np.flatnonzero(enough)
    bright = np.array([np.percentile(volume[..., z][head[..., z]], 90) for z in measured])
    profile = np.interp(np.arange(volume.shape[2]), measured, bright)
    profile = ndimage.gaussian_filter1d(profile, config.axial_gain_sigma, mode="nearest")
    gain = np.clip(np.median(bright) / profile, 1.0, config.axial_gain_max).astype(np.float32)
    gain[(measured[0] + measured[-1]) // 2:] = 1.0
    return np.minimum(volume * gain, 1.0)


def square_and_resize(slices: np.ndarray, size: int) -> np.ndarray:
    """(n, h, w) -> (n, size, size): zero-pad to a centred square, then an antialiased resize."""
    from skimage.transform import resize

    n, height, width = slices.shape
    if n == 0:  # a file with no tissue-bearing slice (skimage cannot resize an empty batch)
        return np.zeros((0, size, size), np.float32)
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    square = np.zeros((n, side, side), np.float32)
    square[:, top:top + height, left:left + width] = slices
    if side == size:
        return square
    resized = resize(square, (n, size, size), order=1, anti_aliasing=True, preserve_range=True)
    return np.clip(resized, 0.0, 1.0).astype(np.float32)


def tissue_mask(slices: np.ndarray, config: Config) -> np.ndarray:
    return (slices > config.tissue_intensity).mean(axis=(1, 2)) >= config.min_tissue_fraction


def read_volume(path: Path) -> np.ndarray:
    """A 3D volume as float32, reoriented to RAS; DataError for anything that is not a readable 3D scalar volume."""
    import nibabel as nib

    if path.suffix == ".hdr" and not path.with_suffix(".img").exists():
        raise DataError(f"{path}: the matching {path.with_suffix('.img').name} is missing beside it")
    try:
        image = nib.as_closest_canonical(nib.load(str(path)))
        if image.get_data_dtype().names:
            raise DataError(f"{path}: an RGB volume; OASISVQ reads grayscale (scalar) volumes")
        data = np.asanyarray(image.dataobj)
    except DataError:
        raise
    except Exception as error:  # nibabel raises many types for corrupt files
        raise DataError(f"{path}: not a readable volume ({type(error).__name__}: {error}); remove or replace "
                        f"it") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: a {data.ndim}D volume of shape {data.shape}; OASISVQ reads 3D volumes")
    if not np.isfinite(data).all():
        data = np.nan_to_num(data)
    return data.astype(np.float32)


def volume_slices(path: Path, config: Config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tissue-bearing axial slices of one volume, (n, S, S) float32 in [0, 1], their indices in the volume and
    their levels (see axial_levels)."""
    volume = level_axial_gain(robust_scale(read_volume(path), config), config)
    # RAS: axis 2 runs inferior->superior; rot90 puts anterior at the top and the subject's left on the left
    slices = np.rot90(volume.transpose(2, 0, 1), k=1, axes=(1, 2))
    keep = np.flatnonzero(tissue_mask(slices, config))
    return (square_and_resize(np.ascontiguousarray(slices[keep]), config.image_size), keep,
            axial_levels(keep, len(slices)))


def axial_levels(indices: np.ndarray, depth: int) -> np.ndarray:
    """The level of axial slices `indices` (RAS, so 0 is the lowest) of a volume `depth` slices deep, float32:
    0.0 for its lowest slice, 1.0 for its highest, counted over every slice, empty ones included, so that a level
    means the same height in volumes with more or less tissue. NaN for a one-slice volume, which has no height."""
    if depth < 2:
        return np.full(len(indices), np.nan, np.float32)
    return (np.asarray(indices, np.float64) / (depth - 1)).astype(np.float32)


def read_image(path: Path) -> np.ndarray:
    """A 2D image as float32 (8 or 16 bit, grayscale or RGB converted to luminance); DataError if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("RGB", "RGBA", "P", "LA"):
                image = image.convert("L")
            data = np.asarray(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{path}: not a readable image ({error}); remove or replace it") from None
    if data.ndim != 2:
        raise DataError(f"{path}: image of shape {data.shape}; expected a 2D grayscale image")
    return data.astype(np.float32)


def image_slices(path: Path, config: Config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 2D image as zero or one slice, like volume_slices: (slices, indices, levels)."""
    data = robust_scale(read_image(path), config)[None]
    keep = np.flatnonzero(tissue_mask(data, config))
    return square_and_resize(data[keep], config.image_size), keep, np.full(len(keep), image_level(path), np.float32)


def image_level(path: Path) -> float:
    """S / 31 for the course's `case_NNN_slice_S.nii.png` (slice S of 32, S = 0 the lowest); NaN (unknown) for
    any other 2D image: a lone slice does not say where in the head it was cut."""
    found = COURSE_SLICE.search(path.name)
    if found and int(found.group(1)) < COURSE_DEPTH:
        return int(found.group(1)) / (COURSE_DEPTH - 1)
    return float("nan")


# ---------------------------------------------------------------------------------------------------------------
# Sources -> a list of files, each with a subject and (for the course layout) a split
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class SourceFile:
    path: Path
    kind: str  # "volume" or "image"
    subject: str
    split: str | None = None  # fixed by the source (course layout), else assigned by subject


def list_source_files(root: Path) -> list[SourceFile]:
    if not root.exists():
        raise DataError(f"--data {root}: no such file or folder; give a folder of volumes or images, 'oasis' "
                        f"or 'oasis2'")
    if not root.is_dir():
        raise DataError(f"--data {root}: is a file; give the folder that holds it")
    files = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        if any("keras_png_slices_seg" in part for part in path.parts):
            continue
        name = path.name.lower()
        if name.endswith(VOLUME_SUFFIXES):
            files.append(SourceFile(path, "volume", subject_id(path)))
        elif name.endswith(IMAGE_SUFFIXES):
            split = next((COURSE_SPLIT.search(part).group(1) for part in path.parts if COURSE_SPLIT.search(part)),
                         None)
            files.append(SourceFile(path, "image", subject_id(path), split))
    if not files:
        raise DataError(f"--data {root}: no volumes (.nii, .nii.gz, .hdr/.img) or images (.png, .jpg, .tif) "
                        f"found in it")
    return files


def resolve_source(data: str, cache: Path, oasis_url: str, discs: str, delete_archives: bool,
                   progress: bool = True) -> tuple[Path, str | None]:
    """The local folder that holds the source `data`, downloading it first for 'oasis' and 'oasis2'.

    Returns the folder and a note for the summary (OASIS-2 is RAW data).
    """
    if data == "oasis":
        names = [OASIS1_ARCHIVE.format(disc) for disc in parse_discs(discs)]
        return fetch_archives(oasis_url, names, OASIS1_MEMBER, cache, cache / "oasis1" / "volumes",
                              delete_archives, progress), None
    if data == "oasis2":
        folder = fetch_archives(oasis_url, list(OASIS2_ARCHIVES), OASIS2_MEMBER, cache, cache / "oasis2" / "volumes",
                                delete_archives, progress)
        return folder, "OASIS-2 ships RAW scans: not atlas-registered and not skull-stripped"
    return Path(data).expanduser(), None


# ---------------------------------------------------------------------------------------------------------------
# The slice set, its cache and its splits
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class SliceSet:
    """Preprocessed slices with, per slice, its subject, source file, index in that file, level, and split."""
    images: np.ndarray  # (n, size, size) float32 in [0, 1]
    subjects: np.ndarray
    sources: np.ndarray
    indices: np.ndarray
    levels: np.ndarray  # (n,) float32: 0 the lowest axial slice of its volume, 1 the highest, NaN unknown
    splits: np.ndarray
    source: str
    skipped: list[str]
    note: str | None = None

    def __len__(self) -> int:
        return len(self.images)

    def select(self, split: str) -> "SliceSet":
        keep = self.splits != EXCLUDED if split == "all" else self.splits == split
        return SliceSet(self.images[keep], self.subjects[keep], self.sources[keep], self.indices[keep],
                        self.levels[keep], self.splits[keep], self.source, self.skipped, self.note)

    def fingerprint(self) -> str:
        """Which slices of the source these are (runs record it), excluded subjects' included; levels follow from
        them, so they are left out."""
        digest = hashlib.sha1()
        for array in (self.subjects, self.sources, self.indices):
            digest.update("\n".join(map(str, array)).encode())
        return digest.hexdigest()[:16]


class RealSlices(NamedTuple):
    """The real slices generated ones are measured against: `split`, every slice of the held-out split (the sweep's
    rows); `slices`, `levels` and `subjects`, up to `num` of them, drawn (the "real" of every realism figure);
    `train`, the training split; `reference`, `reference_subjects` and `reference_levels`, up to `num` training
    slices, drawn, what the classifier tests tell generated and held-out slices from."""
    split: SliceSet
    slices: np.ndarray
    levels: np.ndarray
    subjects: np.ndarray
    train: SliceSet
    reference: np.ndarray
    reference_subjects: np.ndarray
    reference_levels: np.ndarray


def draw_real_slices(everything: SliceSet, split: str, num: int, rng: np.random.Generator) -> RealSlices:
    """Up to `num` slices of `split` and as many training slices, without replacement, seeded by `rng`: the draws
    of predict.py and bench/, so that the same seed compares against the same slices everywhere."""
    held_out, train = everything.select(split), everything.select("train")
    picks = np.sort(rng.choice(len(held_out), min(num, len(held_out)), replace=False))
    reference = np.sort(rng.choice(len(train), min(num, len(train)), replace=False))
    return RealSlices(held_out, held_out.images[picks], held_out.levels[picks], held_out.subjects[picks], train,
                      train.images[reference], train.subjects[reference], train.levels[reference])


def assign_splits(subjects: list[str], config: Config) -> dict[str, str]:
    """Seeded subject-level split: each subject goes to exactly one of train, validate, test."""
    unique = sorted(set(subjects))
    order = np.random.default_rng(config.split_seed).permutation(len(unique))
    n = len(unique)
    n_test = int(round(n * config.test_fraction))
    n_validate = int(round(n * config.validate_fraction))
    if n >= 3:  # every split gets a subject when there are enough of them
        n_test = max(n_test, 1 if config.test_fraction > 0 else 0)
        n_validate = max(n_validate, 1 if config.validate_fraction > 0 else 0)
    assignment = {}
    for rank, index in enumerate(order):
        split = "test" if rank < n_test else "validate" if rank < n_test + n_validate else "train"
        assignment[unique[index]] = split
    return assignment


def _preprocess_one(item: tuple[SourceFile, Config]):
    source_file, config = item
    reader = volume_slices if source_file.kind == "volume" else image_slices
    try:
        return reader(source_file.path, config)
    except DataError as error:
        return str(error)


def cache_key(files: list[SourceFile], root: Path, config: Config) -> str:
    digest = hashlib.sha1(f"format {CACHE_FORMAT}\n".encode())
    params = {key: getattr(config, key) for key in ("image_size", "tissue_intensity", "min_tissue_fraction",
                                                    "intensity_low_percentile", "intensity_high_percentile",
                                                    "axial_gain_max", "axial_gain_sigma")}
    digest.update(json.dumps(params, sort_keys=True).encode())
    for item in files:
        stat = item.path.stat()
        digest.update(f"{item.path.relative_to(root)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _read_cached(cache_file: Path) -> tuple[np.ndarray, dict, list] | None:
    """(images, columns, skipped) of a cache entry, or None when there is none; an entry that does not load is
    deleted (and so rebuilt), never trusted."""
    if not cache_file.exists():
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as stored:
            images = stored["images"].astype(np.float32) / 65535.0
            columns = {name: stored[name] for name in ("subjects", "sources", "indices", "levels", "fixed_splits")}
            return images, columns, list(stored["skipped"])
    except Exception:
        cache_file.unlink(missing_ok=True)
        return None


def _preprocess_files(files: list, config: Config, progress: bool, workers: int | None) -> list:
    """_preprocess_one of every source file, in order: in a pool of processes for volumes (each takes seconds),
    in this process for 2D images or a handful of files."""
    from tqdm import tqdm

    items = [(item, config) for item in files]
    workers = workers or min(os.cpu_count() or 1, 4, len(items))
    bar = dict(total=len(items), desc="preprocessing", unit="file", disable=not progress, file=sys.stderr)
    if workers > 1 and len(items) > 4 and any(item.kind == "volume" for item in files):
        with ProcessPoolExecutor(workers) as pool:
            return list(tqdm(pool.map(_preprocess_one, items, chunksize=1), **bar))
    return [_preprocess_one(item) for item in tqdm(items, **bar)]


def load_slices(data: str, config: Config, cache: Path, oasis_url: str = OFFICIAL_OASIS_URL,
                discs: str = "1-12", delete_archives: bool = False, strict: bool = False,
                progress: bool = True, workers: int | None = None) -> SliceSet:
    """All preprocessed slices of a source, with their subjects and splits, built once and then read from cache.

    A file that cannot be read is skipped with a warning (its path goes into `skipped`), unless `strict`;
    a source with no usable slice at all raises DataError.
    """
    cache = Path(cache)
    root, note = resolve_source(data, cache, oasis_url, discs, delete_archives, progress)
    files = list_source_files(root)
    key = cache_key(files, root, config)
    label = data if data in ("oasis", "oasis2") else root.name  # downloaded sources keep apart by name
    cache_file = cache / "slices" / f"{label}-{key}.npz"
    cached = _read_cached(cache_file)
    if cached is not None:
        images, columns, skipped = cached
        return _with_splits(images, columns, config, str(data), skipped, note)
    results = _preprocess_files(files, config, progress, workers)
    images, subjects, sources, indices, levels, fixed_splits, skipped = [], [], [], [], [], [], []
    for item, result in zip(files, results):
        if isinstance(result, str):
            if strict:
                raise DataError(result)
            warnings.warn(f"skipped {result}", stacklevel=1)
            skipped.append(str(item.path))
            continue
        slices, keep, slice_levels = result
        images.append(slices)
        subjects += [item.subject] * len(keep)
        sources += [str(item.path.relative_to(root))] * len(keep)
        indices += list(keep)
        levels += list(slice_levels)
        fixed_splits += [item.split or ""] * len(keep)
    if not images or not sum(len(block) for block in images):
        raise DataError(f"--data {data}: no slice with enough tissue in {len(files)} file(s) "
                        f"({len(skipped)} unreadable); check the folder holds brain scans")
    stacked = np.concatenate(images)
    columns = {"subjects": np.array(subjects), "sources": np.array(sources),
               "indices": np.array(indices, np.int32), "levels": np.array(levels, np.float32),
               "fixed_splits": np.array(fixed_splits)}
    quantized = np.round(stacked * 65535.0).astype(np.uint16)
    atomic_write(cache_file, lambda out: np.savez(out, images=quantized, skipped=np.array(skipped, dtype=str),
                                                  **columns))
    return _with_splits(quantized.astype(np.float32) / 65535.0, columns, config, str(data), skipped, note)


def _with_splits(images, columns, config, source, skipped, note) -> SliceSet:
    fixed = columns["fixed_splits"]
    if (fixed != "").all():
        splits = fixed
    else:
        assignment = assign_splits(list(columns["subjects"]), config)
        splits = np.array([assignment[subject] for subject in columns["subjects"]])
    splits = np.where(np.isin(columns["subjects"], config.exclude_subjects), EXCLUDED, splits)
    return SliceSet(images, columns["subjects"], columns["sources"], columns["indices"], columns["levels"], splits,
                    source, skipped, note)


def make_tf_dataset(images: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0, repeat: bool = False):
    """A tf.data pipeline of (batch, size, size, 1) float32 images of (n, size, size) `images` (of (n, size, size, c)
    stacks, such as the refiner's pairs, (batch, size, size, c)): cached, shuffled (seeded), batched, prefetched."""
    import tensorflow as tf

    stacks = images if images.ndim == 4 else images[..., None]
    dataset = tf.data.Dataset.from_tensor_slices(stacks.astype(np.float32)).cache()
    if shuffle:
        dataset = dataset.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def with_pipeline_options(dataset):
    """The tf.data options of every pipeline that train.py's fit and evaluate read:
    - under tf.distribute each worker keeps its share of every global batch (DATA sharding); the datasets are
      in-memory arrays with no files to shard, where the default AUTO policy warns and falls back to DATA;
    - no tf.data autotuning: destroying a finished epoch's iterator waits for the autotuner's thread to wake from
      its sleep, which on 2 cores stalled training with no CPU busy for up to 44 s between an epoch and its
      validation (the bottom prior's epochs took 76-148 s where 80 s were work); the pipelines only batch arrays
      already in memory, so there is nothing to tune (bench/pipeline_stall.py)."""
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    options.autotune.enabled = False
    return dataset.with_options(options)


def deformed_slices(images: np.ndarray, rng: np.random.Generator, pixels: float, flip: bool = True,
                    smoothness: float = 12.0) -> np.ndarray:
    """Each (n, h, w) slice warped by its own smooth random displacement field (the elastic deformation of Simard
    et al., 2003, used for medical images since U-Net): white noise per axis, Gaussian-smoothed with sigma
    `smoothness` pixels and scaled so its largest displacement is `pixels`, then bilinear resampling; with `flip`
    each warped slice is also left-right flipped with probability 1/2. The scans are atlas-registered, so what
    remains between subjects is such local shape; a warped slice is a plausible slice of a subject the training
    split lacks."""
    from scipy import ndimage

    height, width = images.shape[1:]
    rows, columns = np.meshgrid(np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32),
                                indexing="ij")
    warped = np.empty_like(images)
    for index, image in enumerate(images):
        field = ndimage.gaussian_filter(rng.standard_normal((2, height, width)).astype(np.float32),
                                        (0, smoothness, smoothness))
        field *= pixels / max(float(np.abs(field).max()), 1e-12)
        warped[index] = ndimage.map_coordinates(image, [rows + field[0], columns + field[1]], order=1,
                                                mode="constant", cval=0.0)
        if flip and rng.random() < 0.5:
            warped[index] = warped[index][:, ::-1]
    return warped


def prior_dataset(config: Config, grid: str, codes: dict, levels, variants: list[dict] | None = None):
    """A tf.data pipeline of (prior_inputs, codes) batches for the prior of `grid`. With `variants` (each the codes
    of the same slices augmented: left-right flipped, deformed) it is a training pipeline: shuffled, each grid drawn
    as itself or one of its variants at random, a `prior_level_dropout` share shown with an unknown level (NaN),
    and a `prior_context_corruption` (bottom grid) or `top_prior_context_corruption` (top grid) share of the codes
    it reads replaced by random ones; all seeded, drawn anew each epoch."""
    import tensorflow as tf

    from modules import grid_inputs

    columns = grid_inputs(grid, codes, np.asarray(levels, np.float32))
    if variants is not None:
        # every key but the levels (a slice's level is its variants' level) gets an axis of versions: (n, 1 + v, ...)
        versions = [columns] + [grid_inputs(grid, variant, None) for variant in variants]
        columns = {key: value if key == "levels" else np.stack([version[key] for version in versions], axis=1)
                   for key, value in columns.items()}
    dataset = tf.data.Dataset.from_tensor_slices(columns)
    if variants is not None:
        dataset = dataset.cache().shuffle(len(levels), seed=config.seed, reshuffle_each_iteration=True)
        draws = tf.data.Dataset.random(seed=config.seed, rerandomize_each_iteration=True)
        # functools.partial, not a lambda split over lines, which AutoGraph cannot read back (it warns each run)
        corruption = config.prior_field("prior_context_corruption", grid)
        dataset = tf.data.Dataset.zip(dataset, draws).map(
            functools.partial(augment, level_dropout=config.prior_level_dropout, context_corruption=corruption,
                              num_codes=config.num_codes))
    else:
        dataset = dataset.map(lambda inputs: (inputs, inputs["codes"]))
    return with_pipeline_options(dataset.batch(config.prior_batch_size).prefetch(tf.data.AUTOTUNE))


def augment(inputs, draw, level_dropout: float, context_corruption: float, num_codes: int):
    """One training example (inputs, target codes) from a grid's inputs with an axis of versions (the slice and its
    variants) and a random int64 `draw`: one version, its level or unknown, and the codes it reads with a
    `context_corruption` share replaced by random codes; the targets stay the version's true codes."""
    import tensorflow as tf

    versions = tf.shape(inputs["codes"], out_type=tf.int64)[0]
    chosen = {key: value if key == "levels" else value[draw % versions] for key, value in inputs.items()}
    hide = tf.cast((draw // versions) % 10000, tf.float32) < level_dropout * 10000
    chosen["levels"] = tf.where(hide, tf.constant(np.nan, tf.float32), inputs["levels"])
    targets = chosen["codes"]
    if context_corruption:
        seed = tf.stack([draw, tf.constant(1, tf.int64)])
        corrupt = tf.random.stateless_uniform(tf.shape(targets), seed) < context_corruption
        random_codes = tf.random.stateless_uniform(tf.shape(targets), seed + 1, 0, num_codes, dtype=tf.int32)
        chosen["codes"] = tf.where(corrupt, tf.cast(random_codes, targets.dtype), targets)
    return chosen, targets


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def save_preview(slice_set: SliceSet, path: Path, count: int = 8) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # slices of one subject (the first), evenly spaced through the head, when it has enough; else of the whole set
    own = np.flatnonzero(slice_set.subjects == slice_set.subjects[0])
    pool = own if len(own) >= count else np.arange(len(slice_set))
    picks = pool[np.linspace(0, len(pool) - 1, min(count, len(pool))).astype(int)]
    figure, axes = plt.subplots(1, len(picks), figsize=(2 * len(picks), 2.6), squeeze=False)
    for axis, index in zip(axes[0], picks):
        axis.imshow(slice_set.images[index], cmap="gray", vmin=0, vmax=1)
        axis.set_title(f"{slice_set.subjects[index]}\nslice {slice_set.indices[index]}", fontsize=7)
        axis.axis("off")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def level_range(levels: np.ndarray) -> str:
    """'0.05-0.93' (lowest to highest known level), with '(N unknown)' for slices without one; '-' when empty."""
    known = levels[np.isfinite(levels)]
    if not len(levels):
        return "-"
    if not len(known):
        return "unknown"
    unknown = len(levels) - len(known)
    return f"{known.min():.2f}-{known.max():.2f}" + (f" ({unknown} unknown)" if unknown else "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Prepare (download, extract, preprocess, cache) OASIS slices and "
                                                 "print a per-split summary.")
    add_data_args(parser, default_data=None, default_split="all")
    add_config_args(parser)
    parser.add_argument("--preview", type=Path, help="write a PNG of 8 preprocessed slices of the split")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = make_config(args.preset, args.overrides)
    except ValueError as error:
        raise UserError(str(error)) from None
    start = time.perf_counter()
    slice_set = load_slices(args.data, config, args.cache, args.oasis_url, args.discs, args.delete_archives,
                            args.strict, progress=not args.no_progress)
    elapsed = time.perf_counter() - start
    print(f"source: {args.data}" + (f"  ({slice_set.note})" if slice_set.note else ""))
    print(f"{'split':<10}{'subjects':>9}{'slices':>8}  levels")
    for split in (*SPLITS, "all"):
        part = slice_set.select(split)
        print(f"{split:<10}{len(set(part.subjects)):>9}{len(part):>8}  {level_range(part.levels)}")
    excluded = sorted(set(slice_set.subjects[slice_set.splits == EXCLUDED]))
    if excluded:
        print(f"excluded (config exclude_subjects): {', '.join(excluded)}")
    chosen = slice_set.select(args.split)
    if len(chosen):
        print(f"slice shape {chosen.images.shape[1:]}, float32, values {chosen.images.min():.3f} to "
              f"{chosen.images.max():.3f}")
    if slice_set.skipped:
        print(f"skipped {len(slice_set.skipped)} unreadable file(s): {', '.join(slice_set.skipped[:3])}")
    print(f"time {elapsed:.1f} s")
    if args.preview:
        if not len(chosen):
            raise UserError(f"--preview: split {args.split!r} has no slices")
        save_preview(chosen, args.preview)
        print(f"wrote {args.preview}")
    return 0


if __name__ == "__main__":
    configure_tensorflow()
    run_main(main)
