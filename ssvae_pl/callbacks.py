"""Callbacks the configs add: ``EpochTimer`` logs how fast training runs."""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch


class EpochTimer(pl.Callback):
    """Logs ``time/epoch_seconds`` (the training loop of an epoch, validation excluded) and
    ``time/train_samples_per_second`` (training images per second, labelled and unlabelled, over all ranks), and
    ``time/elapsed_seconds`` since fitting started, at the end of every training epoch."""

    def __init__(self) -> None:
        self._fit_start = self._epoch_start = 0.0
        self._samples = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(pl_module)
        self._epoch_start, self._samples = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._samples += _count_images(batch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(pl_module)
        now = time.perf_counter()
        seconds = now - self._epoch_start
        rate = self._samples * trainer.world_size / max(seconds, 1e-9)
        pl_module.log_dict({"time/epoch_seconds": seconds, "time/train_samples_per_second": rate,
                            "time/elapsed_seconds": now - self._fit_start}, rank_zero_only=True)

    @staticmethod
    def _sync(pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)


def _count_images(batch) -> int:
    if isinstance(batch, dict):  # {"labelled": (x, y), "unlabelled": x}
        return sum(_count_images(part) for part in batch.values())
    if isinstance(batch, (tuple, list)):
        return len(batch[0])
    return len(batch)
