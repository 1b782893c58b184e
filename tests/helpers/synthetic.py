"""A small synthetic MNIST written as valid IDX files, and the settings that read it (no download, no md5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ssvae_pl.data.sources import idx as sources
from ssvae_pl.data.sources import named
from ssvae_pl.data.sources.idx import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, idx_bytes

N_TRAIN, N_TEST, NUM_CLASSES = 600, 200, 10
VAL_SIZE = 100  # the data module checks val_size against MNIST's 60,000; the synthetic train set holds 600

# Synthetic-data settings for SemiSupervisedDataModule (no download, no md5: the files are not the official ones).
SYNTHETIC = dict(dataset="mnist", val_size=VAL_SIZE, download=False, check_md5=False)



def synthetic_images(labels: np.ndarray, seed: int) -> np.ndarray:
    """28x28 uint8 grey images: a bright class-dependent block on a dim background, plus noise.

    Every pixel is strictly between 0 and 255, so a Bernoulli sample of any image is genuinely random.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    images = rng.integers(10, 60, size=(n, 28, 28))  # dim, noisy background
    for i, c in enumerate(labels):
        row, col = divmod(int(c), 5)  # classes 0-4 in the top half, 5-9 in the bottom half
        r0, c0 = 2 + 12 * row, 1 + 5 * col
        images[i, r0 : r0 + 12, c0 : c0 + 5] = rng.integers(180, 250, size=(12, 5))
    return images.astype(np.uint8)


def balanced_labels(n: int, seed: int) -> np.ndarray:
    """``n / 10`` labels of each class, shuffled."""
    return np.random.default_rng(seed).permutation(np.arange(n) % NUM_CLASSES).astype(np.uint8)


def write_synthetic_mnist(root: Path, n_train: int = N_TRAIN, n_test: int = N_TEST) -> dict[str, np.ndarray]:
    """Write the four MNIST IDX files into ``root/MNIST/raw``; return the arrays written."""
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    train_labels, test_labels = balanced_labels(n_train, 0), balanced_labels(n_test, 1)
    arrays = {
        sources.TRAIN_IMAGES: synthetic_images(train_labels, 2),
        sources.TRAIN_LABELS: train_labels,
        sources.TEST_IMAGES: synthetic_images(test_labels, 3),
        sources.TEST_LABELS: test_labels,
    }
    for name, array in arrays.items():
        magic = IDX_IMAGES_MAGIC if array.ndim == 3 else IDX_LABELS_MAGIC
        (raw / name).write_bytes(idx_bytes(array, magic))
    assert sorted(arrays) == sorted(sources.RAW_FILES)
    return arrays


def ensure(name: str, root, download: bool = True, check_md5: bool = True) -> Path:
    """The named dataset's files under ``root``, found, fetched and verified: their folder."""
    return named(name, root, download, check_md5).ensure_files()


def load(name: str, root, train: bool, download: bool = True, check_md5: bool = True):
    """One split of the named dataset under ``root``: uint8 images (N, C, H, W), int64 labels."""
    dataset = named(name, root, download, check_md5)
    dataset.ensure_files()
    return dataset.load(train)
