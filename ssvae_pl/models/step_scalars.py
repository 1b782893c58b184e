"""Training scalars at a fraction of the cost of ``self.log`` at every step.

Lightning's ``self.log(..., on_step=True, on_epoch=True)`` costs Python time per call and per step
(docs/why-cpu-kernels.md). ``StepScalars`` adds a step's scalars to running sums on the device (one
stack and one add, no host synchronisation) and hands them to ``self.log`` only when they are written: the step's
values as ``<name>_step`` every ``trainer.log_every_n_steps`` steps, and the epoch's means over its steps as
``<name>_epoch`` at the end of the training epoch (averaged over processes): the names and the cadence that
Lightning's own on_step/on_epoch logging writes to TensorBoard.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch


class StepScalars:
    """Running sums of a module's training scalars; ``add`` at every step, ``log_epoch`` at the epoch's end."""

    def __init__(self, progress_bar: str = "train/loss") -> None:
        self.progress_bar = progress_bar  # shown in the progress bar at each write
        self.names: list[str] = []
        self.sums: torch.Tensor | None = None
        self.steps = 0

    def add(self, module: pl.LightningModule, scalars: dict[str, torch.Tensor],
            step_only: dict[str, float] | None = None) -> None:
        """One step's scalars (each a tensor; its mean is taken), logged as ``<name>_step`` when written; and
        ``step_only`` values (a schedule's weight, a number on the host) logged under their own names then, with no
        epoch mean: what ``self.log(name, value, on_step=True, on_epoch=False)`` writes, at the same cadence."""
        values = torch.stack([value.detach().float().mean() for value in scalars.values()])
        if list(scalars) != self.names:
            self.names, self.sums, self.steps = list(scalars), None, 0
        self.sums = values if self.sums is None else self.sums + values
        self.steps += 1
        try:
            trainer = module.trainer
        except RuntimeError:  # a step called outside a Trainer: nothing to log to
            return
        every = trainer.log_every_n_steps
        if every > 0 and (trainer.global_step + 1) % every == 0:  # Lightning's own cadence for on_step values
            for name, value in zip(self.names, values):
                module.log(f"{name}_step", value, on_step=True, on_epoch=False,
                           prog_bar=name == self.progress_bar)
            for name, number in (step_only or {}).items():
                module.log(name, number, on_step=True, on_epoch=False)

    def log_epoch(self, module: pl.LightningModule) -> None:
        """The means over the epoch's steps as ``<name>_epoch`` (averaged over processes), then a fresh start."""
        if self.sums is not None:
            means = self.sums / self.steps
            for name, mean in zip(self.names, means):
                module.log(f"{name}_epoch", mean, on_step=False, on_epoch=True, sync_dist=True)
        self.sums, self.steps = None, 0
