"""``BudgetAnnealing``: a learning-rate schedule that follows the run's budget, time or epochs, whichever ends it
first, so that a run stopped by ``--trainer.max_time`` ends annealed like one stopped by ``max_epochs``."""

from __future__ import annotations

import math

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Timer

from ssvae_pl.errors import ConfigError


def has_budget(trainer: pl.Trainer) -> bool:
    """Whether the run has a limit for ``budget_progress`` to follow: ``max_time``, ``max_steps`` or ``max_epochs``."""
    timed = any(isinstance(c, Timer) and c.time_remaining() is not None for c in trainer.callbacks)
    return timed or (trainer.max_steps or 0) > 0 or (trainer.max_epochs or 0) > 0


def budget_progress(trainer: pl.Trainer, batch_idx: int = 0) -> float:
    """How far the run is into its budget, in [0, 1]: the largest of elapsed / ``max_time``, global step /
    ``max_steps`` and (epoch + batch / batches) / ``max_epochs`` among the limits that are set; 0 with none."""
    fractions = [0.0]
    for timer in (c for c in trainer.callbacks if isinstance(c, Timer)):
        remaining = timer.time_remaining()
        if remaining is not None:
            elapsed = timer.time_elapsed()
            fractions.append(elapsed / max(elapsed + remaining, 1e-9))
    if trainer.max_steps and trainer.max_steps > 0:
        fractions.append(trainer.global_step / trainer.max_steps)
    batches = trainer.num_training_batches
    if trainer.max_epochs and trainer.max_epochs > 0 and math.isfinite(batches) and batches > 0:
        fractions.append((trainer.current_epoch + batch_idx / batches) / trainer.max_epochs)
    return min(1.0, max(fractions))


class BudgetAnnealing(pl.Callback):
    """Anneals every learning rate to zero along a half cosine over the last ``fraction`` of the run's budget
    (``budget_progress``): rate x (1 + cos(pi u)) / 2, u going from 0 to 1 over that part; the rate is left alone
    before it. The factor multiplies whatever the optimiser's rate is (a scheduler's too) and is kept in the
    checkpoint, so a resumed run picks the schedule up where it stopped. Set before every training step.

    Args:
        fraction: the share of the budget over which the rate falls, in (0, 1].
    """

    def __init__(self, fraction: float = 0.3) -> None:
        if not 0 < fraction <= 1:
            raise ConfigError(f"BudgetAnnealing.fraction must be in (0, 1], got {fraction}: the share of the run's "
                              "budget over which the learning rate falls to zero, e.g. 0.3.")
        self.fraction = fraction
        self.factor = 1.0  # the factor the optimisers' rates carry now

    def state_dict(self) -> dict:
        return {"factor": self.factor}

    def load_state_dict(self, state_dict: dict) -> None:
        self.factor = float(state_dict.get("factor", 1.0))

    def factor_at(self, progress: float) -> float:
        """The rate's factor at ``progress`` into the budget: 1, then a half cosine down to 0."""
        u = (progress - (1 - self.fraction)) / self.fraction
        return 1.0 if u <= 0 else 0.5 * (1 + math.cos(math.pi * min(u, 1.0)))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        factor = self.factor_at(budget_progress(trainer, batch_idx))
        if factor == self.factor:
            return
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                # from the rate without this callback's factor; a factor of 0 left that rate at 0 (it stays so)
                group["lr"] = group["lr"] / self.factor * factor if self.factor > 0 else 0.0
        self.factor = factor
