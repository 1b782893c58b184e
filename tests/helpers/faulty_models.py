"""Models that misbehave on purpose, for tests/test_trust.py: importable by ``ssvae`` subprocesses (the tests put
this folder on PYTHONPATH), e.g. ``--model.class_path faulty_models.NaNVAE``."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Sequence

import pytorch_lightning as pl
import torch

from ssvae_pl.checkpoint_io import AtomicCheckpointIO, remove_stale_temporaries
from ssvae_pl.files import atomic_output
from ssvae_pl.models import M2, VAE


class NaNVAE(VAE):
    """A VAE whose loss (``nan_in: loss``) or first gradient (``nan_in: grad``) turns NaN/Inf at the global steps
    ``nan_steps``."""

    def __init__(self, nan_steps: Sequence[int] = (), nan_in: str = "loss", **kwargs) -> None:
        super().__init__(**kwargs)
        self.nan_steps, self.nan_in = set(nan_steps), nan_in

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.nan_in == "loss" and self.global_step in self.nan_steps:
            loss = loss * float("nan")
        return loss

    def on_after_backward(self) -> None:
        if self.nan_in == "grad" and self.global_step in self.nan_steps:
            self.decoder.net[0].weight.grad[0, 0] = float("inf")


class SlowM2(M2):
    """M2 whose training steps take at least ``step_seconds``: time for a test to kill it mid-epoch."""

    def __init__(self, step_seconds: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.step_seconds = step_seconds

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if self.step_seconds:
            time.sleep(self.step_seconds)
        return super().training_step(batch, batch_idx)



class SlowCheckpointIO(AtomicCheckpointIO):
    """AtomicCheckpointIO whose writes pause half-way for ``$SSVAE_WRITE_SECONDS`` (default 0.5): time for a
    fault-injection test to kill the process during a checkpoint write."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        with atomic_output(path, overwrite=True, durable=True) as temporary, open(temporary, "wb") as file:
            file.write(data[: len(data) // 2])
            file.flush()
            time.sleep(float(os.environ.get("SSVAE_WRITE_SECONDS", "0.5")))
            file.write(data[len(data) // 2:])


class SecondCtrlC(VAE):
    """A VAE whose training step at global step ``at`` is interrupted as a second Ctrl-C interrupts it
    (``KeyboardInterrupt`` inside the step)."""

    def __init__(self, at: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.at = at

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if self.global_step == self.at:
            raise KeyboardInterrupt
        return super().training_step(batch, batch_idx)


class Undeclared(pl.LightningModule):
    """A model of one's own that declares nothing to the callbacks (no ``Declares``): logistic regression on the
    labelled images. It must train, test and write ``last.ckpt`` through ``ssvae`` all the same."""

    def __init__(self, input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10,
                 class_names: Sequence[str] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.linear = torch.nn.Linear(int(torch.tensor(input_shape).prod()), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.float().flatten(1))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch["labelled"]
        return torch.nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        self.log("val/acc", (self(x).argmax(dim=1) == y).float().mean())

    def test_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        self.log("test/acc", (self(x).argmax(dim=1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)
