"""``EMAWeights``: an exponential moving average of the weights, used by validation, test and checkpoints."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import WeightAveraging

from ssvae_pl.errors import ConfigError


class EMAWeights(WeightAveraging):
    """An exponential moving average of the trainable weights (Polyak averaging, Lightning's ``WeightAveraging``):
    w_avg <- decay * w_avg + (1 - decay) * w after every training step. Validation, testing and every checkpoint's
    ``state_dict`` use the average; the current weights are checkpointed too, so a resumed fit continues both.
    Buffers are not averaged (no batch statistics), nor are frozen weights (e.g. M1's encoder in M1+M2): they never
    change. ``every_n_steps`` = n updates once every n steps with the decay of n steps, w_avg <- decay^n * w_avg +
    (1 - decay^n) * w, close to n single updates while n is small against the horizon 1 / (1 - decay); the average
    catches up on the skipped steps before every validation, checkpoint and the end of training. ``ConfigError``
    unless 0 < ``decay`` < 1 and ``every_n_steps`` >= 1."""

    def __init__(self, decay: float = 0.999, every_n_steps: int = 1) -> None:
        if not 0 < decay < 1:
            raise ConfigError(f"EMAWeights.decay must be between 0 and 1, got {decay}.")
        if every_n_steps < 1:
            raise ConfigError(f"EMAWeights.every_n_steps must be a positive number of steps, got {every_n_steps}.")
        super().__init__(multi_avg_fn=self._update, use_buffers=False)
        self.decay, self.every_n_steps = decay, every_n_steps
        self._frozen: set[int] = set()  # data_ptr of the frozen weights, where the training runs
        self._steps = 1  # training steps since the last update: the exponent of the next one's decay

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._frozen = {p.data_ptr() for p in pl_module.parameters() if not p.requires_grad}

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and (step_idx + 1) % self.every_n_steps == 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.should_update(step_idx=trainer.global_step - 1):
            self._catch_up(trainer, pl_module)

    def _catch_up(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Average in the steps since the last update, if any: every ``every_n_steps``-th step, and the remainder
        before a validation, a checkpoint and the end of training."""
        if self._average_model is not None and trainer.global_step > self._latest_update_step:
            self._steps = trainer.global_step - self._latest_update_step
            self._average_model.update_parameters(pl_module)
            self._latest_update_step = trainer.global_step

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._catch_up(trainer, pl_module)
        super().on_validation_epoch_start(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._catch_up(trainer, pl_module)  # a no-op during a validation: it caught up at its start
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._catch_up(trainer, pl_module)
        super().on_train_end(trainer, pl_module)

    @torch.no_grad()
    def _update(self, averaged: list[torch.Tensor], current: list[torch.Tensor], _num_averaged) -> None:
        pairs = [(a, c) for a, c in zip(averaged, current) if c.data_ptr() not in self._frozen]
        if pairs:
            torch._foreach_lerp_([a for a, _ in pairs], [c for _, c in pairs], 1 - self.decay ** self._steps)
