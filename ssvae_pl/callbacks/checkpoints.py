"""Checkpoints: ``LastCheckpoint`` (``last.ckpt`` after every epoch, never over another fit's checkpoints) and
``BestCheckpoint`` (``best-epochNNN.ckpt`` by the model's declared monitor); ``run_folder``, where they go."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from ssvae_pl.errors import ConfigError
from ssvae_pl.models.declares import AsksModel, check_declared, metrics_of, monitor_of


def run_folder(trainer: pl.Trainer) -> Path | None:
    """The run's folder (``trainer.log_dir``), or None without a logger. Under DDP this is a collective (rank 0's
    folder is broadcast): call it on every rank, never inside an ``is_global_zero`` branch."""
    if trainer.logger is None:
        return None
    log_dir = trainer.log_dir
    return Path(log_dir) if log_dir else None


class RunCheckpoint(ModelCheckpoint):
    """A checkpoint callback of the run folder, restored whatever working folder a resume starts from: Lightning
    compares the saved ``dirpath`` with its own as text, and would otherwise forget the best score so far. The
    folder the checkpoint recorded is kept (``restored_dirpath``)."""

    restored_dirpath: str | None = None

    def load_state_dict(self, state_dict: dict) -> None:
        self.restored_dirpath = saved = state_dict.get("dirpath")
        if saved and self.dirpath and saved != self.dirpath and Path(saved).resolve() == Path(self.dirpath).resolve():
            state_dict = {**state_dict, "dirpath": self.dirpath}
        super().load_state_dict(state_dict)


class LastCheckpoint(RunCheckpoint):
    """``checkpoints/last.ckpt`` after every training epoch (and SIGTERM's mid-epoch state, ``SaveOnInterrupt``):
    the one file that is "the last checkpoint". Always the same name, replaced in place (no ``last-v1.ckpt``);
    ``--ckpt_path last`` resumes from it; ``BestCheckpoint`` keeps the best by validation."""

    def __init__(self) -> None:
        super().__init__(filename="last", save_top_k=1, monitor=None, enable_version_counter=False)

    @property
    def state_key(self) -> str:
        return "LastCheckpoint"

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A fit never replaces another fit's checkpoints: a checkpoint folder that already holds some is written
        to only by a fit resumed from that folder's run (``--ckpt_path`` there, or a checkpoint recording it)."""
        taken = None
        if trainer.is_global_zero and self.dirpath is not None and not trainer.fast_dev_run:
            folder = Path(self.dirpath).resolve()
            existing = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
            ckpt = trainer.ckpt_path
            ours = ckpt is not None and "://" not in str(ckpt) and (
                Path(ckpt).resolve().parent == folder
                or (self.restored_dirpath is not None and Path(self.restored_dirpath).resolve() == folder))
            taken = str(existing[-1]) if existing and not ours else None
        taken = trainer.strategy.broadcast(taken, 0)
        if taken:
            raise ConfigError(f"{taken} belongs to another fit, and this one would replace it: resume that run with "
                              f"--ckpt_path {taken}, or give this one a folder of its own (a new "
                              "--trainer.logger.init_args.version, or --trainer.default_root_dir).")

    @property
    def last_path(self) -> str | None:
        return None if self.dirpath is None else str(Path(self.dirpath) / f"last{self.FILE_EXTENSION}")


class BestCheckpoint(AsksModel, RunCheckpoint):
    """``checkpoints/best-epochNNN.ckpt``: the best epoch by the metric the model declares (``monitor()``:
    ``val/elbo`` for the VAE, ``val/acc`` for the classifiers), read when fitting starts, so one callback serves
    every model; none for a model that declares no monitor. ``monitor`` (with ``mode``) names another of the
    model's declared metrics (``metrics()``)."""

    def __init__(self, monitor: str | None = None, mode: Literal["max", "min"] = "max") -> None:
        super().__init__(monitor="val/acc", mode="max", filename="best-epoch{epoch:03d}", auto_insert_metric_name=False)
        self.asked = None if monitor is None else (monitor, mode)

    @property
    def state_key(self) -> str:
        return "BestCheckpoint"

    def check(self, model: pl.LightningModule) -> None:
        if self.asked is not None:
            check_declared(model, [self.asked[0]], metrics_of(model), "validation metric",
                           "trainer.callbacks.BestCheckpoint.monitor")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.check(pl_module)
        declared = monitor_of(pl_module) if self.asked is None else self.asked
        self.monitor, self.mode = declared if declared is not None else (None, "max")
        self.kth_value = torch.tensor(float("inf") if self.mode == "min" else -float("inf"))
        if declared is None:  # nothing to rank by: no best checkpoint (last.ckpt is written all the same)
            self.save_top_k = 0
        super().setup(trainer, pl_module, stage)


def last_checkpoint_path(trainer: pl.Trainer) -> str | None:
    """Where ``LastCheckpoint`` keeps ``last.ckpt`` (its folder is known after setup)."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, LastCheckpoint):
            return callback.last_path
    return None
