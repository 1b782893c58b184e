"""The colour datasets (3 x 32 x 32), ``data.dataset: cifar10`` or ``svhn``, in torchvision's layout under ``root``:
* ``cifar10``: ``<root>/cifar-10-batches-py/`` (``data_batch_1`` .. ``5``, ``test_batch``, ``batches.meta``), the
  official pickles, read by an unpickler that only rebuilds numpy arrays (``data`` uint8 (N, 3072) of R, G, B
  planes; ``labels`` in 0..9);
* ``svhn``: ``<root>/SVHN/train_32x32.mat``, ``test_32x32.mat`` (not ``extra``), read with scipy: ``X`` uint8
  (32, 32, 3, N), ``y`` (N, 1) in 1..10, where 10 is the digit 0.
Names, URLs and md5s are torchvision's; the files are read here (its classes re-check md5s whenever built), so
``check_md5=False`` loads one's own files. Sources in order: files already there (non-empty and, with ``check_md5``,
of the official md5; one that fails is never deleted or overwritten); for CIFAR-10, ``<root>/cifar-10-python.tar.gz``;
torchvision's download (with ``download``). Else one ``DataSourceError`` lists what was tried and what to put where."""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import torch
import torchvision

from ssvae_pl.data.sources.base import DataSourceError, NamedDataset
from ssvae_pl.data.sources.fetch import check_md5, fetch_into, quiet, short_reason
from ssvae_pl.data.sources.safe_pickle import NumpyArraysUnpickler

logger = logging.getLogger(__name__)

_CIFAR10 = torchvision.datasets.CIFAR10
CIFAR10_FOLDER: str = _CIFAR10.base_folder  # cifar-10-batches-py
CIFAR10_ARCHIVE: str = _CIFAR10.filename  # cifar-10-python.tar.gz
CIFAR10_URL: str = _CIFAR10.url
CIFAR10_TRAIN_FILES: tuple[str, ...] = tuple(name for name, _ in _CIFAR10.train_list)
CIFAR10_TEST_FILES: tuple[str, ...] = tuple(name for name, _ in _CIFAR10.test_list)
CIFAR10_META_FILE: str = _CIFAR10.meta["filename"]
CIFAR10_MD5 = {**dict(_CIFAR10.train_list), **dict(_CIFAR10.test_list), CIFAR10_META_FILE: _CIFAR10.meta["md5"]}

SVHN_FOLDER = "SVHN"  # torchvision's SVHN is given root <root>/SVHN
_SVHN_SPLITS = {split: torchvision.datasets.SVHN.split_list[split] for split in ("train", "test")}  # url, file, md5
SVHN_FILES: dict[str, str] = {split: file_name for split, (_, file_name, _) in _SVHN_SPLITS.items()}
SVHN_URLS: dict[str, str] = {file_name: url for url, file_name, _ in _SVHN_SPLITS.values()}
SVHN_MD5: dict[str, str] = {file_name: md5 for _, file_name, md5 in _SVHN_SPLITS.values()}


class ColourDataset(NamedDataset):
    """What CIFAR-10 and SVHN share: the fetch, the checks of a present file and the error that lists the tries."""

    image_shape = (3, 32, 32)
    files: tuple[str, ...]

    @property
    def folder(self) -> Path:
        return self.root / self.folder_name

    def official_source(self, file_name: str) -> str:
        raise NotImplementedError

    def ensure_files(self) -> Path:
        folder, expected_md5 = self.folder, (self.md5 if self.check_md5 else {})
        missing = []
        for file_name in self.files:
            path = folder / file_name
            if path.exists():
                self.verify(path, expected_md5.get(file_name))
            else:
                missing.append(file_name)
        if not missing:
            return folder
        tried = [f"local files in {folder}: missing {', '.join(missing)}"]
        if self.from_local_archive(missing, tried):
            return folder
        description = f"torchvision download ({type(self).__name__}) from {self.urls(missing)}"
        if self.download:
            try:
                fetch_into(folder, missing, lambda staging: self.stage_download(staging, missing),
                           lambda path: self.verify(path, expected_md5.get(path.name)))
            except Exception as exc:  # any failure of the download moves us on
                logger.info("%s failed: %s", description, short_reason(exc))
                tried.append(f"{description}: {short_reason(exc)}")
            else:
                logger.info("%s: files ready in %s", description, folder)
                return folder
        else:
            tried.append(f"{description}: skipped (download=False)")
        tried.append(f"offline sources: none known for {self.name}")
        steps = "\n".join(f"  {i}. {line}" for i, line in enumerate(tried, 1))
        raise DataSourceError(f"Could not get the files of dataset {self.name!r} (torchvision.datasets."
                              f"{type(self).__name__}).\nroot: {self.root.resolve()}\nTried, in order:\n{steps}\n"
                              f"{self.fix(missing)}")

    def verify(self, path: Path, expected_md5: str | None) -> None:
        """Quick check of a file (non-empty; a .mat file that scipy can read) and, if ``expected_md5`` is given, its
        md5; ``DataSourceError`` on failure. The full structure is checked when it is loaded."""
        fix = (f"Fix: delete it so it is fetched again, or replace it with the official file "
               f"({self.official_source(path.name)}).")
        if path.stat().st_size == 0:
            raise DataSourceError(f"{path}: empty file (0 bytes).\n{fix}")
        if path.suffix == ".mat":
            with path.open("rb") as f:
                header = f.read(10)
            if header == b"MATLAB 7.3":
                raise DataSourceError(
                    f"{path}: a MATLAB v7.3 (HDF5) file, which scipy cannot read; the official files are MATLAB 5.\n"
                    f"{fix} (Or re-save it in MATLAB with save(..., '-v7').)")
        check_md5(path, expected_md5, fix)

    def from_local_archive(self, missing: list[str], tried: list[str]) -> bool:
        """Take the missing files from an archive already on disk; ``False`` where there is none."""
        return False


