"""The training loop's own pieces: training scalars logged at Lightning's cadence without a ``self.log`` per step
(``StepScalars``), and the learning rate annealed over the run's budget, time or epochs (``BudgetAnnealing``)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers.trainers import quiet_trainer
from ssvae_pl.callbacks import EpochTimer
from ssvae_pl.errors import ConfigError
from ssvae_pl.models import M2
from ssvae_pl.results import read_series
from ssvae_pl.schedule import BudgetAnnealing, budget_progress

STEPS, EVERY = 6, 3


class StepLosses(pl.Callback):
    """Each training step's loss and learning rate, as the loop saw them."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.rates: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))


def test_training_scalars_are_written_every_n_steps_and_as_epoch_means_with_few_log_calls(
        tmp_path: Path, make_dm, monkeypatch: pytest.MonkeyPatch) -> None:
    """M2's four training scalars: ``<name>_step`` is the value of every ``log_every_n_steps``-th step, and
    ``<name>_epoch`` the mean over the epoch's steps, while ``self.log`` runs only when a value is written (four
    calls at every step before: about 5% of an M1+M2 step on a CPU)."""
    calls: list[str] = []
    log = pl.LightningModule.log
    monkeypatch.setattr(pl.LightningModule, "log", lambda self, name, *a, **k: (calls.append(name),
                                                                                log(self, name, *a, **k))[1])
    torch.manual_seed(0)
    model = M2(hidden_dims=[16], classifier_hidden_dims=[16], latent_dim=3)
    seen = StepLosses()
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=STEPS, limit_val_batches=0, log_every_n_steps=EVERY,
                            logger=TensorBoardLogger(str(tmp_path), name="m2", version="v"), callbacks=[seen])
    trainer.fit(model, datamodule=make_dm())

    train_calls = [name for name in calls if name.startswith("train/")]
    assert len(train_calls) == 4 * (STEPS // EVERY) + 4, train_calls  # the writes, then the epoch means
    (events_file,) = (tmp_path / "m2" / "v").glob("events.out.tfevents.*")
    events = EventAccumulator(str(events_file), size_guidance={"scalars": 0})
    events.Reload()
    steps = events.Scalars("train/loss_step")
    assert [event.value for event in steps] == pytest.approx([seen.losses[i] for i in range(EVERY - 1, STEPS, EVERY)],
                                                             rel=1e-6)
    (epoch,) = events.Scalars("train/loss_epoch")
    assert epoch.value == pytest.approx(sum(seen.losses) / STEPS, rel=1e-5)
    for name in ("elbo_labelled", "elbo_unlabelled", "classification"):
        assert len(events.Scalars(f"train/{name}_step")) == STEPS // EVERY
        assert len(events.Scalars(f"train/{name}_epoch")) == 1


def test_the_kl_warm_up_weight_is_logged_only_when_written(tmp_path: Path, make_dm,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """During the VAE's KL warm-up, ``train/kl_weight`` reaches TensorBoard every ``log_every_n_steps`` steps with
    that step's beta, as before, but ``self.log`` runs only then (at every step before: Lightning's result
    bookkeeping for a value nobody writes)."""
    from ssvae_pl.models import VAE

    calls: list[str] = []
    log = pl.LightningModule.log
    monkeypatch.setattr(pl.LightningModule, "log", lambda self, name, *a, **k: (calls.append(name),
                                                                                log(self, name, *a, **k))[1])

    class Betas(pl.Callback):
        def __init__(self) -> None:
            self.betas: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.betas.append(pl_module.kl_weight(batch_idx))

    betas = Betas()
    vae = VAE(hidden_dims=[16], latent_dim=3, kl_warmup_epochs=10)  # beta < 1 at every step of this run
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=STEPS, limit_val_batches=0, log_every_n_steps=EVERY,
                            logger=TensorBoardLogger(str(tmp_path), name="vae", version="v"), callbacks=[betas])
    trainer.fit(vae, datamodule=make_dm())

    assert calls.count("train/kl_weight") == STEPS // EVERY, calls
    (events_file,) = (tmp_path / "vae" / "v").glob("events.out.tfevents.*")
    events = EventAccumulator(str(events_file), size_guidance={"scalars": 0})
    events.Reload()
    written = events.Scalars("train/kl_weight")
    assert [event.step for event in written] == list(range(EVERY - 1, STEPS, EVERY))
    assert [event.value for event in written] == pytest.approx(betas.betas[EVERY - 1::EVERY], rel=1e-6)


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="a machine with a CUDA device keeps the fork-safe check")
def test_a_fit_without_cuda_devices_does_not_ask_nvml_at_every_step(make_dm, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning's fork-safe CUDA check (``PYTORCH_NVML_BASED_CUDA_CHECK=1``) has torch look NVML up at every call,
    and Adam's step calls it at every step; where there is no CUDA device, no step asks."""
    from ssvae_pl.host import NVML_CHECK

    monkeypatch.setenv(NVML_CHECK, "1")  # as Lightning's import leaves it (and put back afterwards)
    probes = []
    probe = torch.cuda._raw_device_count_nvml
    monkeypatch.setattr(torch.cuda, "_raw_device_count_nvml", lambda: (probes.append(1), probe())[1])
    seen = {}

    class Steps(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            seen["before"] = len(probes)

        def on_train_end(self, trainer, pl_module) -> None:
            seen["steps"] = len(probes) - seen["before"]

    model = M2(hidden_dims=[8], classifier_hidden_dims=[8], latent_dim=2)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=STEPS, limit_val_batches=0, callbacks=[Steps()])
    trainer.fit(model, datamodule=make_dm())
    assert seen["steps"] == 0, f"NVML asked {seen['steps']} times in {STEPS} steps"


def test_budget_annealing_follows_a_half_cosine_over_the_last_part_of_the_epochs(make_dm) -> None:
    """With ``max_epochs`` as the budget, the rate stays at its base until the last ``fraction`` of the steps, then
    falls along (1 + cos(pi u)) / 2."""
    torch.manual_seed(0)
    model = M2(hidden_dims=[8], classifier_hidden_dims=[8], latent_dim=2)
    seen = StepLosses()
    annealing = BudgetAnnealing(fraction=0.5)
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=4, limit_val_batches=0,
                            callbacks=[annealing, seen])
    trainer.fit(model, datamodule=make_dm())
    base = 3e-3  # M2's configure_optimizers
    progress = [(epoch + batch / 4) / 2 for epoch in range(2) for batch in range(4)]
    expected = [base * (1.0 if p <= 0.5 else 0.5 * (1 + math.cos(math.pi * (p - 0.5) / 0.5))) for p in progress]
    assert seen.rates == pytest.approx(expected, rel=1e-9)
    assert annealing.state_dict() == {"factor": pytest.approx(expected[-1] / base)}


