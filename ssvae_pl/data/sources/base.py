"""What a data module asks of a source of images (``ImageSource``), and the sources of a fixed, named dataset
(``NamedDataset``: torchvision's layout under ``root``, fetched and verified on first use)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from ssvae_pl.data.labelled import check_label_budget
from ssvae_pl.data.preprocess import Preprocessing
from ssvae_pl.errors import ConfigError

OnError = Literal["skip", "fail"]
Images = Any  # uint8 (N, C, H, W) tensor, or image_folder.FolderImages (decoded batch by batch)


class DataSourceError(RuntimeError):
    """The files of a dataset could not be found, fetched or verified; the message says what to do."""


class ImageSource(ABC):
    """A source of training and test images for ``SemiSupervisedDataModule`` (``data.dataset``): its classes and
    image shape (known before any image is read), a check of the data module's label budget, the fetch, and the
    two splits as uint8 images ``(N, C, H, W)`` with int64 labels (``labelled.UNLABELLED`` for unlabelled ones)."""

    @property
    @abstractmethod
    def class_names(self) -> list[str]:
        """The classes' names, in label order."""

    @property
    @abstractmethod
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""

    @property
    def num_train(self) -> int | None:
        """Training images, where known before they are read."""
        return None

    def check(self, num_labelled: int | None, val_size: int, unlabelled: str, balanced: bool = True) -> None:
        """``ConfigError`` naming the ``data.`` field when the budget cannot be met (``balanced``: split evenly over
        the classes, as the seeded pick is; not for a subset named by ``data.labelled_indices``)."""
        if num_labelled is not None and balanced:
            check_label_budget(num_labelled, len(self.class_names))
        if val_size < 0:
            raise ConfigError(f"data.val_size must be >= 0, got {val_size}.")

    def prepare(self) -> None:
        """Fetch and verify the files (once, on one process)."""

    @abstractmethod
    def train_split(self, preprocessing: Preprocessing, on_error: OnError
                    ) -> tuple[Images, torch.Tensor, list[str] | None]:
        """The training pool: images, labels, and each image's file (``None`` where they have no files)."""

    @abstractmethod
    def test_split(self, preprocessing: Preprocessing, on_error: OnError) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The labelled test images, or ``None`` where the source has none."""

    @abstractmethod
    def config(self) -> str | dict[str, Any]:
        """How checkpoints and run records name this source: a name, or ``{class_path, init_args}``."""

    def labels_origin(self, train: bool) -> str:
        """Where a split's labels come from, for an error about them: a file where there is one."""
        return f"the {'training' if train else 'test'} labels of data.dataset {self.config()!r}"

    def check_labels(self, labels: torch.Tensor, train: bool) -> None:
        """Every label is a class index, or ``UNLABELLED`` in a training pool: ``DataSourceError`` naming the first
        label outside, where it comes from, and the fix (a damaged file trains on garbage, or fails deep inside)."""
        from ssvae_pl.data.labelled import UNLABELLED

        num_classes = len(self.class_names)
        bad = ((labels < 0) | (labels >= num_classes)) & ~((labels == UNLABELLED) & train)
        if bad.any():
            index = int(bad.nonzero()[0, 0])
            raise DataSourceError(f"{self.labels_origin(train)}: label {int(labels[index])} of image {index} is not "
                                  f"one of the {num_classes} classes (0..{num_classes - 1}), and {int(bad.sum())} "
                                  "label(s) in all; the file is damaged: replace it with a complete official copy "
                                  "(data.check_md5 true checks it against the official one).")


class NamedDataset(ImageSource):
    """A fixed dataset in torchvision's layout under ``root``, chosen by name (``data.dataset: mnist``); subclasses
    give the facts (class attributes) and how to fetch (``ensure_files``) and read (``load``) the files."""

    name: ClassVar[str]
    torchvision_class: ClassVar[type]  # the torchvision dataset of the same files
    classes: ClassVar[tuple[str, ...]]
    image_shape: ClassVar[tuple[int, int, int]]
    train_size: ClassVar[int]
    test_size: ClassVar[int]
    md5: ClassVar[dict[str, str]]  # official md5 of each file; empty: structural checks only

    def __init__(self, root: str | Path = "data", download: bool = True, check_md5: bool = True) -> None:
        self.root, self.download, self.check_md5 = Path(root), download, check_md5

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.image_shape)

    @property
    def num_train(self) -> int:
        return self.train_size

    @property
    @abstractmethod
    def folder(self) -> Path:
        """Where the files are (torchvision's layout under ``root``)."""

    @abstractmethod
    def ensure_files(self) -> Path:
        """Find, fetch and verify the files; return ``folder``; ``DataSourceError`` saying what to do."""

    @abstractmethod
    def load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (N, C, H, W), contiguous, and int64 labels (N,) of one split."""

    def check(self, num_labelled: int | None, val_size: int, unlabelled: str, balanced: bool = True) -> None:
        if num_labelled is None:
            raise ConfigError(f"data.num_labelled must be a number for {self.name} (e.g. 100: 10 per class); null "
                              "(all labelled images) is for an ImageFolder.")
        super().check(num_labelled, val_size, unlabelled, balanced)
        if not 0 <= val_size < self.train_size:
            raise ConfigError(f"data.val_size={val_size} is out of range; it must be between 0 and "
                              f"{self.train_size - 1} (the {self.name} training set holds {self.train_size} images).")
        if num_labelled > self.train_size - val_size:
            raise ConfigError(f"data.num_labelled={num_labelled} exceeds the {self.train_size - val_size} training "
                              f"images left after data.val_size={val_size}; lower one of them.")
        if unlabelled == "rest" and num_labelled == self.train_size - val_size:
            raise ConfigError(f"data.unlabelled='rest' with data.num_labelled={num_labelled} leaves no unlabelled "
                              "images; lower data.num_labelled or use data.unlabelled='all'.")

    def prepare(self) -> None:
        self.ensure_files()

    def train_split(self, preprocessing: Preprocessing, on_error: OnError) -> tuple[torch.Tensor, torch.Tensor, None]:
        self.ensure_files()
        return *self.load(train=True), None

    def test_split(self, preprocessing: Preprocessing, on_error: OnError) -> tuple[torch.Tensor, torch.Tensor]:
        self.ensure_files()
        return self.load(train=False)

    def config(self) -> str:
        return self.name
