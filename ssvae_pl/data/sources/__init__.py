"""Where the images come from: one small class per source, chosen by name (``data.dataset: mnist``) or by class
path (``data.dataset: {class_path: ssvae_pl.data.ImageFolder, init_args: ...}``, or a class of one's own).

``base.py`` what a data module asks of a source (``ImageSource``) and the named datasets' common part;
``mnist.py`` MNIST, Fashion-MNIST and KMNIST over ``idx.py`` (their files) and ``offline.py`` (their fallbacks
without the mirrors); ``colour.py`` CIFAR-10 and SVHN; ``fetch.py`` md5 and staged fetching. The user's own folders
are ``ssvae_pl.data.image_folder.ImageFolder``.
"""

from __future__ import annotations

from pathlib import Path

from ssvae_pl.data.sources.base import DataSourceError, ImageSource, NamedDataset
from ssvae_pl.data.sources.colour import CIFAR10, SVHN
from ssvae_pl.data.sources.mnist import KMNIST, MNIST, FashionMNIST
from ssvae_pl.errors import ConfigError

NAMED: dict[str, type[NamedDataset]] = {cls.name: cls for cls in (MNIST, FashionMNIST, KMNIST, SVHN, CIFAR10)}

__all__ = ["CIFAR10", "KMNIST", "MNIST", "NAMED", "SVHN", "DataSourceError", "FashionMNIST", "ImageSource",
           "NamedDataset", "named"]


def named(name: str, root: str | Path = "data", download: bool = True, check_md5: bool = True) -> NamedDataset:
    """The dataset called ``name`` (``data.dataset``), its files under ``root``; ``ConfigError`` listing the names."""
    if name not in NAMED:
        raise ConfigError(f"data.dataset={name!r} is not known; choose one of {sorted(NAMED)}, or give a source by "
                          "class path (e.g. ssvae_pl.data.ImageFolder for your own images).")
    return NAMED[name](root, download=download, check_md5=check_md5)
