"""Batches from images held in memory: the datasets and samplers of ``SemiSupervisedDataModule`` and the
conversion of uint8 images to the models' inputs (floats in [0, 1], binarised afresh or once)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch.utils.data import Dataset, IterableDataset, RandomSampler

from ssvae_pl.data.image_folder import FolderImages


def _batch_as_is(batch):
    """``collate_fn`` for datasets whose ``__getitems__`` (or iterator) already returns a whole batch."""
    return batch


def binarize(x: torch.Tensor) -> torch.Tensor:
    """A Bernoulli sample of x in [0, 1], elementwise, as floats: 1 where a uniform draw u in [0, 1) is below x.
    The same law as ``torch.bernoulli(x)``, whose CPU kernel is slower (docs/why-cpu-kernels.md)."""
    return (torch.rand_like(x) < x).to(x.dtype)


def to_model_input(batch: Any, dynamic: bool = False) -> Any:
    """uint8 images anywhere in ``batch`` -> float32 in [0, 1], on the device they are on; with ``dynamic`` each is
    replaced by a fresh Bernoulli sample of itself (the paper's dynamic binarisation). Labels pass through."""

    def convert(images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0)
        return binarize(x) if dynamic else x

    return apply_to_collection(batch, torch.Tensor, lambda t: convert(t) if t.dtype == torch.uint8 else t)


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device``: the GPU's, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # MemAvailable counts the page cache the kernel would give up
        line = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


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
        images = self.images[idx]
        if isinstance(images, FolderImages):  # left on disk: decoded now (in a worker, when there are some)
            images = images.load()
        return images if self.labels is None else (images, self.labels[idx])

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