def test_budget_progress_follows_max_time_when_it_ends_the_run_first() -> None:
    """With ``max_time`` set, progress is the share of the time elapsed, unless the epochs run out sooner."""
    trainer = pl.Trainer(max_epochs=-1, max_time={"minutes": 10}, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False)
    timer = next(c for c in trainer.callbacks if isinstance(c, pl.callbacks.Timer))
    timer.time_elapsed = lambda stage="train": 150.0  # 2.5 of 10 minutes
    assert budget_progress(trainer) == pytest.approx(0.25)
    assert BudgetAnnealing(0.3).factor_at(0.25) == 1.0
    assert BudgetAnnealing(0.3).factor_at(0.85) == pytest.approx(0.5)
    assert BudgetAnnealing(0.3).factor_at(1.0) == 0.0


def test_budget_annealing_rejects_a_fraction_outside_0_1() -> None:
    with pytest.raises(ConfigError, match="fraction"):
        BudgetAnnealing(fraction=0)


class SlowValidation(pl.Callback):
    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            time.sleep(0.4)  # a picture callback's work


def test_epoch_timer_counts_validation_and_its_callbacks_apart_from_the_training_loop(tmp_path: Path,
                                                                                      make_dm) -> None:
    """``time/epoch_seconds`` is the training loop alone; validation and what runs at its end (checkpoints,
    pictures) go to ``time/validation_seconds``. Lightning validates inside the training epoch, before
    ``on_train_epoch_end``, so the epoch's wall time held both before."""
    torch.manual_seed(0)
    model = M2(hidden_dims=[8], classifier_hidden_dims=[8], latent_dim=2)
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=1,
                            logger=TensorBoardLogger(str(tmp_path), name="m2", version="v"),
                            callbacks=[EpochTimer(), SlowValidation()])
    trainer.fit(model, datamodule=make_dm())
    run = tmp_path / "m2" / "v"
    training, validation = read_series(run, "time/epoch_seconds"), read_series(run, "time/validation_seconds")
    elapsed = read_series(run, "time/elapsed_seconds")
    assert len(training) == len(validation) == 2
    assert all(v >= 0.4 for v in validation) and all(t < 0.4 for t in training), (training, validation)
    assert elapsed[1] - elapsed[0] >= training[1] + validation[1] - 1e-3
