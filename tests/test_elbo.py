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


def _value_and_gradient(fn, x: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_()
    y = fn(x, *args)
    y.sum().backward()
    return y.detach(), x.grad


def test_softplus_keeps_its_derivative_from_the_forward_pass_eager_and_under_compile():
    """The backward pass is one product with sigmoid(x) computed in the forward pass: eagerly from ATen's sigmoid,
    and under torch.compile from the forward's own exponential (e^-|x| / (1 + e^-|x|) for x < 0, so that
    sigmoid(x) keeps its relative accuracy far into the negative tail). Both within 1e-6 of the exact values."""
    from ssvae_pl.softplus import softplus

    x = torch.linspace(-40, 40, 20001).double()
    exact = torch.log1p(torch.exp(-x.abs())) + x.clamp_min(0)
    for fn in (softplus, torch.compile(softplus, backend="aot_eager", fullgraph=True)):
        y, grad = _value_and_gradient(fn, x.float())
        assert (y.double() - exact).abs().max() < 1e-6
        assert (grad.double() - torch.sigmoid(x)).abs().max() < 1e-6
        tail = x < -10  # sigmoid(x) < 5e-5: relative accuracy, not just absolute
        assert ((grad.double()[tail] - torch.sigmoid(x[tail])) / torch.sigmoid(x[tail])).abs().max() < 1e-5


def test_bernoulli_log_likelihood_gradient_is_x_minus_sigmoid_eager_compiled_and_in_bf16():
    """log p(x|z)'s gradient with respect to the logits, x - sigmoid(l), kept from the forward pass: the same as
    autograd's through binary cross-entropy, with the images broadcast over M2's K classes ((B, 1, D) against
    (B, K, D)), eagerly and under torch.compile; with bf16 logits the gradient is bf16 and within bf16's rounding."""
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 1, 28, 28) * 5
    x = torch.rand(4, 1, 1, 28, 28)
    reference = (-F.binary_cross_entropy_with_logits(logits.double(), x.double().expand_as(logits),
                                                     reduction="none")).flatten(2).sum(-1)
    slope = (x.double() - torch.sigmoid(logits.double())).expand_as(logits)
    ll = elbo.bernoulli_log_likelihood
    for fn in (ll, torch.compile(ll, backend="aot_eager", fullgraph=True)):
        value, grad = _value_and_gradient(fn, logits, x, 2)
        assert value.shape == (4, 3) and value.dtype == torch.float32
        torch.testing.assert_close(value.double(), reference, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(grad.double(), slope, rtol=1e-5, atol=1e-6)
        value, grad = _value_and_gradient(fn, logits.bfloat16(), x, 2)
        assert value.dtype == torch.float32 and grad.dtype == torch.bfloat16
        slope16 = x.double() - torch.sigmoid(logits.bfloat16().double())
        torch.testing.assert_close(grad.double(), slope16.expand_as(logits), rtol=1e-2, atol=1e-2)
