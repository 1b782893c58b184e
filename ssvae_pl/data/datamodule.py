"""``SemiSupervisedDataModule``: mixed labelled/unlabelled training batches from images held in memory.

Every training batch is ``{"labelled": (x, y), "unlabelled": x}``: an epoch is one pass over the unlabelled images
(a ``DataLoader``, sharded across ranks by Lightning under DDP), each step paired with the next batch of an endless
labelled stream (``LabelledStream``: consecutive reshuffles of the whole labelled subset, never sharded, so every
rank trains on the same labels). Lightning's ``CombinedLoader`` in ``min_size`` mode zips the two.
Validation and test batches are ``(x, y)``; predict batches are the test set's ``(x, y)``, or the images ``x``
alone of a folder of the user's own (``predict_dir``, read by ``image_folder.py``), whose files are named in
``predict_files`` in the batches' order.

The fast path: the images stay uint8 tensors, in host memory or (``device: auto`` on a GPU) on the accelerator;
a batch is gathered by index in one tensor operation; conversion to floats in [0, 1] and dynamic binarisation
happen on the training device, in ``on_after_batch_transfer``. Outside a Trainer, ``to_model_input`` does the same.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Literal

import pytorch_lightning as pl
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from pytorch_lightning.utilities import CombinedLoader
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler

from ssvae_pl.data.image_folder import Invert, OnError, load_image_folder
from ssvae_pl.data.labelled import Split, check_label_budget, make_split
from ssvae_pl.data.sources import DATASETS, ensure_raw_files, load_split
from ssvae_pl.errors import ConfigError

log = logging.getLogger(__name__)

Binarize = Literal["dynamic", "static", "none"]
LABELLED_INDICES_FILE = "labelled_indices.json"


def _batch_as_is(batch):
    """``collate_fn`` for datasets whose ``__getitems__`` (or iterator) already returns a whole batch."""
    return batch


def to_model_input(batch: Any, dynamic: bool = False) -> Any:
    """uint8 images anywhere in ``batch`` -> float32 in [0, 1], on the device they are on; with ``dynamic`` each is
    replaced by a fresh Bernoulli sample of itself (the paper's dynamic binarisation). Labels pass through."""

    def convert(images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0)
        return torch.bernoulli(x) if dynamic else x

    return apply_to_collection(batch, torch.Tensor, lambda t: convert(t) if t.dtype == torch.uint8 else t)


def _indices_on(device: torch.device, indices) -> torch.Tensor:
    """Batch indices as an int64 tensor on ``device``. To a GPU they travel from pinned memory without blocking, so
    the host never waits for the device between training steps."""
    idx = torch.as_tensor(indices, dtype=torch.int64)
    return idx if device.type == "cpu" else idx.pin_memory().to(device, non_blocking=True)


class InMemoryImages(Dataset):
    """uint8 images (N, C, H, W) and optional labels (N,), on the CPU or an accelerator. A batch is gathered by
    index in one tensor operation and stays uint8 (a quarter of float32's bytes to move); see ``to_model_input``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices: list[int]):
        idx = _indices_on(self.images.device, indices)
        return self.images[idx] if self.labels is None else (self.images[idx], self.labels[idx])

    def __getitem__(self, index: int):
        batch = self.__getitems__([index])
        return batch[0] if self.labels is None else (batch[0][0], batch[1][0])


class LabelledStream(IterableDataset):
    """Endless labelled batches ``(x uint8, y)``: consecutive random permutations of all the labelled images, cut
    into batches of ``batch_size``. A batch may span two permutations, so every batch is full and every image is
    drawn equally often. The stream goes on across epochs (each epoch's iterator continues it); its own generator,
    seeded by the data seed and the rank, orders it. Never sharded: under DDP every rank draws from the whole
    labelled subset. Iterate it in the main process only (``num_workers=0``): workers would copy the stream."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int) -> None:
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._pending = torch.empty(0, dtype=torch.int64)  # the rest of the current permutation

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            while len(self._pending) < self.batch_size:
                self._pending = torch.cat([self._pending, torch.randperm(len(self.images), generator=self.generator)])
            idx, self._pending = self._pending[: self.batch_size], self._pending[self.batch_size :]
            idx = _indices_on(self.images.device, idx)
            yield self.images[idx], self.labels[idx]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state(), "pending": self._pending.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
        self._pending = state["pending"].clone()


class EpochShuffle(RandomSampler):
    """A shuffle that depends on (seed, epoch) alone (Lightning calls ``set_epoch`` before each epoch), so that a run
    resumed at an epoch boundary sees the order the uninterrupted run saw. Under DDP Lightning replaces it by a
    ``DistributedSampler``, seeded the same way (``seed_everything`` + epoch)."""

    def __init__(self, data_source, seed: int) -> None:
        super().__init__(data_source)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        return super().__iter__()


def binarize_once(images: torch.Tensor, seed: int) -> torch.Tensor:
    """One fixed Bernoulli sample of uint8 images, as uint8 in {0, 255}."""
    generator = torch.Generator().manual_seed(seed)
    return torch.bernoulli(images.float() / 255.0, generator=generator).to(torch.uint8) * 255


class SemiSupervisedDataModule(pl.LightningDataModule):
    """A class-balanced labelled subset, chosen by ``seed``, beside the unlabelled training images.

    Args:
        dataset: ``mnist``, ``fashion_mnist`` or ``kmnist``.
        data_dir: root of torchvision's layout, ``<data_dir>/<Name>/raw``.
        num_labelled: labelled training images, the same number of each class (100 means 10 per class).
        val_size: training images held out for validation (the paper holds out 10,000 of MNIST's 60,000).
        seed: fixes the validation split and the labelled subset, independently of the global seed.
        batch_size: unlabelled images per training batch.
        labelled_batch_size: labelled images per training batch (at most ``num_labelled``).
        eval_batch_size: images per validation, test and predict batch.
        binarize: ``dynamic`` (a fresh sample each time an image is drawn), ``static`` (one fixed sample)
            or ``none`` (grey levels in [0, 1]). Evaluation always uses one fixed sample when binarising.
        unlabelled: ``all`` training images (the paper's choice, labelled ones included) or the ``rest``.
        num_workers: worker processes of the unlabelled DataLoader (0: the main process, the fast path).
        device: where the images are held: ``auto`` on the training accelerator when it is a GPU and
            ``num_workers`` is 0 (no copies from the host at all), else in host memory; ``cpu`` always in host memory.
        download: whether to try torchvision's download before the offline sources.
        check_md5: verify the raw files against the official md5 sums.
        predict_dir: a folder of images to predict (recursively; png, jpg, bmp, ...; any size or colour) instead
            of the test set. Each becomes a test image's like: grey, in MNIST's polarity (see ``invert``), padded
            to a square and resized to ``input_shape``, then binarised once with a fixed seed unless ``binarize``
            is ``none``.
        invert: polarity of the ``predict_dir`` images: ``auto`` inverts an image whose border is brighter than
            mid-grey (a dark digit on light paper) into MNIST's light digit on black; ``true`` inverts them all,
            ``false`` none.
        on_error: a ``predict_dir`` image that cannot be read: ``fail`` stops with an error naming it, before
            anything is predicted; ``skip`` leaves it out with a warning naming it and predicts the others.
    """

    def __init__(
        self,
        dataset: str = "mnist",
        data_dir: str = "data",
        num_labelled: int = 100,
        val_size: int = 10000,
        seed: int = 0,
        batch_size: int = 100,
        labelled_batch_size: int = 100,
        eval_batch_size: int = 1000,
        binarize: Binarize = "dynamic",
        unlabelled: Literal["all", "rest"] = "all",
        num_workers: int = 0,
        device: Literal["auto", "cpu"] = "auto",
        download: bool = True,
        check_md5: bool = True,
        predict_dir: str | None = None,
        invert: Invert = "auto",
        on_error: OnError = "fail",
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ConfigError(f"data.dataset={dataset!r} is not known; choose one of {sorted(DATASETS)}.")
        self.info = DATASETS[dataset]
        check_label_budget(num_labelled, self.info.num_classes)
        if not 0 <= val_size < self.info.num_train:
            raise ConfigError(
                f"data.val_size={val_size} is out of range; it must be between 0 and {self.info.num_train - 1} "
                f"(the {dataset} training set holds {self.info.num_train} images)."
            )
        if num_labelled > self.info.num_train - val_size:
            raise ConfigError(
                f"data.num_labelled={num_labelled} exceeds the {self.info.num_train - val_size} training images "
                f"left after data.val_size={val_size}; lower one of them."
            )
        if unlabelled == "rest" and num_labelled == self.info.num_train - val_size:
            raise ConfigError(
                f"data.unlabelled='rest' with data.num_labelled={num_labelled} leaves no unlabelled images; "
                "lower data.num_labelled or use data.unlabelled='all'."
            )
        for field, value in [("batch_size", batch_size), ("labelled_batch_size", labelled_batch_size),
                             ("eval_batch_size", eval_batch_size)]:
            if value <= 0:
                raise ConfigError(f"data.{field} must be positive, got {value}.")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {num_workers}.")
        if invert not in (True, False, "auto"):
            raise ConfigError(f"data.invert must be auto, true or false, got {invert!r}.")
        if on_error not in ("skip", "fail"):
            raise ConfigError(f"data.on_error must be skip or fail, got {on_error!r}.")
        self.save_hyperparameters()
        self.split: Split | None = None
        self._train_images = self._train_labels = self._test_images = self._test_labels = None
        self._predict_images = self._predict_labels = None
        self.predict_files: list[str] | None = None  # predict_dir's images, relative to it; None: the test set
        # training order, kept in checkpoints (state_dict) so that a resumed run continues it exactly
        self._labelled_stream: LabelledStream | None = None
        self._shuffle_seed: int | None = None
        self._state_to_load: dict | None = None

    # Numbers the models need; LightningCLI links them into the model's arguments.
    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.info.image_shape)

    @property
    def num_train(self) -> int:
        """Training images after the validation hold-out (labelled ones included)."""
        if self.split is not None:
            return len(self.split.train)
        return self.info.num_train - self.hparams.val_size

    @property
    def num_unlabelled(self) -> int:
        hp = self.hparams
        return self.num_train - (hp.num_labelled if hp.unlabelled == "rest" else 0)

    def prepare_data(self) -> None:
        if self._predicting_folder():  # the dataset's files are not needed to predict a folder of images
            return
        ensure_raw_files(
            self.hparams.dataset, self.hparams.data_dir, download=self.hparams.download, check_md5=self.hparams.check_md5
        )

    def _predicting_folder(self) -> bool:
        return self.hparams.predict_dir is not None and self.trainer is not None and self.trainer.predicting

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            self._setup_predict()
            return
        if self.split is not None:
            self._hold_on(self._holding_device())
            return
        hp = self.hparams
        load = dict(download=hp.download, check_md5=hp.check_md5)
        train_images, self._train_labels = load_split(hp.dataset, hp.data_dir, train=True, **load)
        test_images, self._test_labels = load_split(hp.dataset, hp.data_dir, train=False, **load)
        self.split = make_split(self._train_labels, hp.num_labelled, self.num_classes, hp.val_size, hp.seed)
        if hp.binarize == "static":
            train_images = binarize_once(train_images, hp.seed)
        self._eval_train_images = self._fixed_sample(train_images, seed_offset=1)
        self._train_images, self._test_images = train_images, self._fixed_sample(test_images, seed_offset=2)
        if self.num_unlabelled < hp.batch_size:
            raise ConfigError(
                f"data.batch_size={hp.batch_size} exceeds the {self.num_unlabelled} unlabelled training images, so "
                "an epoch would hold no batch; lower data.batch_size."
            )
        self._record_split()
        self._hold_on(self._holding_device())

    def _fixed_sample(self, images: torch.Tensor, seed_offset: int) -> torch.Tensor:
        """Evaluation's images: one fixed Bernoulli sample when binarising, so its metrics do not jitter."""
        if self.hparams.binarize == "none":
            return images
        return binarize_once(images, self.hparams.seed + seed_offset)

    def _setup_predict(self) -> None:
        """The images to predict, read once: ``predict_dir``'s, or the test set (as ``setup("test")`` has it),
        without the training images, which predicting does not need."""
        hp = self.hparams
        if self._predict_images is None:
            if hp.predict_dir is not None:
                images, self.predict_files = load_image_folder(hp.predict_dir, self.input_shape, hp.invert,
                                                               hp.on_error)
                self._predict_images = self._fixed_sample(images, seed_offset=2)  # as the test set
            elif self._test_images is not None:  # already set up to fit or test
                self._predict_images, self._predict_labels = self._test_images, self._test_labels
            else:
                images, self._predict_labels = load_split(hp.dataset, hp.data_dir, train=False,
                                                          download=hp.download, check_md5=hp.check_md5)
                self._predict_images = self._fixed_sample(images, seed_offset=2)
        device = self._holding_device()
        self._predict_images = self._predict_images.to(device)
        if self._predict_labels is not None:
            self._predict_labels = self._predict_labels.to(device)

    def _holding_device(self) -> torch.device:
        cpu = torch.device("cpu")
        if self.hparams.device == "cpu" or self.hparams.num_workers > 0 or self.trainer is None:
            return cpu
        root = self.trainer.strategy.root_device
        return root if root.type == "cuda" else cpu

    def _hold_on(self, device: torch.device) -> None:
        """Move the uint8 images and the labels to ``device`` (a no-op where they are); the split stays on the CPU."""
        for name in ("_train_images", "_train_labels", "_eval_train_images", "_test_images", "_test_labels"):
            setattr(self, name, getattr(self, name).to(device))

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """On the training device: uint8 -> floats in [0, 1]; training batches (dicts) binarised afresh when
        ``binarize`` is ``dynamic``."""
        return to_model_input(batch, dynamic=self.hparams.binarize == "dynamic" and isinstance(batch, dict))

    def _record_split(self) -> None:
        """Write the labelled indices (into the official training set) into the run's log folder, from rank 0.
        ``trainer.log_dir`` is a collective under DDP (it broadcasts rank 0's folder), so every rank asks for it."""
        if self.trainer is None or self.trainer.logger is None:
            return
        log_dir = self.trainer.log_dir
        if log_dir is not None:
            self._write_split(Path(log_dir))

    @rank_zero_only
    def _write_split(self, log_dir: Path) -> None:
        hp, split = self.hparams, self.split
        path = log_dir / LABELLED_INDICES_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "dataset": hp.dataset,
            "seed": hp.seed,
            "num_labelled": hp.num_labelled,
            "val_size": hp.val_size,
            "labelled_indices": split.labelled.tolist(),
            "labelled_labels": self._train_labels[split.labelled].tolist(),
            "val_indices": split.val.tolist(),
        }
        text = json.dumps(record)
        if path.is_file():  # a resumed run finds its own record; another run's is never overwritten
            if path.read_text() == text:
                return
            raise ConfigError(
                f"the run folder {log_dir.resolve()} already holds a run with another labelled subset ({path.name} "
                "differs); pick a new "
                "folder with --trainer.logger.init_args.version <name>."
            )
        path.write_text(text)
        log.info("labelled indices written to %s", path)

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool = False) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                          collate_fn=_batch_as_is, num_workers=workers, persistent_workers=workers > 0)

    def labelled_dataset(self) -> InMemoryImages:
        idx = self.split.labelled
        return InMemoryImages(self._train_images[idx], self._train_labels[idx])

    def unlabelled_dataset(self) -> InMemoryImages:
        idx = self.split.train
        if self.hparams.unlabelled == "rest":
            idx = idx[~torch.isin(idx, self.split.labelled)]
        return InMemoryImages(self._train_images[idx])

    def labelled_stream(self, rank: int = 0) -> LabelledStream:
        """The labelled half of the training batches, for the process of global rank ``rank``."""
        hp, labelled = self.hparams, self.labelled_dataset()
        seed = 1_000_003 * (hp.seed + 1) + rank  # the data seed and the rank; independent of the global seed
        return LabelledStream(labelled.images, labelled.labels, min(hp.labelled_batch_size, hp.num_labelled), seed)

    def train_dataloader(self) -> CombinedLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        self._labelled_stream = self.labelled_stream(rank)
        if self._shuffle_seed is None:  # the run's seed (seed_everything); without one, a random one
            seed = os.environ.get("PL_GLOBAL_SEED")
            self._shuffle_seed = int(seed) if seed is not None else int(torch.randint(2**62, ()).item())
        state, self._state_to_load = self._state_to_load, None
        if state is not None:
            self._shuffle_seed = int(state.get("shuffle_seed", self._shuffle_seed))
            if "labelled_stream" in state and rank == state.get("rank", 0):  # rank 0's saved stream is its own
                self._labelled_stream.load_state_dict(state["labelled_stream"])
        # own generators: a DataLoader's iterator otherwise draws its base seed from torch's global generator
        labelled = DataLoader(self._labelled_stream, batch_size=None, collate_fn=_batch_as_is,
                              generator=torch.Generator().manual_seed(self._shuffle_seed))
        workers = self.hparams.num_workers
        dataset = self.unlabelled_dataset()
        unlabelled = DataLoader(dataset, batch_size=self.hparams.batch_size, drop_last=True,
                                sampler=EpochShuffle(dataset, self._shuffle_seed),
                                generator=torch.Generator().manual_seed(self._shuffle_seed + 1),
                                collate_fn=_batch_as_is, num_workers=workers, persistent_workers=workers > 0)
        return CombinedLoader({"labelled": labelled, "unlabelled": unlabelled}, mode="min_size")

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: where the labelled stream stands and the shuffle's seed."""
        if self._labelled_stream is None:
            return {}
        rank = self.trainer.global_rank if self.trainer is not None else 0
        return {"labelled_stream": self._labelled_stream.state_dict(), "shuffle_seed": self._shuffle_seed,
                "rank": rank}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restored before the training loader exists: applied when ``train_dataloader`` builds it."""
        self._state_to_load = dict(state_dict) if state_dict else None

    def val_dataloader(self) -> DataLoader | list:
        if self.hparams.val_size == 0:
            return []
        idx = self.split.val
        return self._loader(InMemoryImages(self._eval_train_images[idx], self._train_labels[idx]),
                            self.hparams.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(InMemoryImages(self._test_images, self._test_labels), self.hparams.eval_batch_size,
                            shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        if self._predict_images is None:  # set up for another stage only
            self._setup_predict()
        return self._loader(InMemoryImages(self._predict_images, self._predict_labels), self.hparams.eval_batch_size,
                            shuffle=False)
