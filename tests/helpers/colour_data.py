"""Small synthetic CIFAR-10 and SVHN in torchvision's layout, for tests: ``write_synthetic_colour`` and
``pack_cifar_archive``.

The files have the official structure (CIFAR-10: protocol-2 pickles of dicts with str keys, as the official Python 2
pickles read with ``encoding="latin1"``; SVHN: MATLAB 5 files with ``X`` uint8 (32, 32, 3, N) and ``y`` uint8 (N, 1)
in 1..10, 10 for the digit 0), so torchvision's own classes read them too once their md5 check is bypassed. They
are not the official files: load them with ``check_md5=False``.

Each class is a bright block in its own place and its own colour on a dim noisy background, every pixel strictly
between 0 and 255, so a tiny model can learn it and a Bernoulli sample of any image is random.
"""

from __future__ import annotations

import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np

from ssvae_pl.data.sources import colour as sources
from ssvae_pl.data.sources import named

NUM_CLASSES = 10
# one colour per class (RGB)
PALETTE = np.array([
    (230, 40, 40), (40, 230, 40), (40, 40, 230), (230, 230, 40), (230, 40, 230),
    (40, 230, 230), (240, 140, 30), (140, 30, 240), (30, 240, 140), (220, 220, 220),
])  # fmt: skip


def colour_images(labels: np.ndarray, seed: int) -> np.ndarray:
    """uint8 images (N, 3, 32, 32): class ``c`` is a 12 x 6 block of colour ``PALETTE[c]`` at its own place
    (classes 0-4 in the top half, 5-9 in the bottom half), on a dim noisy background."""
    rng = np.random.default_rng(seed)
    images = rng.integers(10, 60, size=(len(labels), 3, 32, 32))
    for i, c in enumerate(labels):
        row, col = divmod(int(c), 5)
        r0, c0 = 3 + 14 * row, 1 + 6 * col
        block = PALETTE[c][:, None, None] + rng.integers(-8, 9, size=(3, 12, 6))
        images[i, :, r0 : r0 + 12, c0 : c0 + 6] = block
    return images.clip(1, 254).astype(np.uint8)


def balanced_labels(n: int, seed: int) -> np.ndarray:
    """``n`` labels, as many of each class as can be (``n % 10`` classes get one more), shuffled; int64."""
    return np.random.default_rng(seed).permutation(np.arange(n) % NUM_CLASSES).astype(np.int64)


def write_synthetic_colour(root: str | Path, name: str, n_train: int, n_test: int) -> dict:
    """Write a small synthetic ``name`` (``cifar10`` or ``svhn``) under the data_dir ``root``, in torchvision's
    layout (see ``ssvae_pl.data.sources.colour``), and return what ``load`` should give back::

        {"folder": Path, "files": {file name: Path},
         "train": (images uint8 (n_train, 3, 32, 32), labels int64 (n_train,) in 0..9),
         "test": (images uint8 (n_test, 3, 32, 32), labels int64 (n_test,) in 0..9)}
    """
    if name not in ("cifar10", "svhn"):
        raise ValueError(f"write_synthetic_colour writes cifar10 or svhn, not {name!r}")
    folder = named(name, root).folder
    folder.mkdir(parents=True, exist_ok=True)
    train_labels, test_labels = balanced_labels(n_train, 0), balanced_labels(n_test, 1)
    splits = {"train": (colour_images(train_labels, 2), train_labels),
              "test": (colour_images(test_labels, 3), test_labels)}
    if name == "cifar10":
        files = _write_cifar(folder, splits)
    else:
        files = _write_svhn(folder, splits)
    return {"folder": folder, "files": files, **splits}


def _write_cifar(folder: Path, splits: dict) -> dict[str, Path]:
    files = {}
    train_images, train_labels = splits["train"]
    chunks = zip(np.array_split(train_images, len(sources.CIFAR10_TRAIN_FILES)),
                 np.array_split(train_labels, len(sources.CIFAR10_TRAIN_FILES)))
    batches = [(f"training batch {i} of 5", file_name, chunk)
               for i, (file_name, chunk) in enumerate(zip(sources.CIFAR10_TRAIN_FILES, chunks), 1)]
    batches.append(("testing batch 1 of 1", sources.CIFAR10_TEST_FILES[0], splits["test"]))
    for batch_label, file_name, (images, labels) in batches:
        entry = {
            "batch_label": batch_label,
            "labels": [int(label) for label in labels],  # a list of ints, as in the official files
            "data": np.ascontiguousarray(images.reshape(len(images), 3 * 32 * 32)),
            "filenames": [f"synthetic_{i}.png" for i in range(len(images))],
        }
        files[file_name] = folder / file_name
        files[file_name].write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"num_cases_per_batch": len(batches[0][2][0]), "label_names": list(sources.CIFAR10.classes),
            "num_vis": 3072}
    files[sources.CIFAR10_META_FILE] = folder / sources.CIFAR10_META_FILE
    files[sources.CIFAR10_META_FILE].write_bytes(pickle.dumps(meta, protocol=2))
    return files


def _write_svhn(folder: Path, splits: dict) -> dict[str, Path]:
    from scipy.io import savemat

    files = {}
    for split, (images, labels) in splits.items():
        file_name = sources.SVHN_FILES[split]
        y = np.where(labels == 0, 10, labels).astype(np.uint8).reshape(-1, 1)  # SVHN writes the digit 0 as 10
        files[file_name] = folder / file_name
        savemat(files[file_name], {"X": np.ascontiguousarray(images.transpose(2, 3, 1, 0)), "y": y})
    return files


def pack_cifar_archive(root: str | Path) -> Path:
    """Pack ``<root>/cifar-10-batches-py`` (as ``write_synthetic_colour`` wrote it) into
    ``<root>/cifar-10-python.tar.gz``, laid out as the official archive (a readme.html besides), and remove the
    folder; return the archive's path."""
    root = Path(root)
    folder = root / sources.CIFAR10_FOLDER
    (folder / "readme.html").write_text("<html>synthetic CIFAR-10</html>\n")
    archive = root / sources.CIFAR10_ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=sources.CIFAR10_FOLDER)
    shutil.rmtree(folder)
    return archive
