"""Shared test set-up: `import dataset` from the project root, and small synthetic MRI-like data.

Everything here is made by the tests themselves (a few kB each), so the core suite runs without ../shared/data;
tests that read the real OASIS subset use the `shared_data` fixture, which skips with a reason when it is absent.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path[:1]:
    sys.path.insert(0, str(PROJECT_ROOT))

SMALL_SHAPE = (40, 48, 40)  # x, y, z: axial slices are the last axis
RGB_DTYPE = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])


# ---------------------------------------------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------------------------------------------

def make_volume(shape=SMALL_SHAPE, seed: int = 0, fill: float = 0.7) -> np.ndarray:
    """A smooth brain-like 3D float32 volume: a bright ellipsoid ("brain") on a zero background, with a darker
    inner ellipsoid ("ventricles") and a gentle seeded texture. The ellipsoid spans `fill` of each axis around
    the centre, so the first and last slices along every axis are empty background.
    """
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1.0, 1.0, n) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    radius = np.sqrt((x / fill) ** 2 + (y / fill) ** 2 + (z / fill) ** 2)
    brain = np.clip((1.0 - radius) * 8.0, 0.0, 1.0)  # soft edge
    phase = rng.uniform(0, 2 * np.pi, 3)
    texture = 0.15 * np.sin(5 * x + phase[0]) * np.sin(4 * y + phase[1]) * np.sin(3 * z + phase[2])
    inner = np.sqrt((x / 0.25) ** 2 + (y / 0.35) ** 2 + (z / 0.3) ** 2) < 1.0
    volume = brain * (0.75 + texture)
    volume[inner] *= 0.35
    return volume.astype(np.float32)


def make_slice(shape=(64, 56), seed: int = 0, blank: bool = False) -> np.ndarray:
    """A 2D brain-like float image in [0, 1] (an ellipse with texture), or all zeros when `blank`."""
    if blank:
        return np.zeros(shape, np.float32)
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    radius = np.sqrt((rows / 0.8) ** 2 + (cols / 0.7) ** 2)
    image = np.clip((1.0 - radius) * 6.0, 0.0, 1.0) * (0.7 + 0.2 * np.sin(6 * rows + rng.uniform(0, 6)))
    return image.astype(np.float32)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """A NIfTI-1 file (.nii or .nii.gz by the name); `data` keeps its dtype (float, int, RGB, 4D...)."""
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(data, np.eye(4) if affine is None else affine).to_filename(str(path))
    return path


def write_analyze(path: Path, data: np.ndarray) -> Path:
    """An Analyze 7.5 pair `path` (.hdr) + .img, int16 big-endian like the OASIS-1 discs. Returns the .hdr."""
    import nibabel as nib

    path = Path(path).with_suffix(".hdr")
    path.parent.mkdir(parents=True, exist_ok=True)
    scaled = np.round(np.asarray(data, np.float64) / max(float(np.max(data)), 1e-6) * 1500.0)
    header = nib.AnalyzeHeader(endianness=">")
    header.set_data_dtype(">i2")
    nib.AnalyzeImage(scaled.astype(">i2"), None, header).to_filename(str(path))
    return path


def analyze_bytes(data: np.ndarray) -> tuple[bytes, bytes]:
    """The (.hdr, .img) bytes of an int16 big-endian Analyze 7.5 volume, for building archives in memory."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        hdr = write_analyze(Path(folder) / "volume.hdr", data)
        return hdr.read_bytes(), hdr.with_suffix(".img").read_bytes()


def write_png(path: Path, image: np.ndarray, bits: int = 8, rgb: bool = False) -> Path:
    """`image` in [0, 1] as an 8-bit (optionally RGB) or 16-bit grayscale PNG."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if bits == 16:
        pixels = Image.fromarray(np.round(np.clip(image, 0, 1) * 65535).astype(np.uint16))
    else:
        pixels = Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))
        if rgb:
            pixels = pixels.convert("RGB")
    pixels.save(path)
    return path


def write_jpeg(path: Path, image: np.ndarray) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path, quality=90)
    return path


def subprocess_env() -> dict[str, str]:
    """The environment for running a project script as a subprocess: quiet TensorFlow, project on the path."""
    env = dict(os.environ)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONPATH"] = str(PROJECT_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# ---------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def project_root() -> Path:
    return PROJECT_ROOT


@pytest.fixture
def config():
    """The default preset's config (the data section is what dataset.py uses)."""
    from hyperparameters import make_config

    return make_config("default")


@pytest.fixture
def cache(tmp_path) -> Path:
    """A fresh cache folder per test: tests never touch the project's data/ folder."""
    folder = tmp_path / "cache"
    folder.mkdir()
    return folder


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real OASIS-1 subset at ../shared/data (relative to the project root); skips when it is absent."""
    folder = PROJECT_ROOT / ".." / "shared" / "data"
    if not folder.is_dir():
        pytest.skip(f"real OASIS data not available: {folder.resolve()} is absent (see ../shared/data/README.md)")
    return folder
