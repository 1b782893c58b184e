"""The LightningModules (ssvae_pl/models): the VAE's bound, and the latent classifier on its frozen encoder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from helpers.synthetic import SYNTHETIC
from helpers.trainers import quiet_trainer, assert_restored_equals
from ssvae_pl.data.datamodule import SemiSupervisedDataModule, to_model_input
from ssvae_pl.errors import CheckpointError, ConfigError
from ssvae_pl.models import VAE, LatentClassifier


def binary_batch(n: int = 32, seed: int = 0) -> torch.Tensor:
    """Binary images with some structure: each is one of 4 stripe patterns with a few flipped pixels."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.zeros(4, 1, 28, 28)
    for k in range(4):
        patterns[k, :, 7 * k : 7 * k + 7, :] = 1.0
    x = patterns[torch.arange(n) % 4]
    flip = torch.rand(x.shape, generator=g) < 0.05
    return torch.where(flip, 1.0 - x, x)


def encoder_state_of(ckpt_path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}


def test_vae_forward_returns_per_example_terms() -> None:
    """forward gives elbo, recon and kl of shape (B,), with elbo = recon - kl and kl >= 0."""
    torch.manual_seed(0)
    vae = VAE(hidden_dims=[64], latent_dim=8)
    terms = vae(binary_batch(16))
    assert set(terms) == {"elbo", "recon", "kl"}
    for value in terms.values():
        assert value.shape == (16,) and torch.isfinite(value).all()
    torch.testing.assert_close(terms["elbo"], terms["recon"] - terms["kl"])
    assert (terms["kl"] >= 0).all() and (terms["recon"] <= 0).all()
    assert vae.sample(3).shape == (3, 1, 28, 28)


def test_a_few_vae_steps_increase_the_elbo() -> None:
    """Gradient steps on -ELBO raise the ELBO of a fixed batch (averaged over z samples to tame the noise)."""
    torch.manual_seed(0)
    vae = VAE(hidden_dims=[64], latent_dim=8)
    x = binary_batch(32)

    def mean_elbo() -> float:
        with torch.no_grad():
            return torch.stack([vae(x)["elbo"].mean() for _ in range(10)]).mean().item()

    before = mean_elbo()
    optimizer = torch.optim.Adam(vae.parameters(), lr=3e-3)
    for _ in range(30):
        optimizer.zero_grad()
        loss = vae.training_step({"unlabelled": x}, 0)
        loss.backward()
        optimizer.step()
    after = mean_elbo()
    assert after > before + 50, (before, after)


def test_kl_warmup_weighs_the_kl_term_by_a_rising_beta_and_validation_counts_active_units(
        tmp_path: Path, shared_mnist_dir: Path) -> None:
    """``kl_warmup_epochs``: beta = step / (warm-up epochs x batches per epoch), capped at 1, weighs the KL term of
    the training loss (beta 0: the reconstruction term alone); ``val/active_units`` counts the latent dimensions
    whose posterior mean varies across the validation images with a variance above 0.01."""
    import pytorch_lightning as pl

    torch.manual_seed(0)
    vae = VAE(hidden_dims=[64], latent_dim=8)
    x = binary_batch(16)
    vae.kl_weight = lambda batch_idx=0: 0.0
    torch.manual_seed(1)
    loss = vae.training_step({"unlabelled": x}, 0)
    torch.manual_seed(1)
    torch.testing.assert_close(loss, -vae(x)["recon"].mean())
    with pytest.raises(ConfigError, match="model.kl_warmup_epochs"):
        VAE(kl_warmup_epochs=-1)

    class Betas(pl.Callback):
        def __init__(self) -> None:
            self.betas: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.betas.append(pl_module.kl_weight())

    betas = Betas()
    dm = SemiSupervisedDataModule(**SYNTHETIC, data_dir=str(shared_mnist_dir), num_labelled=100, batch_size=50,
                                  labelled_batch_size=20)
    vae = VAE(hidden_dims=[32], latent_dim=4, kl_warmup_epochs=1.5)
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=4, limit_val_batches=2, callbacks=[betas],
                            default_root_dir=str(tmp_path), log_every_n_steps=2)
    trainer.fit(vae, datamodule=dm)
    assert betas.betas == pytest.approx([min(1.0, step / 6) for step in range(8)])
    assert vae.kl_weight() == 1.0 and "train/kl_weight" in trainer.logged_metrics
    means = torch.cat([vae.encoder(to_model_input(b)[0])[0] for b in list(dm.val_dataloader())[:2]])
    assert trainer.callback_metrics["val/active_units"].item() == int((means.var(dim=0) > 0.01).sum())


