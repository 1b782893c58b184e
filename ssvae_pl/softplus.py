"""softplus(x) = log(1 + e^x), the networks' activation and the heart of the Bernoulli log-likelihood, computed as
max(x, 0) - log(sigmoid(|x|)) with the gradient sigmoid(x).

Why not ``F.softplus``: PyTorch's CPU kernels of ``softplus`` and ``log1p`` run several times slower than those of
``exp``, ``log`` and ``sigmoid`` on processors that take its AVX512 path (docs/why-cpu-kernels.md). The identity
log(1 + e^x) = max(x, 0) + log(1 + e^-|x|) = max(x, 0) - log(sigmoid(|x|)) needs only the fast kernels, and
sigmoid(|x|) lies in [1/2, 1], so its log is well conditioned: the result is within 1e-6 of the exact value in
float32 (absolutely: e^x below about -17 counts as 0). The gradient comes from one sigmoid, not from autograd's
record of each step. On GPUs ``F.softplus`` is fast and stays.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _forward(x: torch.Tensor) -> torch.Tensor:
    x32 = x.float()  # bf16's 8 bits would round sigmoid(|x|) to 1 for |x| > 6
    return (torch.relu(x32) - torch.log(torch.sigmoid(x32.abs()))).to(x.dtype)


class _Softplus(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return _forward(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x.float()).to(grad.dtype)


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
