"""The bounds, as plain functions of tensors.

Every function returns one value per example (shape ``(B,)``): sums run over pixels and latent units,
the mean over the batch is the caller's. All reductions happen in float32, so the bounds stay exact
under ``bf16-mixed`` / ``16-mixed`` autocast.

References: Kingma & Welling (2014), "Auto-Encoding Variational Bayes" (AEVB);
Kingma, Rezende, Mohamed & Welling (2014), "Semi-supervised Learning with Deep Generative Models" (SSDGM).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2.0 * math.pi)


def _flat32(t: torch.Tensor) -> torch.Tensor:
    return t.float().flatten(start_dim=1)


def reparameterize(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """z = mean + std * eps, eps ~ N(0, I) (AEVB section 2.4)."""
    return mean + std * torch.randn_like(std)


def bernoulli_log_likelihood(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x|z) = sum_d [x_d log sigmoid(l_d) + (1 - x_d) log sigmoid(-l_d)], from logits for stability."""
    return -F.binary_cross_entropy_with_logits(_flat32(logits), _flat32(x), reduction="none").sum(dim=1)


def gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, diag(std^2)) summed over dimensions."""
    x, mean, std = _flat32(x), _flat32(mean), _flat32(std)
    return -0.5 * (((x - mean) / std) ** 2 + 2.0 * std.log() + LOG_2PI).sum(dim=1)


def kl_standard_normal(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, diag(std^2)) || N(0, I)) in closed form (AEVB appendix B)."""
    mean, std = _flat32(mean), _flat32(std)
    return 0.5 * (mean.pow(2) + std.pow(2) - 1.0 - 2.0 * std.log()).sum(dim=1)


def elbo(log_likelihood: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
    """ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z)) (AEVB eq. 10), one-sample estimate of the expectation."""
    return log_likelihood - kl


def labelled_bound(log_likelihood: torch.Tensor, kl_z: torch.Tensor, log_prior_y: torch.Tensor | float) -> torch.Tensor:
    """L(x, y) = log p(x|y,z) + log p(y) - KL(q(z|x,y) || p(z)) (SSDGM eq. 6, as a bound: the paper's -L(x, y)).

    Elementwise, so ``(B,)`` terms give ``(B,)`` and ``(B, K)`` terms (one column per class) give ``(B, K)``.
    """
    return log_likelihood.float() + torch.as_tensor(log_prior_y, dtype=torch.float32) - kl_z.float()


def categorical_entropy(probs: torch.Tensor) -> torch.Tensor:
    """H(p) = -sum_k p_k log p_k over the last dimension; the clamp keeps the gradient finite at p_k = 0."""
    probs = probs.float()
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)


def unlabelled_bound(class_probs: torch.Tensor, labelled_bounds: torch.Tensor) -> torch.Tensor:
    """U(x) = sum_y q(y|x) L(x, y) + H(q(y|x)) (SSDGM eq. 7, as a bound), exact over all K classes: (B, K) -> (B,)."""
    probs = class_probs.float()
    return (probs * labelled_bounds.float()).sum(dim=1) + categorical_entropy(probs)