class CIFAR10(ColourDataset):
    """CIFAR-10's 60,000 photos of 10 classes; also from ``<root>/cifar-10-python.tar.gz`` if it is there."""

    name, folder_name, md5, torchvision_class = "cifar10", CIFAR10_FOLDER, CIFAR10_MD5, _CIFAR10
    classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    train_size, test_size = 50000, 10000
    files = (*CIFAR10_TRAIN_FILES, *CIFAR10_TEST_FILES, CIFAR10_META_FILE)

    def official_source(self, file_name: str) -> str:
        return f"{CIFAR10_FOLDER}/{file_name} inside {CIFAR10_URL}"

    def urls(self, missing: list[str]) -> str:
        return CIFAR10_URL

    def from_local_archive(self, missing: list[str], tried: list[str]) -> bool:
        archive = self.root / CIFAR10_ARCHIVE
        if not archive.is_file():
            tried.append(f"local archive {archive}: not present")
            return False
        logger.info("extracting %s from %s", ", ".join(missing), archive)
        expected_md5 = self.md5 if self.check_md5 else {}
        try:
            fetch_into(self.folder, missing, lambda staging: _extract_members(archive, staging, missing),
                       lambda path: self.verify(path, expected_md5.get(path.name)),
                       staged_as=f"{archive} member {CIFAR10_FOLDER}")
        except Exception as exc:  # a local archive is the user's: say what is wrong with it, try nothing else
            raise DataSourceError(
                f"{archive}: could not take {', '.join(missing)} from it ({short_reason(exc)}).\n"
                f"It is left as it is.  Fix: replace it with the official {CIFAR10_URL} (or delete it so it is "
                f"downloaded again), or put the extracted files in {self.folder.resolve()}; if it is a deliberate "
                f"custom archive, turn the md5 check off (check_md5=False).") from None
        return True

    def stage_download(self, staging: Path, missing: list[str]) -> None:
        """torchvision downloads and extracts the whole archive into ``staging/cifar-10-batches-py``; the missing
        files are moved up to ``staging``."""
        logger.info("downloading CIFAR10 with torchvision")
        output = quiet(lambda: self.torchvision_class(str(staging), train=True, download=True))
        logger.debug("torchvision download output:\n%s", output)
        for file_name in missing:
            if (staging / CIFAR10_FOLDER / file_name).exists():
                os.replace(staging / CIFAR10_FOLDER / file_name, staging / file_name)

    def fix(self, missing: list[str]) -> str:
        return (f"Fix: download {CIFAR10_URL} and put it, as it is, in {self.root.resolve()} (the missing files are "
                f"taken from it on the next run), or put the files {', '.join(missing)} from its folder "
                f"{CIFAR10_FOLDER}/ in {self.folder.resolve()}; then run again.")

    def load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (N, 3, 32, 32) and int64 labels of the split's batch files, concatenated."""
        batches = [_read_cifar_batch(self.folder / name)
                   for name in (CIFAR10_TRAIN_FILES if train else CIFAR10_TEST_FILES)]
        images = np.concatenate([data for data, _ in batches]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([labels for _, labels in batches])
        return torch.from_numpy(images).contiguous(), torch.from_numpy(labels).contiguous()


class SVHN(ColourDataset):
    """The Street View House Numbers, cropped digits (train and test; ``extra`` is not used)."""

    name, folder_name, md5, classes = "svhn", SVHN_FOLDER, SVHN_MD5, tuple(str(digit) for digit in range(10))
    torchvision_class = torchvision.datasets.SVHN
    train_size, test_size = 73257, 26032
    files = tuple(SVHN_FILES.values())

    def official_source(self, file_name: str) -> str:
        return SVHN_URLS.get(file_name, "http://ufldl.stanford.edu/housenumbers/")

    def urls(self, missing: list[str]) -> str:
        return ", ".join(SVHN_URLS[f] for f in missing if f in SVHN_URLS)

    def stage_download(self, staging: Path, missing: list[str]) -> None:
        logger.info("downloading SVHN with torchvision")
        for split, file_name in SVHN_FILES.items():
            if file_name in missing:
                output = quiet(lambda: self.torchvision_class(str(staging), split=split, download=True))
                logger.debug("torchvision download output:\n%s", output)

    def fix(self, missing: list[str]) -> str:
        lines = "\n".join(f"  {file_name}  from {SVHN_URLS[file_name]}" for file_name in missing)
        return f"Fix: download these files and put them in {self.folder.resolve()}, then run again:\n{lines}"

    def load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = _read_svhn_file(self.folder / SVHN_FILES["train" if train else "test"])
        return torch.from_numpy(images).contiguous(), torch.from_numpy(labels).contiguous()


def _extract_members(archive: Path, staging: Path, missing: list[str]) -> None:
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


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``data`` uint8 (N, 3072) and ``labels`` (int64) of one CIFAR-10 batch file; DataSourceError if not one."""
    fix = (f"Fix: delete it so it is fetched again, or replace it with the official file "
           f"({CIFAR10_FOLDER}/{path.name} inside {CIFAR10_URL}).")
    try:
        with path.open("rb") as f:
            entry = NumpyArraysUnpickler(f, encoding="latin1").load()
    except Exception as exc:  # truncated, not a pickle, or a pickle of something else than numpy arrays
        raise DataSourceError(f"{path}: not a readable CIFAR-10 batch ({short_reason(exc)}).\n{fix}") from None
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
        raise DataSourceError(f"{path}: not a readable MATLAB file ({short_reason(exc)}).\n{fix}") from None
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
