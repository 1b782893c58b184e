"""The bounds in ssvae_pl/elbo.py against Monte Carlo estimates and torch.distributions."""

import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Normal, kl_divergence

from ssvae_pl import elbo


def test_closed_form_kl_matches_monte_carlo():
    torch.manual_seed(0)
    mean, std = torch.randn(4, 6), torch.rand(4, 6) * 1.5 + 0.2
    z = mean + std * torch.randn(200_000, 4, 6)  # (S, B, Z) samples of q(z|x)
    log_q = Normal(mean, std).log_prob(z).sum(-1)
    log_p = Normal(0.0, 1.0).log_prob(z).sum(-1)
    monte_carlo = (log_q - log_p).mean(0)  # (B,)
    closed = elbo.kl_standard_normal(mean, std)
    assert closed.shape == (4,)
    torch.testing.assert_close(closed, monte_carlo, atol=0.05, rtol=0.01)
    torch.testing.assert_close(closed, kl_divergence(Normal(mean, std), Normal(0.0, 1.0)).sum(-1))


def test_bernoulli_log_likelihood_sums_pixels_per_example():
    logits = torch.randn(3, 1, 28, 28) * 4
    x = torch.bernoulli(torch.rand(3, 1, 28, 28))
    expected = Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(elbo.bernoulli_log_likelihood(logits, x), expected)


def test_bernoulli_log_likelihood_is_finite_for_extreme_logits_and_bf16():
    logits = torch.tensor([[1e4, -1e4, 0.0]]).to(torch.bfloat16)
    x = torch.tensor([[0.0, 1.0, 1.0]])
    out = elbo.bernoulli_log_likelihood(logits, x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, -F.binary_cross_entropy_with_logits(logits.float(), x, reduction="none").sum(1))


def test_gaussian_log_likelihood_matches_torch_distributions():
    x, mean, std = torch.randn(5, 7), torch.randn(5, 7), torch.rand(5, 7) + 0.1
    torch.testing.assert_close(elbo.gaussian_log_likelihood(x, mean, std), Normal(mean, std).log_prob(x).sum(-1))


def test_categorical_entropy_matches_torch_distributions_and_is_finite_at_zero():
    from torch.distributions import Categorical

    probs = torch.softmax(torch.randn(6, 10) * 3, dim=-1)
    torch.testing.assert_close(elbo.categorical_entropy(probs), Categorical(probs=probs).entropy())
    one_hot = torch.eye(4, requires_grad=True)
    h = elbo.categorical_entropy(one_hot)
    h.sum().backward()
    assert torch.equal(h.detach(), torch.zeros(4)) and torch.isfinite(one_hot.grad).all()


def test_softplus_matches_torch_in_value_and_gradient_in_float32_and_bf16():
    """``ssvae_pl.softplus`` (the activation, the std's link and the Bernoulli likelihood's core): within 1e-6 of
    log(1 + e^x) in float32 over [-40, 40], no worse than ``F.softplus`` in bf16, and its gradient is sigmoid(x);
    under a TorchScript trace it is plain operators."""
    from ssvae_pl.softplus import Softplus, softplus

    x = torch.linspace(-40, 40, 20001).double()  # float32 values, exactly
    exact = torch.log1p(torch.exp(-x.abs())) + x.clamp_min(0)
    x32 = x.float().requires_grad_()
    y = softplus(x32)
    assert y.dtype == torch.float32 and (y.double() - exact).abs().max() < 1e-6
    y.sum().backward()
    assert (x32.grad.double() - torch.sigmoid(x)).abs().max() < 1e-6
    bf16 = x.bfloat16()
    exact = torch.log1p(torch.exp(-bf16.double().abs())) + bf16.double().clamp_min(0)
    assert softplus(bf16).dtype == torch.bfloat16
    assert (softplus(bf16).double() - exact).abs().max() <= (F.softplus(bf16).double() - exact).abs().max() + 1e-6
    graph = str(torch.jit.trace(Softplus(), x32.detach()[:10]).graph)
    assert "aten::sigmoid" in graph and "PythonOp" not in graph
