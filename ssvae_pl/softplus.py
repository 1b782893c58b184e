"""softplus(x) = log(1 + e^x), the networks' activation and the heart of the Bernoulli log-likelihood, computed as
max(x, 0) - log(sigmoid(|x|)), with its derivative sigmoid(x) computed in the same forward pass.

Why not ``F.softplus``: PyTorch's CPU kernels of ``softplus`` and ``log1p`` run several times slower than those of
``exp``, ``log`` and ``sigmoid`` on processors that take its AVX512 path (about 9 ms against 1 to 2 ms for
600,000 floats on one core of an AMD EPYC); in M1+M2 they took 45% of a training step. The identity
log(1 + e^x) = max(x, 0) + log(1 + e^-|x|) = max(x, 0) - log(sigmoid(|x|)) needs only the fast kernels, and
sigmoid(|x|) lies in [1/2, 1], so its log is well conditioned: the result is within 1e-6 of the exact value in
float32 (absolutely: e^x below about -17 counts as 0). On GPUs ``F.softplus`` is fast and stays.

Why the derivative in the forward pass: the backward pass would otherwise compute sigmoid(x) again, an exponential
and a division per element of every hidden layer (and, in ``elbo.bernoulli_log_likelihood``, of M2's B x K x 784
logits). Under torch.compile the forward pass gets it from its own exponential, fused into the same kernel, and it
is kept in x's dtype (bf16 under autocast, where the gradient that meets it is bf16 anyway) instead of x itself, so
the backward pass is one product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def softplus_and_sigmoid(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softplus(x) and its derivative sigmoid(x), in float32. Under torch.compile with one exponential and one
    division, fused into one kernel: e = exp(-|x|), sigmoid(|x|) = 1 / (1 + e), sigmoid(x) = that or e times it;
    eagerly with ATen's fast ``sigmoid`` and ``log`` kernels."""
    x = x.float()  # bf16's 8 bits would round sigmoid(|x|) to 1 for |x| > 6
    if torch.compiler.is_compiling():
        e = torch.exp(-x.abs())
        s = 1.0 / (1.0 + e)
        return torch.relu(x) - torch.log(s), torch.where(x >= 0, s, e * s)
    return torch.relu(x) - torch.log(torch.sigmoid(x.abs())), torch.sigmoid(x)


def _forward(x: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    return (torch.relu(x32) - torch.log(torch.sigmoid(x32.abs()))).to(x.dtype)


class _Softplus(torch.autograd.Function):
    """softplus with its derivative computed in the forward pass (from the same exponential) and kept in x's dtype:
    the backward pass is one product."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        value, derivative = softplus_and_sigmoid(x)
        ctx.save_for_backward(derivative.to(x.dtype))
        return value.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (saved,) = ctx.saved_tensors
        return (grad * saved).to(grad.dtype)  # in the wider of the two dtypes, one rounding


def softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x), elementwise, in x's dtype. On the CPU: computed in float32, with autograd d/dx = sigmoid(x);
    without gradients (evaluation) and in a TorchScript trace (exports) the same formula as plain operators."""
    if x.device.type != "cpu":  # the GPUs' own kernel is fast, and one launch
        return F.softplus(x)
    if torch.is_grad_enabled() and x.requires_grad and not torch.jit.is_tracing():
        return _Softplus.apply(x)
    return _forward(x)


class Softplus(nn.Module):
    """``softplus`` as a layer, in place of ``nn.Softplus``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return softplus(x)
