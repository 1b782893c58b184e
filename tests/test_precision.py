"""Mixed precision on the CPU: bf16-mixed keeps every bound finite and within a stated tolerance of fp32, and a few
bf16-mixed training steps through a Trainer give finite losses. The precision a run gets when its config names none
(ssvae_pl/precision.py): bf16-mixed where the processor has bf16 instructions, 32-true elsewhere; the `ssvae`
command applies it and says which, a named one is kept."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from helpers.trainers import quiet_trainer
from test_cli import DEBUG, REPO, TINY_VAE, data_args
from test_m2 import K, binary_images, tiny_m2
from ssvae_pl import best_precision, precision
from ssvae_pl.cli import main
from ssvae_pl.models import VAE

VAE_CONFIG = str(REPO / "configs" / "mnist" / "m1_vae.yaml")

# bf16 keeps 8 bits of mantissa: each matrix product is off by ~0.4% relative, and a bound sums 784 pixels' terms
# (in fp32, elbo.py). Stated tolerance: 2% of the bound's magnitude per example, 1% for the batch mean.
PER_EXAMPLE, MEAN = 0.02, 0.01


def test_bf16_autocast_bounds_match_fp32() -> None:
    model = tiny_m2(hidden_dims=[64], classifier_hidden_dims=[32], latent_dim=8)
    x = binary_images(32, seed=1)
    y = torch.arange(32) % K
    eps_l, eps_u = torch.randn(32, 8), torch.randn(32, K, 8)
    with torch.no_grad():
        fp32 = (model.labelled_bound(x, y, eps_l), model.unlabelled_bound(x, eps_u))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = (model.labelled_bound(x, y, eps_l), model.unlabelled_bound(x, eps_u))
    for full, mixed in zip(fp32, bf16):
        assert mixed.dtype == torch.float32 and torch.isfinite(mixed).all()  # reductions stay in fp32
        assert ((mixed - full).abs() <= PER_EXAMPLE * full.abs()).all()
        assert abs(mixed.mean() - full.mean()) <= MEAN * full.abs().mean()


def test_bf16_mixed_trains_m2_and_the_vae_with_finite_losses(make_dm) -> None:
    class Recorder(pl.Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.losses.append(float(outputs["loss"]))

    for model in (tiny_m2(alpha=500.0, weighting="batch"), VAE(hidden_dims=[32], latent_dim=4)):
        recorder = Recorder()
        quiet_trainer(precision="bf16-mixed", max_steps=4, limit_val_batches=1,
                      callbacks=[recorder]).fit(model, datamodule=make_dm(binarize="dynamic"))
        assert len(recorder.losses) == 4 and all(math.isfinite(v) for v in recorder.losses)
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("flags, expected", [({"avx2", "avx512_bf16"}, "bf16-mixed"), ({"amx_bf16"}, "bf16-mixed"),
                                             ({"avx2", "fma"}, "32-true"), (set(), "32-true")])
def test_best_precision_follows_the_cpu_flags(monkeypatch, flags: set[str], expected: str) -> None:
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: False)
    chosen, why = best_precision("auto")
    assert chosen == expected and ("bf16" in why)


def test_cpu_flags_reads_this_machine() -> None:
    flags = precision.cpu_flags()
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    assert ("avx512_bf16" in flags) == (" avx512_bf16" in text)


@pytest.mark.parametrize("flags, named, expected", [({"avx512_bf16"}, None, "bf16-mixed"),
                                                    (set(), None, "32-true"),
                                                    ({"avx512_bf16"}, "32-true", None)])
def test_ssvae_fit_applies_the_best_precision_unless_one_is_named(monkeypatch, shared_mnist_dir: Path,
                                                                  tmp_path: Path, flags, named, expected) -> None:
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    monkeypatch.chdir(tmp_path)
    chosen, said = [], []
    monkeypatch.setattr("pytorch_lightning.Trainer.fit", lambda self, *a, **k: chosen.append(self.precision))
    monkeypatch.setattr("ssvae_pl.cli.rank_zero_info", said.append)
    args = ["fit", "-c", VAE_CONFIG, "-c", DEBUG, *data_args(shared_mnist_dir), *TINY_VAE]
    main(args + (["--trainer.precision", named] if named else []))
    assert chosen == [expected or named]
    assert said == ([f"precision {expected}: {best_precision()[1]} (--trainer.precision chooses another)"]
                    if expected else [])