def test_kl_warmup_fraction_follows_the_runs_budget_and_needs_one(tmp_path: Path, shared_mnist_dir: Path) -> None:
    """``kl_warmup_fraction``: beta = budget_progress / fraction, capped at 1, so a run warms up over the same share
    of its budget however many epochs it gets; a run without max_epochs, max_steps or max_time has no budget to take
    a share of and stops with a ConfigError."""
    import pytorch_lightning as pl

    class Betas(pl.Callback):
        def __init__(self) -> None:
            self.betas: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.betas.append(pl_module.kl_weight(batch_idx))

    dm = SemiSupervisedDataModule(**SYNTHETIC, data_dir=str(shared_mnist_dir), num_labelled=100, batch_size=50,
                                  labelled_batch_size=20)
    betas = Betas()
    vae = VAE(hidden_dims=[32], latent_dim=4, kl_warmup_fraction=0.5)
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=4, limit_val_batches=1, callbacks=[betas],
                            default_root_dir=str(tmp_path))
    trainer.fit(vae, datamodule=dm)
    # progress at step s of 8 is s / 8; the warm-up ends half-way
    assert betas.betas == pytest.approx([min(1.0, step / 4) for step in range(8)])
    assert VAE(kl_warmup_epochs=1.5, kl_warmup_fraction=0.5).hparams.kl_warmup_epochs == 1.5  # epochs take its place
    with pytest.raises(ConfigError, match="model.kl_warmup_fraction"):
        VAE(kl_warmup_fraction=1.5)
    unbounded = quiet_trainer(max_epochs=-1, limit_train_batches=1, limit_val_batches=0,
                              default_root_dir=str(tmp_path / "unbounded"))
    with pytest.raises(ConfigError, match="model.kl_warmup_fraction=0.5 is a share of the run's budget"):
        unbounded.fit(VAE(hidden_dims=[32], latent_dim=4), datamodule=dm)


def test_latent_probe_logs_the_knn_vote_of_the_labelled_images(tmp_path: Path, shared_mnist_dir: Path) -> None:
    """``LatentProbe``: val/knn_acc is the accuracy, on every validation image, of the majority class among the k
    labelled training images nearest to it by posterior mean; the validation images' means are the ones validation
    computed, so the encoder runs once more per validation, over the labelled images only (once per batch before)."""
    from ssvae_pl.callbacks import LatentProbe

    torch.manual_seed(0)
    dm = SemiSupervisedDataModule(**SYNTHETIC, data_dir=str(shared_mnist_dir), num_labelled=100, batch_size=50,
                                  labelled_batch_size=20, eval_batch_size=64)
    vae = VAE(hidden_dims=[32], latent_dim=4)
    probes, latent_means = [], vae.latent_means
    vae.latent_means = lambda x: probes.append(len(x)) or latent_means(x)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, callbacks=[LatentProbe(k=3)],
                            default_root_dir=str(tmp_path))
    trainer.fit(vae, datamodule=dm)
    assert probes == [100]  # the labelled images, once
    labelled = dm.labelled_dataset()
    reference = vae.latent_means(to_model_input(labelled.images))
    x, y = (torch.cat(parts) for parts in zip(*dm.val_dataloader()))
    nearest = torch.cdist(vae.latent_means(to_model_input(x)), reference).topk(3, largest=False).indices
    votes = torch.nn.functional.one_hot(labelled.labels[nearest], 10).sum(dim=1).argmax(dim=1)
    assert trainer.callback_metrics["val/knn_acc"].item() == pytest.approx((votes == y).float().mean().item())


@pytest.fixture
def classifier_run(tmp_path: Path, shared_mnist_dir: Path, vae_checkpoint: Path):
    """A LatentClassifier on the session's VAE checkpoint, fitted for 3 steps; returns (model, trainer, start)."""
    torch.manual_seed(0)
    dm = SemiSupervisedDataModule(**SYNTHETIC, data_dir=str(shared_mnist_dir), num_labelled=100, batch_size=100,
                                  labelled_batch_size=50)
    model = LatentClassifier(vae_checkpoint=str(vae_checkpoint), unlabelled_objective="entropy", latent="sample")
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = quiet_trainer(max_steps=3, limit_val_batches=1, default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=dm)
    return model, trainer, start, dm


