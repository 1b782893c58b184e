"""``SemiSupervisedDataModule``: mixed labelled/unlabelled training batches from images held in memory.

A training batch is ``{"labelled": (x, y), "unlabelled": x}``: an epoch is one pass over the unlabelled images
(sharded across ranks under DDP), each step zipped (``CombinedLoader``, ``min_size``) with the next batch of an
endless ``LabelledStream`` that every rank draws from whole. Validation and test batches are ``(x, y)``; predict
batches the test set's, or the images of the user's ``predict_dir`` (named in ``predict_files``).
The images come from an ``ImageSource`` (``sources/``, or ``image_folder.ImageFolder``) and stay uint8, on the
host or the GPU; ``on_after_batch_transfer`` makes them floats in [0, 1] (binarised afresh under ``dynamic``) on
the training device, as ``to_model_input`` does outside a Trainer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import CombinedLoader
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, Dataset

from ssvae_pl.data.batches import EpochShuffle, InMemoryImages, LabelledStream, _batch_as_is, binarize_once, to_model_input
from ssvae_pl.data.image_folder import FolderImages, load_image_folder
from ssvae_pl.data.labelled import Split, make_split, write_split_record
from ssvae_pl.data.preprocess import Invert, Preprocessing, Resize, preprocessing_of
from ssvae_pl.data.sources import ImageSource, named
from ssvae_pl.data.sources.base import OnError
from ssvae_pl.errors import ConfigError

Binarize = Literal["dynamic", "static", "none"]
LABELLED_INDICES_FILE = "labelled_indices.json"


class SemiSupervisedDataModule(pl.LightningDataModule):
    """A class-balanced labelled subset, chosen by ``seed``, beside the unlabelled training images.

    The defaults are configs/mnist/m2.yaml's data (the shipped M2 recipe); the M1 configs set ``batch_size`` and
    ``binarize: dynamic`` of their own. ``model_kwargs()`` hands the data's shapes and classes to a model.

    Args:
        dataset: a named dataset, ``mnist``, ``fashion_mnist``, ``kmnist``, ``svhn`` or ``cifar10``, or an
            ``ImageSource`` (by class path in a config): ``ssvae_pl.data.ImageFolder`` for your own images.
        data_dir: a named dataset's root in torchvision's layout (``<data_dir>/MNIST/raw``, ``<data_dir>/SVHN``,
            ``<data_dir>/cifar-10-batches-py``).
        num_labelled: labelled training images, the same number of each class (100 means 10 per class).
            ``null``: every labelled image left after the validation hold-out (not class-balanced; the
            usual choice for an ``ImageFolder``, whose labelled images are all the labels there are).
        val_size: labelled training images held out for validation (the paper holds out 10,000 of MNIST's
            60,000); an ``ImageFolder`` takes them from its ``labelled_dir``.
        seed: fixes the validation split and the labelled subset, independently of the global seed.
        batch_size: unlabelled images per training batch (the default 200: configs/mnist/m2.yaml's).
        labelled_batch_size: labelled images per training batch (at most ``num_labelled``).
        eval_batch_size: images per validation, test and predict batch.
        binarize: ``none`` (the default: grey levels in [0, 1], M2's Bernoulli targets in configs/mnist/m2.yaml),
            ``dynamic`` (a fresh sample each time an image is drawn; the paper's, and the M1 configs')
            or ``static`` (one fixed sample). Evaluation always uses one fixed sample when binarising.
        unlabelled: ``all`` training images (the paper's choice, labelled ones included) or the ``rest``.
        num_workers: worker processes of the unlabelled DataLoader (0: the main process, the fast path).
        device: where the images are held: ``auto`` on the training accelerator when it is a GPU and
            ``num_workers`` is 0 (no copies from the host at all), else in host memory; ``cpu`` always in host memory.
        download: whether to try torchvision's download before the offline sources.
        check_md5: verify the raw files against the official md5 sums.
        predict_dir: a folder of images to predict (recursively; png, jpg, bmp, ...; any size or colour) instead
            of the test set. Each becomes an input as ``preprocessing()`` says (grey, in MNIST's polarity: see
            ``invert``; padded to a square and resized to ``input_shape``), not binarised, as ``ssvae export``
            records it.
        invert: polarity of the ``predict_dir`` images: ``auto`` inverts an image whose border is brighter than
            mid-grey (a dark digit on light paper) into MNIST's light digit on black; ``true`` inverts them all,
            ``false`` none.
        on_error: a file of ``predict_dir`` or of an ``ImageFolder``'s folders that cannot be read (or is not an
            image): ``fail`` stops with an error listing them, before anything trains or is predicted; ``skip``
            leaves them out with a warning listing them.
        resize: how an image of another aspect ratio is fitted: ``pad`` (with its border's colour; digits, the
            default for the MNIST-like datasets' ``predict_dir``), ``crop`` (the centre; photos), ``stretch``, or
            ``content`` (cropped to the content's box, squared with MNIST's margin, then padded: a digit on a wide
            page).
        labelled_indices: a JSON file naming the labelled training images by index into the pool, in place of the
            seeded class-balanced pick: a list, or a record such as a run's ``labelled_indices.json`` (the labels
            ``ssvae suggest`` asked for, once known). ``num_labelled`` must be their number; ``seed`` still fixes
            the validation hold-out, which they must stay out of.
    """

    def __init__(
        self,
        dataset: str | ImageSource = "mnist",
        data_dir: str = "data",
        num_labelled: int = 100,
        val_size: int = 10000,
        seed: int = 0,
        batch_size: int = 200,
        labelled_batch_size: int = 100,
        eval_batch_size: int = 1000,
        binarize: Binarize = "none",
        unlabelled: Literal["all", "rest"] = "all",
        num_workers: int = 0,
        device: Literal["auto", "cpu"] = "auto",
        download: bool = True,
        check_md5: bool = True,
        predict_dir: str | None = None,
        invert: Invert = "auto",
        on_error: OnError = "fail",
        resize: Resize = "pad",
        labelled_indices: str | None = None,
    ) -> None:
        super().__init__()
        self.source = named(dataset, data_dir, download, check_md5) if isinstance(dataset, str) else dataset
        balance = {} if labelled_indices is None else {"balanced": False}  # a named subset need not be balanced
        self.source.check(num_labelled, val_size, unlabelled, **balance)
        if resize not in ("pad", "crop", "stretch", "content"):
            raise ConfigError(f"data.resize must be pad, crop, stretch or content, got {resize!r}.")
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
        self.save_hyperparameters(ignore=["dataset"])
        self.hparams["dataset"] = self.source.config()  # a name, or {class_path, init_args}: what checkpoints keep
        self.split: Split | None = None
        self.pool_files: list[str] | None = None  # image_folder: each training image's path, in the pool's order
        self._train_images = self._train_labels = self._test_images = self._test_labels = None
        self._train_features: torch.Tensor | None = None  # use_training_features, for one fit
        self._feature_row: torch.Tensor | None = None  # image index -> row of _train_features
        self._val_images = self._val_labels = None
        self._predict_images = self._predict_labels = None
        self.predict_files: list[str] | None = None  # predict_dir's images, relative to it; None: the test set
        # training order, kept in checkpoints (state_dict) so that a resumed run continues it exactly
        self._labelled_stream: LabelledStream | None = None
        self._shuffle_seed: int | None = None
        self._state_to_load: dict | None = None

    # Numbers the models need; LightningCLI links them into the model's arguments.
    @property
    def num_classes(self) -> int:
        return len(self.source.class_names)

    @property
    def class_names(self) -> list[str]:
        """The classes' names, in the order of the labels: the dataset's, or the labelled folder's sub-folders."""
        return self.source.class_names

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.source.input_shape

    def model_kwargs(self) -> dict[str, Any]:
        """What a model needs to know of the data, as keyword arguments of ``VAE``, ``LatentClassifier`` and ``M2``
        (the ``ssvae`` command links the same three into ``model.init_args``); known before ``setup``:

        * ``input_shape``: (C, H, W) of the images;
        * ``num_classes``: K;
        * ``class_names``: the classes' names in label order (an image folder's sub-folders), kept in the model's
          checkpoint.

        ``M2(**dm.model_kwargs(), latent_dim=64)``: the other arguments stay the model's own.
        """
        return {"input_shape": self.input_shape, "num_classes": self.num_classes, "class_names": self.class_names}

    def preprocessing(self) -> Preprocessing:
        """How the files of an ``ImageFolder`` and of ``predict_dir`` become inputs (``preprocess.py``)."""
        return preprocessing_of(self.input_shape, self.hparams)

    @property
    def num_train(self) -> int:
        """Training images after the validation hold-out (labelled ones included)."""
        if self.split is not None:
            return len(self.split.train)
        if self.source.num_train is None:
            raise RuntimeError("an image folder's size is known once the data module is set up")
        return self.source.num_train - self.hparams.val_size

    @property
    def num_labelled(self) -> int:
        """Labelled training images: ``num_labelled``, or (``null``) as many as the split holds."""
        if self.split is not None:
            return len(self.split.labelled)
        if self.hparams.num_labelled is None:
            raise RuntimeError("the number of labelled images is known once the data module is set up")
        return self.hparams.num_labelled

    @property
    def num_unlabelled(self) -> int:
        hp = self.hparams
        return self.num_train - (self.num_labelled if hp.unlabelled == "rest" else 0)

    def prepare_data(self) -> None:
        if not self._predicting_folder():  # a folder to predict needs nothing fetched
            self.source.prepare()

    def _predicting_folder(self) -> bool:
        return self.hparams.predict_dir is not None and self.trainer is not None and self.trainer.predicting

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            self._setup_predict()
            return
        if self.split is not None:
            self._hold_on(self.holding_device)
            return
        if stage == "test":  # the test images alone: the training images are not read
            if self._test_images is None:
                self._test_images, self._test_labels = self._read_test_set()
            self._hold_on(self.holding_device)
            return
        hp = self.hparams
        train_images, self._train_labels, self.pool_files = self.source.train_split(self.preprocessing(), hp.on_error)
        self.source.check_labels(self._train_labels, train=True)
        self.split = make_split(self._train_labels, hp.num_labelled, self.num_classes, hp.val_size, hp.seed,
                                self.class_names, hp.labelled_indices)
        if hp.binarize == "static":
            if isinstance(train_images, FolderImages):
                raise ConfigError("data.binarize=static needs the images in memory; use dynamic or none, or "
                                  "data.dataset.in_memory=true.")
            train_images = binarize_once(train_images, hp.seed)
        if isinstance(train_images, FolderImages):  # the validation images alone, read into memory
            self._val_images = self._fixed_sample(train_images[self.split.val].load(), seed_offset=1)
        else:  # one fixed sample of the whole training set, then the hold-out
            self._val_images = self._fixed_sample(train_images, seed_offset=1)[self.split.val]
        self._val_labels = self._train_labels[self.split.val]
        self._train_images = train_images
        if self._test_images is None:
            self._test_images, self._test_labels = self._read_test_set(required=False)
        if self.num_unlabelled < hp.batch_size:
            raise ConfigError(
                f"data.batch_size={hp.batch_size} exceeds the {self.num_unlabelled} unlabelled training images, so "
                "an epoch would hold no batch; lower data.batch_size."
            )
        if len(self.split.labelled) < hp.labelled_batch_size:  # never clamped behind the config's back
            raise ConfigError(
                f"data.labelled_batch_size={hp.labelled_batch_size} exceeds the {len(self.split.labelled)} labelled "
                f"training images; set --data.labelled_batch_size {len(self.split.labelled)} or less."
            )
        self._record_split()
        self._hold_on(self.holding_device)

    def _read_test_set(self, required: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The source's test images, binarised as evaluation's are (``_fixed_sample``); (None, None) where it has
        none, unless ``required``."""
        test = self.source.test_split(self.preprocessing(), self.hparams.on_error)
        if test is None:
            if required:
                self._require_test_set()
            return None, None
        self.source.check_labels(test[1], train=False)
        return self._fixed_sample(test[0], seed_offset=2), test[1]

    def _require_test_set(self) -> None:
        if self._test_images is None:
            raise ConfigError("data.dataset.test_dir is not set: ssvae test (and ssvae predict without "
                              "data.predict_dir) on an image folder needs a folder of labelled test images, one "
                              "sub-folder per class.")

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
                # grey, not binarised: one image's prediction depends on that image alone, as in the exports
                self._predict_images, self.predict_files = load_image_folder(hp.predict_dir, self.preprocessing(),
                                                                             hp.on_error)
            elif self._test_images is not None:  # already set up to fit or test
                self._predict_images, self._predict_labels = self._test_images, self._test_labels
            else:
                self._predict_images, self._predict_labels = self._read_test_set()
        device = self.holding_device
        self._predict_images = self._predict_images.to(device)
        if self._predict_labels is not None:
            self._predict_labels = self._predict_labels.to(device)

    @property
    def holding_device(self) -> torch.device:
        """Where the images (or the features that replace them) are held: an accelerator with ``device: auto``."""
        cpu = torch.device("cpu")
        if self.hparams.device == "cpu" or self.hparams.num_workers > 0 or self.trainer is None \
                or isinstance(self._train_images, FolderImages):
            return cpu
        root = self.trainer.strategy.root_device
        return root if root.type == "cuda" else cpu

    def _hold_on(self, device: torch.device) -> None:
        """Move the uint8 images and the labels to ``device`` (a no-op where they are); the split stays on the CPU."""
        for name in ("_train_images", "_train_labels", "_val_images", "_val_labels", "_test_images", "_test_labels"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """On the training device: uint8 -> floats in [0, 1]; training batches (dicts) binarised afresh when
        ``binarize`` is ``dynamic``."""
        return to_model_input(batch, dynamic=self.hparams.binarize == "dynamic" and isinstance(batch, dict))

    def _record_split(self) -> None:
        """Write the labelled indices (into the official training set) into the run's log folder, from rank 0, when
        fitting (a test logs into its checkpoint's run folder and leaves that run's record alone).
        ``trainer.log_dir`` is a collective under DDP (it broadcasts rank 0's folder), so every rank asks for it."""
        if self.trainer is None or self.trainer.logger is None or self.trainer.state.fn != "fit":
            return
        log_dir = self.trainer.log_dir
        if log_dir is not None:
            self._write_split(Path(log_dir))

    @rank_zero_only
    def _write_split(self, log_dir: Path) -> None:
        hp, split = self.hparams, self.split
        path = log_dir / LABELLED_INDICES_FILE
        record = {
            "dataset": hp.dataset,
            "seed": hp.seed,
            "num_labelled": hp.num_labelled,
            "val_size": hp.val_size,
            "labelled_indices": split.labelled.tolist(),
            "labelled_labels": self._train_labels[split.labelled].tolist(),
            "val_indices": split.val.tolist(),
            "class_names": self.class_names,
            **({"labelled_from": str(hp.labelled_indices)} if hp.labelled_indices is not None else {}),
        }
        if self.pool_files is not None:  # image_folder: the indices are into these files
            record["labelled_files"] = [self.pool_files[i] for i in split.labelled.tolist()]
            record["val_files"] = [self.pool_files[i] for i in split.val.tolist()]
        write_split_record(path, record)

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool = False) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                          collate_fn=_batch_as_is, num_workers=workers, persistent_workers=workers > 0)

    def training_images(self, chunk: int = 1000) -> Iterator[torch.Tensor]:
        """The training split's images (labelled ones included, validation ones never), as floats in [0, 1] on
        ``holding_device``, ``chunk`` at a time, in the order ``use_training_features`` takes their rows."""
        for idx in self._training_split().split(chunk):
            images = self._train_images[idx.to(self._train_images.device)]
            if isinstance(images, FolderImages):
                images = images.load()
            yield to_model_input(images)

    def pool_images(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pool's images at ``idx`` (uint8, on the host) and labels (``UNLABELLED``: none), for ``ssvae suggest``."""
        images = self._train_images[idx.to(self._train_images.device)]
        return (images.load() if isinstance(images, FolderImages) else images).cpu(), self._train_labels[idx].cpu()

    def _training_split(self) -> torch.Tensor:
        return torch.unique(torch.cat([self.split.train, self.split.labelled]))

    @property
    def num_training_images(self) -> int:
        """How many images ``training_images`` yields."""
        return len(self._training_split())

    def use_training_features(self, rows: torch.Tensor) -> None:
        """Train this fit on ``rows`` (one per image of ``training_images``, in its order) in place of the images,
        held on ``holding_device``; dropped when the fit ends. M1+M2 hands its cached posterior of M1 this way."""
        used = self._training_split()
        if len(rows) != len(used):
            raise ValueError(f"use_training_features needs {len(used)} rows, one per training image; got {len(rows)}.")
        self._train_features = rows.to(self.holding_device)
        self._feature_row = torch.full((len(self._train_images),), -1, dtype=torch.long)
        self._feature_row[used] = torch.arange(len(used))

    def teardown(self, stage: str) -> None:
        if stage == "fit":
            self._train_features = self._feature_row = None

    def _training_examples(self, idx: torch.Tensor) -> torch.Tensor | FolderImages:
        """The training examples at ``idx``: the images, or their cached features."""
        if self._train_features is None:
            return self._train_images[idx]
        return self._train_features[self._feature_row[idx].to(self._train_features.device)]

    def labelled_dataset(self) -> InMemoryImages:
        idx = self.split.labelled
        images = self._training_examples(idx)
        if isinstance(images, FolderImages):  # the labelled images are few: held in memory
            images = images.load()
        return InMemoryImages(images, self._train_labels[idx])

    def unlabelled_dataset(self) -> InMemoryImages:
        idx = self.split.train
        if self.hparams.unlabelled == "rest":
            idx = idx[~torch.isin(idx, self.split.labelled)]
        return InMemoryImages(self._training_examples(idx))

    def labelled_stream(self, rank: int = 0) -> LabelledStream:
        """The labelled half of the training batches, for the process of global rank ``rank``."""
        hp, labelled = self.hparams, self.labelled_dataset()
        seed = 1_000_003 * (hp.seed + 1) + rank  # the data seed and the rank; independent of the global seed
        return LabelledStream(labelled.images, labelled.labels, hp.labelled_batch_size, seed)

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
        return self._loader(InMemoryImages(self._val_images, self._val_labels), self.hparams.eval_batch_size,
                            shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self._require_test_set()
        return self._loader(InMemoryImages(self._test_images, self._test_labels), self.hparams.eval_batch_size,
                            shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        if self._predict_images is None:  # set up for another stage only
            self._setup_predict()
        return self._loader(InMemoryImages(self._predict_images, self._predict_labels), self.hparams.eval_batch_size,
                            shuffle=False)
