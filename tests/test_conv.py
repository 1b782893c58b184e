"""Convolutional networks (``conv_channels``) and the discretised logistic likelihood for 8-bit (colour) images:
shapes for 28x28 grey and 32x32 colour, the enumerated U(x) of a conv M2, the likelihood's normalisation and
gradients, training steps, a conv VAE under M1's latent classifier, export, and the error for a bad size."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ssvae_pl import elbo
from ssvae_pl.errors import ConfigError
from ssvae_pl.models import M1M2, M2, VAE, LatentClassifier
from ssvae_pl.nets import ConditionalGaussianEncoder

K = 10
SHAPES = [(1, 28, 28), (3, 32, 32)]
TINY = dict(hidden_dims=[32], latent_dim=4, conv_channels=[8, 16])
TOL = dict(rtol=1e-5, atol=1e-3)  # float32 sums of up to 3072 sub-pixels, batched convolutions against single ones


def images(n: int, shape=(3, 32, 32), seed: int = 0) -> torch.Tensor:
    """8-bit images in [0, 1]: the levels k/255, with some pixels at 0 and at 1."""
    levels = torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed))
    levels[:, :, 0, 0], levels[:, :, -1, -1] = 0, 255
    return levels.float() / 255


def conv_m2(shape=(3, 32, 32), likelihood: str = "discretized_logistic", **kwargs) -> M2:
    torch.manual_seed(0)
    model = M2(input_shape=shape, classifier_hidden_dims=[16], likelihood=likelihood, **TINY, **kwargs)
    model.set_data_sizes(num_labelled=100, num_unlabelled=500, num_train=500)
    return model


def conv_vae(shape=(3, 32, 32), likelihood: str = "discretized_logistic") -> VAE:
    torch.manual_seed(0)
    return VAE(input_shape=shape, likelihood=likelihood, **TINY)


def save_checkpoint(model, path: Path) -> Path:
    """A checkpoint as ``ssvae fit`` writes it, as far as loading goes: the class path, hparams, state dict."""
    hparams = dict(model.hparams, _class_path=f"ssvae_pl.models.{type(model).__name__}")
    torch.save({"hyper_parameters": hparams, "state_dict": model.state_dict()}, path)
    return path


# ---- shapes ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("likelihood", ["bernoulli", "discretized_logistic"])
def test_conv_vae_shapes(shape, likelihood) -> None:
    vae = conv_vae(shape, likelihood)
    x = images(5, shape)
    mean, std = vae.encoder(x)
    assert mean.shape == std.shape == (5, 4) and (std > 0).all()
    assert vae.encoder.trunk.out_shape == (16, shape[1] // 4, shape[2] // 4)
    decoded = vae.decoder(mean)
    if likelihood == "bernoulli":
        assert decoded.shape == (5, *shape)
    else:
        assert decoded[0].shape == decoded[1].shape == (5, *shape) and (decoded[1] >= -7.0).all()
    terms = vae(x)
    assert all(v.shape == (5,) and torch.isfinite(v).all() for v in terms.values())
    for generated in (vae.sample(3), vae.reconstruct(x)):
        assert generated.shape[1:] == shape and ((generated >= 0) & (generated <= 1)).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("likelihood", ["bernoulli", "discretized_logistic"])
def test_conv_m2_shapes(shape, likelihood) -> None:
    model = conv_m2(shape, likelihood)
    x = images(5, shape)
    assert model.classifier(x).shape == (5, K)
    assert model.classifier.trunk is not model.encoder.trunk  # q(y|x) has a trunk of its own
    mean, std = model.encoder(x, torch.arange(5))
    assert mean.shape == std.shape == (5, 4)
    all_mean, all_std = model.encoder.all_classes(x)
    assert all_mean.shape == all_std.shape == (5, K, 4)
    assert model.class_bounds(x).shape == (5, K)
    assert model.unlabelled_bound(x).shape == (5,)
    samples = model.sample(torch.tensor([0, 7]), num_samples_per_class=3)
    analogies = model.analogies(x)
    assert samples.shape == (6, *shape) and analogies.shape == (5, K, *shape)
    for generated in (samples, analogies, model.reconstruct(x)):
        assert ((generated >= 0) & (generated <= 1)).all()


def test_conv_encoder_runs_the_trunk_once_per_image_for_all_classes() -> None:
    """``all_classes`` runs the conv trunk on the B images once (not B * K times) and equals one class at a time."""
    torch.manual_seed(0)
    encoder = ConditionalGaussianEncoder(3 * 32 * 32, K, [32], 4, conv_channels=[8, 16], input_shape=(3, 32, 32))
    calls = []
    encoder.trunk.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    x = images(6)
    with torch.no_grad():
        all_mean, all_std = encoder.all_classes(x)
        assert calls == [6]
        for c in range(K):
            torch.testing.assert_close(encoder(x, torch.full((6,), c)), (all_mean[:, c], all_std[:, c]))


# ---- M2's enumerated bound -----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, likelihood", [((3, 32, 32), "discretized_logistic"), ((1, 28, 28), "bernoulli")])
def test_conv_m2_enumerated_unlabelled_bound_equals_a_loop_over_classes(shape, likelihood) -> None:
    model = conv_m2(shape, likelihood)
    x = images(3, shape)
    eps = torch.randn(3, K, 4)
    with torch.no_grad():
        enumerated = model.unlabelled_bound(x, eps)
        all_at_once = model.class_bounds(x, eps)
        q = model.classifier(x).softmax(dim=-1)
        loop = torch.zeros(3)
        for i in range(3):
            for y in range(K):
                bound = model.labelled_bound(x[i : i + 1], torch.tensor([y]), eps[i : i + 1, y])
                torch.testing.assert_close(bound[0], all_at_once[i, y], **TOL)
                loop[i] += q[i, y] * bound[0] - q[i, y] * q[i, y].log()
    assert enumerated.dtype == torch.float32
    torch.testing.assert_close(enumerated, loop, **TOL)


# ---- the discretised logistic ----------------------------------------------------------------------------------

# (mean, log_scale) on [-1, 1]: central, off-centre, at the edges, outside the range, very sharp and very broad
EXTREMES = [(0.0, 0.0), (0.3, -3.0), (-1.0, -7.0), (1.0, -7.0), (0.5, -7.0), (0.1234, -6.9), (3.0, -2.0),
            (-5.0, 1.0), (0.0, 5.0)]


def reference_log_prob(x: np.ndarray, mean: float, log_scale: float) -> np.ndarray:
    """The direct formula in float64: differences of sigmoids, the tails at 0 and 255."""
    def sigmoid(t):
        return 1.0 / (1.0 + np.exp(-t))

    s = np.exp(log_scale)
    xp = 2.0 * x - 1.0
    with np.errstate(over="ignore", divide="ignore"):  # far tails: exp overflows, the probability underflows to 0
        upper, lower = sigmoid((xp + 1 / 255 - mean) / s), sigmoid((xp - 1 / 255 - mean) / s)
        prob = np.where(x == 0.0, upper, np.where(x == 1.0, 1.0 - lower, upper - lower))
        return np.log(prob)


@pytest.mark.parametrize("mean, log_scale", EXTREMES)
def test_discretized_logistic_is_a_probability_mass_on_the_256_levels(mean: float, log_scale: float) -> None:
    levels = (torch.arange(256, dtype=torch.float64) / 255).float().view(256, 1)  # each level as one example
    log_prob = elbo.discretized_logistic_log_likelihood(torch.full_like(levels, mean),
                                                        torch.full_like(levels, log_scale), levels)
    assert log_prob.shape == (256,) and log_prob.dtype == torch.float32 and torch.isfinite(log_prob).all()
    assert log_prob.double().exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    expected = reference_log_prob(np.arange(256) / 255, mean, log_scale)
    likely = expected > -30  # where float64's difference of sigmoids is itself accurate
    np.testing.assert_allclose(log_prob.numpy()[likely], expected[likely], rtol=1e-4, atol=1e-4)
    assert (log_prob.numpy()[~likely] < -29).all()


def test_discretized_logistic_sums_sub_pixels_per_example_and_stays_finite_under_bf16() -> None:
    x = images(4, (3, 8, 8))
    mean, log_scale = torch.randn(4, 3, 8, 8), torch.rand(4, 3, 8, 8) * 4 - 6
    per_pixel = torch.stack([elbo.discretized_logistic_log_likelihood(mean[:, c, i, j].reshape(4, 1),
                                                                      log_scale[:, c, i, j].reshape(4, 1),
                                                                      x[:, c, i, j].reshape(4, 1))
                             for c in range(3) for i in range(8) for j in range(8)], dim=1)
    torch.testing.assert_close(elbo.discretized_logistic_log_likelihood(mean, log_scale, x), per_pixel.sum(1))
    low = elbo.discretized_logistic_log_likelihood(mean.bfloat16(), log_scale.bfloat16(), x)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()


@pytest.mark.parametrize("value", [0.0, 1.0, 128 / 255, 1 / 255, 254 / 255])
def test_discretized_logistic_gradients_are_finite(value: float) -> None:
    x = torch.full((len(EXTREMES), 1), value)
    mean = torch.tensor([[m] for m, _ in EXTREMES], requires_grad=True)
    log_scale = torch.tensor([[s] for _, s in EXTREMES], requires_grad=True)
    elbo.discretized_logistic_log_likelihood(mean, log_scale, x).sum().backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(log_scale.grad).all()


def test_bits_per_dim() -> None:
    bound = torch.tensor([-3072 * math.log(2.0) * 4.5])
    torch.testing.assert_close(elbo.bits_per_dim(bound, 3072), torch.tensor([4.5]))
    vae = conv_vae()
    terms = vae.evaluation_terms(images(2))
    torch.testing.assert_close(terms["bits_per_dim"], -terms["elbo"] / (3072 * math.log(2.0)))


# ---- training steps ------------------------------------------------------------------------------------------------

def assert_finite_gradients(model, modules) -> None:
    for name, module in modules:
        grads = [p.grad for p in module.parameters()]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert all(g.abs().sum() > 0 for g in grads), name


def test_a_conv_vae_training_step_with_the_discretized_logistic() -> None:
    vae = conv_vae()
    loss = -vae._training_terms(images(8))["elbo"].mean()  # what training_step returns
    assert torch.isfinite(loss)
    loss.backward()
    assert_finite_gradients(vae, [("encoder", vae.encoder), ("decoder", vae.decoder)])


def test_a_conv_m2_training_step_with_the_discretized_logistic() -> None:
    model = conv_m2()
    batch = {"labelled": (images(4, seed=1), torch.tensor([0, 1, 2, 3])), "unlabelled": images(6, seed=2)}
    terms = model._training_loss(batch)  # what training_step returns as terms["loss"]
    assert torch.isfinite(terms["loss"]) and all(torch.isfinite(v).all() for v in terms.values())
    terms["loss"].backward()
    assert_finite_gradients(model, [("classifier", model.classifier), ("encoder", model.encoder),
                                    ("decoder", model.decoder)])


# ---- M1 on a conv VAE, and export -------------------------------------------------------------------------------

@pytest.fixture
def conv_vae_checkpoint(tmp_path: Path) -> Path:
    vae = conv_vae(likelihood="discretized_logistic")
    return save_checkpoint(vae, tmp_path / "conv_vae.ckpt")


def test_conv_vae_checkpoint_loads_frozen_into_the_latent_classifier(conv_vae_checkpoint: Path) -> None:
    clf = LatentClassifier(vae_checkpoint=str(conv_vae_checkpoint), input_shape=(3, 32, 32), hidden_dims=[16])
    assert clf.hparams.vae_hparams["conv_channels"] == [8, 16]
    assert clf.encoder.trunk is not None
    assert all(not p.requires_grad for p in clf.encoder.parameters())
    clf.train()
    assert clf.classifier.training and not any(m.training for m in clf.encoder.modules())
    state = torch.load(conv_vae_checkpoint, weights_only=True)["state_dict"]
    expected = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    actual = {k: v for k, v in clf.encoder.state_dict().items() if k != "active_dims"}  # FrozenEncoder's own
    assert actual.keys() == expected.keys() and all(torch.equal(actual[k], v) for k, v in expected.items())
    x = images(4)
    assert clf(x).shape == (4, K)
    # rebuilt from its own hparams (the VAE file not needed), as from the classifier's checkpoint
    restored = LatentClassifier(input_shape=(3, 32, 32), hidden_dims=[16], vae_hparams=clf.hparams.vae_hparams)
    restored.load_state_dict(clf.state_dict())
    clf.eval(), restored.eval()
    torch.testing.assert_close(restored(x), clf(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["m2", "m1"])
def test_export_of_a_conv_m2_and_a_conv_m1_classifier(tmp_path: Path, conv_vae_checkpoint: Path, kind: str) -> None:
    """TorchScript and ONNX of q(y|x) with its conv trunk, and of a conv VAE's frozen encoder with its head: each
    checked by export itself against the checkpoint on batches of 1 and 64 colour images."""
    pytest.importorskip("onnxruntime")
    from ssvae_pl.export import TOLERANCE, export_classifier

    if kind == "m2":
        model = conv_m2()
    else:
        model = LatentClassifier(vae_checkpoint=str(conv_vae_checkpoint), input_shape=(3, 32, 32), hidden_dims=[16])
    ckpt = save_checkpoint(model, tmp_path / f"{kind}.ckpt")
    written = export_classifier(str(ckpt), str(tmp_path / "out"))
    assert sorted(written) == ["json", "onnx", "torchscript"] and written.pop("json")[0].is_file()
    assert all(path.is_file() and difference <= TOLERANCE for path, difference in written.values())


# ---- configuration errors --------------------------------------------------------------------------------------

def test_an_image_size_that_the_convolutions_cannot_halve_is_a_config_error(conv_vae_checkpoint: Path) -> None:
    with pytest.raises(ConfigError, match="model.init_args.conv_channels") as err:
        VAE(input_shape=(3, 30, 30), **TINY)
    assert "30x30" in str(err.value) and "multiples of 2^2 = 4" in str(err.value) and "at most 1" in str(err.value)
    with pytest.raises(ConfigError, match=r"28x28.*at most 2 conv layers .*\[8, 16\]"):
        M2(hidden_dims=[8], classifier_hidden_dims=[8], latent_dim=2, conv_channels=[8, 16, 32])
    # M1+M2 models M1's latents: its convolutions and its likelihood are not its own to choose
    with pytest.raises(TypeError, match="conv_channels"):
        M1M2(vae_checkpoint=str(conv_vae_checkpoint), input_shape=(3, 32, 32), conv_channels=[8])
    with pytest.raises(TypeError, match="likelihood"):
        M1M2(vae_checkpoint=str(conv_vae_checkpoint), input_shape=(3, 32, 32), likelihood="discretized_logistic")
    with pytest.raises(ConfigError, match="'gaussian' models M1's latents: that is M1\+M2, class_path ssvae_pl.models.M1M2"):
        M2(input_shape=(3, 32, 32), likelihood="gaussian")
