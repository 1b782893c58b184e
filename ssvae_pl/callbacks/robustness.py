"""A run that survives its faults: ``NonFiniteGuard`` (NaN/Inf loss or gradient), ``SaveOnInterrupt`` (SIGTERM and
Ctrl-C), ``SeedEachEpoch`` (an epoch's draws depend only on seed, epoch and rank) and
``ResumeWithNewOptimizerSettings`` (a resume's changed optimiser arguments are used)."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import threading
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn

from ssvae_pl.callbacks.checkpoints import last_checkpoint_path
from ssvae_pl.errors import ConfigError, NumericalError


class NonFiniteGuard(pl.Callback):
    """Stops (or skips) a training step whose loss or gradients are NaN or infinite, before the optimiser uses them.

    After each backward pass and before the optimiser's step (``on_before_optimizer_step``), the step's loss and the
    norm of every gradient are checked for NaN/Inf on the device. Reading that verdict is a host synchronisation, which
    on a GPU makes the host wait for the device at every step; ``deferred`` reads it one step later instead, from a
    copy that travelled without blocking, so the host stays ahead of the device.

    Args:
        action: ``stop`` raises ``NumericalError`` naming the global step, the epoch and the metric (the loss, or the
            gradient of the first parameter that is not finite); the optimiser never takes that step and no checkpoint
            is written, so ``last.ckpt`` keeps the last good state (``ssvae`` prints one ``ssvae: error:`` line).
            ``skip`` drops the step instead (every gradient set to ``None``, so the optimiser leaves the weights and
            its own state untouched), counts it in ``train/skipped_steps``, and stops as above after ``max_skips``
            non-finite steps in a row.
        check_gradients: also check the gradients (with ``16-mixed`` precision the gradient scaler already skips
            steps with infinite gradients, so only the loss is checked there).
        max_skips: with ``skip``, the most non-finite steps skipped in a row before the run stops anyway.
        deferred: read each step's verdict at the next step (or at the epoch's end, or before a checkpoint): with
            ``stop``, the optimiser has then taken the bad step, and the run stops before it writes anything (the
            step is named as before). ``None`` (the default): deferred on a GPU with ``stop``; ``skip`` always decides
            before the step.

    A checkpoint is never written with non-finite weights: ``on_save_checkpoint`` refuses it with the same error.
    """

    def __init__(self, action: str = "stop", check_gradients: bool = True, max_skips: int = 10,
                 deferred: bool | None = None) -> None:
        if action not in ("stop", "skip"):
            raise ConfigError(f"NonFiniteGuard.action must be stop or skip, got {action!r}.")
        if max_skips < 0:
            raise ConfigError(f"NonFiniteGuard.max_skips must be >= 0, got {max_skips}.")
        if deferred and action == "skip":
            raise ConfigError("NonFiniteGuard.deferred needs action stop: skip decides before the optimiser's step.")
        self.action, self.check_gradients, self.max_skips, self.deferred = action, check_gradients, max_skips, deferred
        self._pending: tuple | None = None  # a deferred step's values (on the host), their copy's event, what they are
        self.skipped = 0  # steps skipped in this run (kept in the checkpoint)
        self.consecutive = 0
        self._losses: list[torch.Tensor] = []
        self._batch_idx = 0

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach().float().reshape(-1))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        losses, self._losses = self._losses, []
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        checked = list(losses)
        if self.check_gradients and scaler is None and params:
            norms = torch._foreach_norm([p.grad for p in params])
            checked.append(torch.stack([n.float() for n in norms]))
        if not checked:
            return
        values = torch.cat([c.to(checked[0].device) for c in checked])
        if self._defers(values.device):
            self._check_pending(trainer)
            self._defer(trainer, pl_module, values, len(losses), params)
            return
        bad = not bool(torch.isfinite(values).all())
        if trainer.world_size > 1:  # gradients are reduced already; the loss is per rank: decide together
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            self.consecutive = 0
            return
        what = self._describe(pl_module, losses, params)
        self.consecutive += 1
        if self.action == "stop" or self.consecutive > self.max_skips:
            self._stop(trainer, what)
        self.skipped += 1

        rank_zero_warn(f"NonFiniteGuard: skipped global step {trainer.global_step} (epoch {trainer.current_epoch}, "
                       f"batch {self._batch_idx}): non-finite {what}; {self.skipped} skipped so far.")
        if scaler is None:  # with a gradient scaler, its own inf check skips the step
            for p in params:
                p.grad = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.action == "skip":
            pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)

    def _defers(self, device: torch.device) -> bool:
        return self.deferred if self.deferred is not None else (self.action == "stop" and device.type == "cuda")

    def _defer(self, trainer: pl.Trainer, pl_module: pl.LightningModule, values: torch.Tensor, num_losses: int,
               params: list[torch.Tensor]) -> None:
        """Keep this step's values for the next check: on a GPU copied to pinned host memory without blocking
        (with an event that says when the copy is done); across processes with the count of bad ranks appended
        (an all-reduce on the device, no synchronisation)."""
        values = values.detach().float()
        if trainer.world_size > 1:
            bad_ranks = trainer.strategy.reduce((~torch.isfinite(values)).any().float(), reduce_op="sum")
            values = torch.cat([values, bad_ranks.reshape(1)])
        event = None
        if values.device.type == "cuda":
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            values = host
        where = (trainer.global_step, trainer.current_epoch, self._batch_idx)
        self._pending = (values, event, num_losses, params, pl_module, where)

    def _check_pending(self, trainer: pl.Trainer) -> None:
        """The verdict on the deferred step, if any: stop the run naming it when it was not finite."""
        if self._pending is None:
            return
        values, event, num_losses, params, pl_module, where = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()  # this step's copy only: the device runs on with the steps queued after it
        distributed = trainer.world_size > 1
        checked, bad_ranks = (values[:-1], float(values[-1])) if distributed else (values, 0.0)
        if bool(torch.isfinite(checked).all()) and bad_ranks == 0:
            return
        losses, norms = checked[:num_losses], checked[num_losses:]
        if not bool(torch.isfinite(losses).all()):
            what = f"training loss ({losses[~torch.isfinite(losses)][0].item()})"
        elif not bool(torch.isfinite(norms).all()):
            first = int((~torch.isfinite(norms)).nonzero()[0])
            name = next((n for n, p in pl_module.named_parameters() if p is params[first]), "a parameter")
            what = f"gradient of {name} ({'nan' if torch.isnan(norms[first]) else 'inf'})"
        else:
            what = "loss or gradient on another rank"
        self._stop(trainer, what, where=where)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_pending(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_pending(trainer)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._check_pending(trainer)
        weights = [p.detach() for p in pl_module.parameters()]
        if weights and not bool(torch.stack([torch.isfinite(w).all() for w in weights]).all()):
            name = next(n for n, p in pl_module.named_parameters() if not torch.isfinite(p.detach()).all())
            self._stop(trainer, f"weights ({name})", saving=True)

    @staticmethod
    def _describe(pl_module: pl.LightningModule, losses: list[torch.Tensor], params: list[torch.Tensor]) -> str:
        for loss in losses:
            if not torch.isfinite(loss).all():
                return f"training loss ({loss.flatten()[0].item()})"
        names = {id(p): n for n, p in pl_module.named_parameters()}
        for p in params:
            if not torch.isfinite(p.grad).all():
                kind = "nan" if torch.isnan(p.grad).any() else "inf"
                return f"gradient of {names.get(id(p), 'a parameter')} ({kind})"
        return "loss or gradient on another rank"

    def _stop(self, trainer: pl.Trainer, what: str, saving: bool = False, where: tuple | None = None) -> None:
        last = last_checkpoint_path(trainer)
        if last and Path(last).is_file():
            kept = f"{last} keeps the last good state. Resume from it with --ckpt_path last after"
        else:
            kept = "no checkpoint was written yet (the first epoch had not ended). Start again after"
        if saving:
            happened = f"refusing to write a checkpoint with non-finite {what} at global step {trainer.global_step}"
        elif where is not None:  # a deferred verdict: that step was taken, nothing was written since
            happened = (f"non-finite {what} at global step {where[0]} (epoch {where[1]}, batch {where[2]}); the run "
                        "stopped before writing anything after it")
        else:
            skips = f" after {self.consecutive - 1} skipped in a row" if self.action == "skip" else ""
            happened = (f"non-finite {what} at global step {trainer.global_step} (epoch {trainer.current_epoch}, "
                        f"batch {self._batch_idx}){skips}; the step was not taken")
        raise NumericalError(
            f"{happened}; {kept} lowering the learning rate (--optimizer.init_args.lr) or clipping gradients "
            "(--trainer.gradient_clip_val 1.0)."
        )


class SaveOnInterrupt(pl.Callback):
    """SIGTERM (a scheduler's preemption, ``kill``) or a first Ctrl-C stops training at the end of the current batch
    and writes that state to ``last.ckpt`` (through the trainer's checkpoint plugin: atomically with
    ``AtomicCheckpointIO``), so that the same command with ``--ckpt_path last`` resumes it. A second Ctrl-C
    interrupts at once and writes nothing. Lightning's own SIGTERM handler sets the flag its loops check; this
    callback routes the first SIGINT to the same flag. A run stopped by a numerical fault or any other error writes
    nothing here: ``last.ckpt`` keeps the last good state."""

    def __init__(self) -> None:
        self._previous_sigint = None
        self._signal_name = "SIGTERM"

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        connector = trainer._signal_connector

        def first_sigint(signum, frame) -> None:
            self._signal_name = "SIGINT"
            connector.received_sigterm = True  # the loops stop at the end of this batch
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: KeyboardInterrupt

        self._previous_sigint = signal.signal(signal.SIGINT, first_sigint)

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
        self._previous_sigint = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_sigint()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        if isinstance(exception, KeyboardInterrupt):  # a second Ctrl-C: nothing saved now; the last one stands
            last = last_checkpoint_path(trainer)
            exception.checkpoint = last if last is not None and Path(last).is_file() else None
            exception.run_folder = trainer.logger is not None
            return
        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking or trainer.global_step == 0:
            return
        if _training_finished(trainer):  # the signal came after the last epoch: last.ckpt holds the finished run
            exception.signal_name, exception.finished = self._signal_name, True
            return
        path = last_checkpoint_path(trainer)
        if path is None:
            return
        trainer.save_checkpoint(path, weights_only=False)
        exception.signal_name, exception.checkpoint = self._signal_name, path  # for the `ssvae` command's message
        exception.run_folder = trainer.logger is not None  # whether the run has a folder to resume in
        exception.global_step, exception.epoch = trainer.global_step, trainer.current_epoch


def _training_finished(trainer: pl.Trainer) -> bool:
    """Whether the fit has done all its epochs or steps (a signal in the moments after that stops nothing)."""
    epochs, steps = trainer.max_epochs, trainer.max_steps
    completed = trainer.fit_loop.epoch_progress.current.completed
    return (epochs is not None and epochs >= 0 and completed >= epochs) or (steps >= 0 and trainer.global_step >= steps)


def _mix(*numbers: int) -> int:
    """A 63-bit seed from several integers (a hash, so that nearby inputs give unrelated seeds)."""

    digest = hashlib.blake2b(repr(tuple(int(n) for n in numbers)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class SeedEachEpoch(pl.Callback):
    """Reseeds torch's global generator (CPU and every GPU), numpy's and Python's at the start of every training
    epoch, from the run's seed (``seed_everything``), the epoch and the global rank. Dynamic binarisation, the
    reparameterisation noise and anything else drawn from the global generators during an epoch then depend on
    nothing but (seed, epoch, rank): a run resumed from an epoch-end checkpoint draws exactly what the uninterrupted
    run drew, whatever validation or the sanity check consumed in between. The base seed is kept in the checkpoint
    (a run without ``seed_everything`` picks one at random)."""

    def __init__(self) -> None:
        self.base_seed: int | None = None

    def state_dict(self) -> dict:
        return {"base_seed": self.base_seed}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("base_seed") is not None:
            self.base_seed = int(state_dict["base_seed"])

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.base_seed is None:
            seed = os.environ.get("PL_GLOBAL_SEED")
            self.base_seed = int(seed) if seed is not None else int(torch.randint(2**62, ()).item())

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a run resumed mid-epoch (a SIGTERM checkpoint) re-enters that epoch without on_train_epoch_start
        self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:

        seed = _mix(self.base_seed, trainer.current_epoch, trainer.global_rank)
        torch.manual_seed(seed)  # every CUDA device too
        np.random.seed(seed % 2**32)
        random.seed(seed)


class ResumeWithNewOptimizerSettings(pl.Callback):
    """A resumed run whose optimiser arguments were changed on the command line (``--optimizer.init_args.lr``
    after a divergence) trains with them: Lightning restores the optimiser's state, settings included, so they are
    set again after the restore. A changed ``lr`` scales the restored rate (and a scheduler's base rates) by
    new / old, so a schedule keeps its shape; other arguments (betas, weight decay) are set as given."""

    def __init__(self, changes: dict[str, object]) -> None:
        self.changes = dict(changes)
        self._configured: list[dict] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._configured = [{k: v for k, v in group.items() if k != "params"}
                            for optimizer in trainer.optimizers for group in optimizer.param_groups]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        groups = [group for optimizer in trainer.optimizers for group in optimizer.param_groups]
        for group, configured in zip(groups, self._configured):
            for key in self.changes.keys() & configured.keys():
                if key == "lr":
                    scale = configured["initial_lr" if "initial_lr" in configured else "lr"] / group.get(
                        "initial_lr", group["lr"])
                    group["lr"] *= scale
                    if "initial_lr" in group:
                        group["initial_lr"] *= scale
                else:
                    group[key] = configured[key]
        for config in trainer.lr_scheduler_configs:
            if hasattr(config.scheduler, "base_lrs"):
                config.scheduler.base_lrs = [group.get("initial_lr", group["lr"])
                                             for group in config.scheduler.optimizer.param_groups]
        rank_zero_info(f"ssvae: resumed with the optimiser's {', '.join(sorted(self.changes))} set anew.")
