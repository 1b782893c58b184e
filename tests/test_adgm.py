"""ADGM and SDGM (Maaløe et al. 2016): the bound written out term by term, the sum over classes against a loop, the
gradient reaching every network, Monte Carlo samples as rows, and every ``ssvae`` subcommand on their configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from helpers.cli import ssvae_here
from ssvae_pl.models import ADGM, SDGM, M1ADGM
from ssvae_pl.models.declares import monitor_of, pictures_of
from test_cli import REPO, cli_data, data_args, ok  # noqa: F401  (cli_data is a fixture)

K, TINY = 10, dict(hidden_dims=[16, 12], aux_dim=3, latent_dim=4)
TOL = dict(rtol=1e-5, atol=1e-4)
TINY_ARGS = ["--model.init_args.hidden_dims", "[16, 12]", "--model.init_args.aux_dim", "3",
             "--model.init_args.latent_dim", "4"]


QUICK = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar",
         "false", "--trainer.enable_model_summary", "false"]


def every_subcommand(tmp_path: Path, name: str, common: list[str], fit_only: tuple[str, ...] = ()) -> Path:
    """fit for one epoch of 2 steps, resume with --ckpt_path last for a second, test, predict and export, each
    through ``ssvae``; ``fit_only``: arguments of the fits alone. Returns the run's last.ckpt."""
    ok(ssvae_here(tmp_path, "fit", *common, *fit_only, *QUICK, "--trainer.max_epochs", "1"))
    ok(ssvae_here(tmp_path, "fit", *common, *fit_only, *QUICK, "--trainer.max_epochs", "2", "--ckpt_path", "last"))
    ckpt = tmp_path / "lightning_logs" / name / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 4
    tested = ssvae_here(tmp_path, "test", *common, "--ckpt_path", "last")
    ok(tested)
    assert "test/acc" in tested.stdout
    ok(ssvae_here(tmp_path, "predict", *common, "--ckpt_path", "last", "--predictions.output",
                  str(tmp_path / "p.csv")))
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 201  # the header and the 200 test images
    ok(ssvae_here(tmp_path, "export", "--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "export")))
    assert (tmp_path / "export" / "last.onnx").is_file()
    return ckpt


def tiny(model_class, **kwargs):
    torch.manual_seed(0)
    model = model_class(**TINY, **kwargs)
    model.set_data_sizes(num_labelled=100, num_unlabelled=500, num_train=500)
    return model


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.bernoulli(torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("model_class", [ADGM, SDGM])
def test_the_labelled_bound_is_the_papers_written_out(model_class) -> None:
    """L(x, y) = log p(x|.) + log p(a|.) - log q(a|x) + log p(y) - KL(q(z|a,x,y) || p(z)), with the decoders
    conditioned as the paper's ADGM (x on y, z; a on x, y, z) or SDGM (x on a, y, z; a on y, z)."""
    model = tiny(model_class)
    x, y = images(3), torch.tensor([1, 4, 9])
    eps_a, eps_z = torch.randn(3, 3), torch.randn(3, 4)
    bound = model.mixed_bounds(x, y, x[:0], eps_a, eps_z)["bound_l"]

    flat = x.flatten(1)
    q_a = Normal(*model.aux_encoder(flat))
    a = q_a.mean + q_a.stddev * eps_a
    h = torch.cat([flat, a], -1)
    q_z = Normal(*model.encoder(h, y))
    z = q_z.mean + q_z.stddev * eps_z
    logits = model.decoder(torch.cat([z, a], -1) if model.skip else z, y)
    x_part = None if model.skip else model.aux_decoder.x_part(flat)
    p_a = Normal(*model.aux_decoder(z, y, x_part))
    expected = (Bernoulli(logits=logits).log_prob(x).flatten(1).sum(-1) + p_a.log_prob(a).sum(-1)
                - q_a.log_prob(a).sum(-1) - math.log(K) - kl_divergence(q_z, Normal(0.0, 1.0)).sum(-1))
    torch.testing.assert_close(bound, expected, **TOL)
    assert (model.aux_decoder.x_layer is None) == model.skip


@pytest.mark.parametrize("model_class", [ADGM, SDGM])
def test_the_sum_over_classes_equals_a_loop_over_them(model_class) -> None:
    """Each unlabelled image's K bounds, computed as one batch of (image, class) rows, equal its labelled bound in
    each class with the same a and z; U(x) is sum_y q(y|a,x) L(x, y) + H(q(y|a,x))."""
    model = tiny(model_class)
    x = images(4)
    eps_a, eps_z = torch.randn(4, 3), torch.randn(4, K, 4)
    terms = model.mixed_bounds(x[:0], torch.zeros(0, dtype=torch.long), x, eps_a, eps_z.flatten(0, 1))
    for c in range(K):
        one = model.mixed_bounds(x, torch.full((4,), c), x[:0], eps_a, eps_z[:, c])
        torch.testing.assert_close(terms["class_bounds"][:, c], one["bound_l"], **TOL)
        torch.testing.assert_close(terms["logits_u"], one["logits_l"], **TOL)


@pytest.mark.parametrize("model_class", [ADGM, SDGM])
def test_the_loss_reaches_every_network_and_samples_are_rows(model_class) -> None:
    """One step's loss has a finite gradient in every network; ``samples`` draws are as many rows per image."""
    model = tiny(model_class, samples=3)
    batch = {"labelled": (images(2), torch.tensor([0, 5])), "unlabelled": images(4, seed=1)}
    terms = model.loss_terms(batch)
    assert terms["elbo_labelled"].shape == (6,) and terms["elbo_unlabelled"].shape == (12,)
    terms["loss"].backward()
    for name in ("aux_encoder", "classifier", "encoder", "decoder", "aux_decoder"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads), name


def test_evaluation_averages_q_y_over_samples_of_a_and_is_deterministic() -> None:
    model = tiny(ADGM, eval_samples=4).eval()
    x = images(5)
    noise = model.evaluation_noise(5, torch.Generator().manual_seed(0))
    log_probs, bound = model.evaluation_terms(x, noise)
    assert log_probs.shape == (5, K) and bound.shape == (5,)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(5))
    again = model.evaluation_terms(x, noise)
    assert torch.equal(again[0], log_probs) and torch.equal(again[1], bound)
    assert pictures_of(model) == {"reconstructions", "class_samples", "analogies", "latent_space", "confusion_matrix"}
    assert monitor_of(model) == ("val/acc", "max")
    assert model.sample(torch.arange(K), 2).shape == (2 * K, 1, 28, 28)
    assert tiny(SDGM).analogies(x).shape == (5, K, 1, 28, 28)


def test_bad_settings_are_config_errors() -> None:
    from ssvae_pl.errors import ConfigError

    for field in ("samples", "eval_samples", "aux_dim", "latent_dim"):
        with pytest.raises(ConfigError, match=f"model.init_args.{field} must be at least 1, got 0"):
            ADGM(**{field: 0})
    with pytest.raises(ConfigError, match="hidden_dims"):
        SDGM(hidden_dims=[])


@pytest.mark.parametrize("name", ["adgm", "sdgm"])
def test_fit_resume_test_predict_and_export_through_ssvae(tmp_path: Path, cli_data: Path, name: str) -> None:
    """The shipped config, tiny: fit, resume with --ckpt_path last, test, predict and export."""
    ckpt = every_subcommand(tmp_path, name, ["-c", str(REPO / "configs" / "mnist" / f"{name}.yaml"),
                                             *data_args(cli_data), *TINY_ARGS])
    other = "sdgm" if name == "adgm" else "adgm"  # the other variant's config: one error naming both classes
    refused = ssvae_here(tmp_path, "test", "-c", str(REPO / "configs" / "mnist" / f"{other}.yaml"),
                         *data_args(cli_data), *TINY_ARGS, "--ckpt_path", str(ckpt))
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0, refused.stderr
    assert f"holds a {name.upper()}" in refused.stderr and "use the config the checkpoint was trained with" in \
        refused.stderr


# ---- M1+ADGM: ADGM on M1's latents ---------------------------------------------------------------------------------


@pytest.fixture
def m1adgm(vae_checkpoint: Path) -> M1ADGM:
    torch.manual_seed(0)
    model = M1ADGM(vae_checkpoint=str(vae_checkpoint), m1_active_threshold=0, **TINY)
    model.set_data_sizes(num_labelled=100, num_unlabelled=500, num_train=500)
    return model


def test_m1adgm_bound_is_adgms_with_a_gaussian_p_of_m1s_latents(m1adgm: M1ADGM) -> None:
    """On M1's latents z1 (A = 4 here) the bound is ADGM's with log N(z1; p(z1|y,z2)) in place of the Bernoulli
    image likelihood, and p(a|z1,y,z2) conditioned on z1; the sum over classes still equals a loop over them."""
    h, y = torch.randn(3, 4), torch.tensor([1, 4, 9])
    eps_a, eps_z = torch.randn(3, 3), torch.randn(3, 4)
    bound = m1adgm.mixed_bounds(h, y, h[:0], eps_a, eps_z)["bound_l"]
    q_a = Normal(*m1adgm.aux_encoder(h))
    a = q_a.mean + q_a.stddev * eps_a
    q_z = Normal(*m1adgm.encoder(torch.cat([h, a], -1), y))
    z = q_z.mean + q_z.stddev * eps_z
    p_a = Normal(*m1adgm.aux_decoder(z, y, m1adgm.aux_decoder.x_part(h)))
    expected = (Normal(*m1adgm.decoder(z, y)).log_prob(h).sum(-1) + p_a.log_prob(a).sum(-1)
                - q_a.log_prob(a).sum(-1) - math.log(K) - kl_divergence(q_z, Normal(0.0, 1.0)).sum(-1))
    torch.testing.assert_close(bound, expected, **TOL)

    eps_u = torch.randn(3, K, 4)
    terms = m1adgm.mixed_bounds(h[:0], y[:0], h, eps_a, eps_u.flatten(0, 1))
    for c in range(K):
        one = m1adgm.mixed_bounds(h, torch.full((3,), c), h[:0], eps_a, eps_u[:, c])["bound_l"]
        torch.testing.assert_close(terms["class_bounds"][:, c], one, **TOL)


def test_m1adgm_trains_on_cached_rows_and_classifies_images_through_m1(m1adgm: M1ADGM) -> None:
    """A training batch of the cache's rows [mean, std] of q(z1|x) reaches every network but M1's frozen encoder;
    in eval mode, images are classified on the posterior mean of q(z1|x), as the exported classifier does; the
    model declares no image pictures and refuses to draw images (it keeps no decoder of M1)."""
    rows = lambda n, seed: torch.cat([torch.randn(n, 1, 4, generator=torch.Generator().manual_seed(seed)),  # noqa: E731
                                      torch.full((n, 1, 4), 0.1)], -1)
    terms = m1adgm.train().loss_terms({"labelled": (rows(2, 0), torch.tensor([0, 5])), "unlabelled": rows(4, 1)})
    terms["loss"].backward()
    for name in ("aux_encoder", "classifier", "encoder", "decoder", "aux_decoder"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(m1adgm, name).parameters()), name
    assert all(p.grad is None and not p.requires_grad for p in m1adgm.m1_encoder.parameters())

    m1adgm.eval()
    x = images(5)
    logits = m1adgm(x)
    torch.testing.assert_close(logits, m1adgm.image_classifier()(x))
    mean = m1adgm.m1_encoder.latents(x)
    torch.testing.assert_close(logits, m1adgm.classifier(torch.cat([mean, m1adgm.aux_encoder(mean)[0]], -1)))
    assert pictures_of(m1adgm) == {"latent_space", "confusion_matrix"}
    with pytest.raises(NotImplementedError, match="M1ADGM generates M1 latents"):
        m1adgm.sample(torch.arange(K))


def test_m1adgm_fit_resume_test_predict_and_export_through_ssvae(tmp_path: Path, cli_data: Path,
                                                                vae_checkpoint: Path) -> None:
    """configs/mnist/m1adgm.yaml, tiny, on a VAE checkpoint: fit, resume, test, predict and export; the
    checkpoint carries M1's encoder, so test needs no VAE file; without a VAE, one line naming the setting."""
    common = ["-c", str(REPO / "configs" / "mnist" / "m1adgm.yaml"), *data_args(cli_data), *TINY_ARGS,
              "--model.init_args.m1_active_threshold", "0"]
    ckpt = every_subcommand(tmp_path, "m1adgm", common, ("--model.init_args.vae_checkpoint", str(vae_checkpoint)))
    refused = ssvae_here(tmp_path, "test", "-c", str(REPO / "configs" / "mnist" / "m1m2.yaml"), *data_args(cli_data),
                         "--ckpt_path", str(ckpt))  # M1+M2's config: one line naming the checkpoint's model
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0, refused.stderr
    assert "holds a M1ADGM" in refused.stderr
    refused = ssvae_here(tmp_path / "export", "fit", *common, *QUICK)
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0, refused.stderr
    assert "model.vae_checkpoint" in refused.stderr


def test_a_fit_from_another_runs_checkpoint_refuses_model_settings_it_would_drop(tmp_path: Path, cli_data: Path) -> None:
    """`ssvae fit --ckpt_path <file>` restores the checkpoint's model settings (Lightning puts its hyperparameters over
    the config's), so a model setting given with it that differs from the checkpoint's would be silently dropped:
    one error line naming the key and both values, no run folder written; the same settings resume."""
    common = ["-c", str(REPO / "configs" / "mnist" / "adgm.yaml"), *data_args(cli_data), *TINY_ARGS, *QUICK]
    ok(ssvae_here(tmp_path, "fit", *common, "--trainer.max_epochs", "1"))
    ckpt = tmp_path / "lightning_logs" / "adgm" / "version_0" / "checkpoints" / "last.ckpt"
    refused = ssvae_here(tmp_path, "fit", *common, "--trainer.max_epochs", "2", "--ckpt_path", str(ckpt),
                         "--trainer.logger.init_args.version", "changed", "--model.init_args.samples", "3")
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0, refused.stderr
    assert "model.init_args.samples" in refused.stderr and "3" in refused.stderr and "1" in refused.stderr
    assert not (tmp_path / "lightning_logs" / "adgm" / "changed").exists()
    ok(ssvae_here(tmp_path, "fit", *common, "--trainer.max_epochs", "2", "--ckpt_path", str(ckpt),
                  "--trainer.logger.init_args.version", "same"))
