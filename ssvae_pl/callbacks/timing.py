"""What a run shows of its pace and its latents: ``EpochTimer`` (``time/*``), ``LatentProbe`` (``val/knn_acc``, a
k-NN vote on the latents) and ``RunProgressBar`` (Lightning's bar without ``v_num``)."""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar

from ssvae_pl.data.datamodule import SemiSupervisedDataModule, to_model_input
from ssvae_pl.models.declares import pictures_of


class EpochTimer(pl.Callback):
    """Logs, at the end of every training epoch: ``time/epoch_seconds``, the training loop of the epoch (fetching
    batches and the steps); ``time/validation_seconds``, what the fit spent from the start of each validation to the
    next step or the epoch's end (validation, checkpoints, the pictures); ``time/train_samples_per_second``
    (training images per second of the loop, labelled and unlabelled, over all ranks); and
    ``time/elapsed_seconds`` since fitting started."""

    def __init__(self) -> None:
        self._fit_start = self._epoch_start = self._paused = 0.0
        self._validation_start: float | None = None
        self._samples = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(pl_module)
        self._epoch_start, self._paused, self._validation_start, self._samples = time.perf_counter(), 0.0, None, 0

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._sync(pl_module)
            self._validation_start = time.perf_counter()

    def _resume(self, pl_module: pl.LightningModule) -> None:
        if self._validation_start is not None:
            self._sync(pl_module)
            self._paused += time.perf_counter() - self._validation_start
            self._validation_start = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._resume(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._samples += _count_images(batch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resume(pl_module)
        now = time.perf_counter()
        seconds = now - self._epoch_start - self._paused
        rate = self._samples * trainer.world_size / max(seconds, 1e-9)
        pl_module.log_dict({"time/epoch_seconds": seconds, "time/validation_seconds": self._paused,
                            "time/train_samples_per_second": rate, "time/elapsed_seconds": now - self._fit_start},
                           rank_zero_only=True)

    @staticmethod
    def _sync(pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)


class LatentProbe(pl.Callback):
    """A cheap measure of a VAE's latents for the classifiers built on them: ``val/knn_acc``, the accuracy of the
    k-nearest-neighbour vote (Euclidean, on the posterior means) of the labelled training images for each validation
    image, logged after every validation of a fit. It votes with the posterior means that the model's
    ``validation_step`` returns (``z_mean``), without a second pass of the encoder over the validation images, and
    adds up the ranks' counts. Other models, and data without labelled images, are skipped."""

    def __init__(self, k: int = 5) -> None:
        self.k = k
        self.reference: tuple[torch.Tensor, torch.Tensor] | None = None  # the labelled images' means and labels
        self.counts: torch.Tensor | None = None  # correct votes, validation images

    def _active(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        return "knn_probe" in pictures_of(pl_module) and not trainer.sanity_checking and trainer.state.fn == "fit" \
            and isinstance(trainer.datamodule, SemiSupervisedDataModule)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.reference, self.counts = None, torch.zeros(2, dtype=torch.long, device=pl_module.device)

    @torch.no_grad()
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        if not self._active(trainer, pl_module) or not isinstance(outputs, dict) or "z_mean" not in outputs:
            return
        if self.reference is None:  # the weights validated (an average's, where one is swapped in)
            labelled = trainer.datamodule.labelled_dataset()
            if labelled.labels is None or len(labelled) < self.k:
                return
            means = pl_module.latent_means(to_model_input(labelled.images.to(pl_module.device))).float()
            self.reference = means, labelled.labels.to(pl_module.device)
        means, labels = self.reference
        nearest = torch.cdist(outputs["z_mean"].float(), means).topk(self.k, largest=False).indices  # (B, k)
        votes = torch.nn.functional.one_hot(labels[nearest], pl_module.hparams.num_classes).sum(dim=1)
        y = batch[1].to(pl_module.device)
        self.counts += torch.stack([(votes.argmax(dim=1) == y).sum(), torch.tensor(len(y), device=y.device)])

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active(trainer, pl_module) or self.reference is None:
            return
        correct, total = trainer.strategy.reduce(self.counts, reduce_op="sum").tolist()  # every rank's share
        if total:
            pl_module.log("val/knn_acc", correct / total)


def _count_images(batch) -> int:
    if isinstance(batch, dict):  # {"labelled": (x, y), "unlabelled": x}
        return sum(_count_images(part) for part in batch.values())
    if isinstance(batch, (tuple, list)):
        return len(batch[0])
    return len(batch)


class RunProgressBar(TQDMProgressBar):
    """Lightning's progress bar without ``v_num``, the last four characters of the run's version (``on_0`` for
    ``version_0``): the run's folder is named when it starts."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items