def test_latent_classifier_keeps_the_vae_encoder_frozen(vae_checkpoint: Path, classifier_run) -> None:
    """The encoder comes frozen from the VAE checkpoint, stays in eval mode, and training leaves it bit-identical
    while the classifier's weights move."""
    fresh = LatentClassifier(vae_checkpoint=str(vae_checkpoint))
    assert all(not p.requires_grad for p in fresh.encoder.parameters())
    assert all(p.requires_grad for p in fresh.classifier.parameters())
    fresh.train()
    assert fresh.training and fresh.classifier.training and not fresh.encoder.training
    assert not any(m.training for m in fresh.encoder.modules())
    assert fresh.hparams.vae_hparams["latent_dim"] == 4 and fresh.hparams.vae_hparams["hidden_dims"] == [32]

    model, trainer, start, _ = classifier_run
    assert trainer.global_step == 3
    assert not model.encoder.training and all(not p.requires_grad for p in model.encoder.parameters())
    expected = encoder_state_of(vae_checkpoint)
    actual = {k: v for k, v in model.encoder.state_dict().items() if k != "active_dims"}  # FrozenEncoder's own
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key
    changed = [k for k, v in model.classifier.state_dict().items() if not torch.equal(v, start[f"classifier.{k}"])]
    assert changed and len(changed) == len(model.classifier.state_dict())


def test_classifier_checkpoint_is_self_contained(tmp_path: Path, vae_checkpoint: Path, classifier_run) -> None:
    """A LatentClassifier checkpoint carries the encoder: it loads and predicts the same after the VAE's checkpoint
    file is gone."""
    model, trainer, _, dm = classifier_run
    vae_copy = tmp_path / "vae_copy.ckpt"  # the session's VAE checkpoint is shared; delete a copy instead
    shutil.copy(vae_checkpoint, vae_copy)
    model.hparams.vae_checkpoint = str(vae_copy)
    clf_ckpt = tmp_path / "clf.ckpt"
    trainer.save_checkpoint(clf_ckpt)
    vae_copy.unlink()

    restored = LatentClassifier.load_from_checkpoint(clf_ckpt, map_location="cpu")
    assert restored.hparams.vae_checkpoint == str(vae_copy)
    x, _ = to_model_input(next(iter(dm.test_dataloader())))
    assert_restored_equals(restored, model, x)
    assert all(not p.requires_grad for p in restored.encoder.parameters())


def test_bad_vae_checkpoints_raise_checkpoint_error(tmp_path: Path, vae_checkpoint: Path, classifier_run) -> None:
    """Missing, truncated, and not-a-VAE checkpoints each raise CheckpointError naming the file."""
    missing = tmp_path / "missing.ckpt"
    with pytest.raises(CheckpointError) as err:
        LatentClassifier(vae_checkpoint=str(missing))
    assert str(missing) in str(err.value) and "model.vae_checkpoint" in str(err.value)

    truncated = tmp_path / "truncated.ckpt"
    data = vae_checkpoint.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot be read") as err:
        LatentClassifier(vae_checkpoint=str(truncated))
    assert str(truncated) in str(err.value)

    _, trainer, _, _ = classifier_run
    clf_ckpt = tmp_path / "classifier.ckpt"
    trainer.save_checkpoint(clf_ckpt)
    with pytest.raises(CheckpointError, match="not a VAE") as err:
        LatentClassifier(vae_checkpoint=str(clf_ckpt))
    assert str(clf_ckpt) in str(err.value)

    with pytest.raises(ConfigError, match="model.vae_checkpoint is required"):
        LatentClassifier()
    with pytest.raises(CheckpointError, match="shape"):
        LatentClassifier(vae_checkpoint=str(vae_checkpoint), input_shape=(3, 32, 32))


@pytest.mark.parametrize("objective", ["entropy", "self_training"])
def test_unlabelled_objectives_give_finite_losses_and_classifier_gradients(vae_checkpoint: Path,
                                                                         objective: str) -> None:
    """Each unlabelled objective adds a finite term whose gradient reaches the classifier (never the encoder)."""
    torch.manual_seed(0)
    model = LatentClassifier(vae_checkpoint=str(vae_checkpoint), hidden_dims=[16], unlabelled_objective=objective)
    model.train()
    x = binary_batch(24)
    unlabelled = model.unlabelled_loss(model(x))
    assert unlabelled.shape == () and torch.isfinite(unlabelled)
    unlabelled.backward()
    grads = [p.grad for p in model.classifier.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.encoder.parameters())

    model.zero_grad()
    batch = {"labelled": (x[:10], torch.arange(10)), "unlabelled": x}
    loss = model.training_step(batch, 0)  # no Trainer attached: nothing is logged
    assert torch.isfinite(loss)
    supervised = torch.nn.functional.cross_entropy(model(x[:10]), torch.arange(10))
    assert not torch.isclose(loss, supervised)  # the unlabelled term joined in
    loss.backward()
    assert all(p.grad is not None for p in model.classifier.parameters())
