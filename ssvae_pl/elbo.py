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

from ssvae_pl.softplus import softplus

LOG_2PI = math.log(2.0 * math.pi)
LOG_2 = math.log(2.0)


def _flat32(t: torch.Tensor, batch_dims: int = 1) -> torch.Tensor:
    """``t`` in float32 with its event dimensions (all after the first ``batch_dims``) flattened into one."""
    return t.float().flatten(start_dim=batch_dims)


def reparameterize(mean: torch.Tensor, std: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
    """z = mean + std * eps, eps ~ N(0, I) (AEVB section 2.4); ``eps`` given fixes the noise."""
    return mean + std * (torch.randn_like(std) if eps is None else eps.to(std))


def bernoulli_log_likelihood(logits: torch.Tensor, x: torch.Tensor, batch_dims: int = 1) -> torch.Tensor:
    """log p(x|z) = sum_d [x_d log sigmoid(l_d) + (1 - x_d) log sigmoid(-l_d)] = sum_d [x_d l_d - softplus(l_d)],
    from the logits l for stability. Over the dimensions after the first ``batch_dims``, where ``x`` broadcasts
    against the logits (M2's K classes: logits (B, K, ...) of images (B, 1, ...), no K copies of the images)."""
    logits, x = _flat32(logits, batch_dims), _flat32(x, batch_dims)
    return (x * logits - softplus(logits)).sum(dim=-1)


def gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                            batch_dims: int = 1) -> torch.Tensor:
    """log N(x; mean, diag(std^2)) summed over the dimensions after the first ``batch_dims`` (``x`` broadcasts)."""
    x, mean, std = _flat32(x, batch_dims), _flat32(mean, batch_dims), _flat32(std, batch_dims)
    return (-0.5 * (((x - mean) / std) ** 2 + 2.0 * std.log() + LOG_2PI)).sum(dim=-1)


def discretized_logistic_log_likelihood(mean: torch.Tensor, log_scale: torch.Tensor, x: torch.Tensor,
                                        num_levels: int = 256, batch_dims: int = 1) -> torch.Tensor:
    """log p(x|z) of 8-bit images under one discretised logistic per sub-pixel (PixelCNN++, Salimans et al. 2017;
    IAF, Kingma et al. 2016; no mixture), summed over each example's sub-pixels: (B,). A proper probability mass over
    the levels (unlike a Bernoulli or a density), so the ELBO bounds log p(x) in nats and -ELBO / (D ln 2) is bits/dim.
    ``x`` in [0, 1] on the levels k/255; ``mean`` and ``log_scale``, shaped like ``x``, on the scale x' = 2x - 1.
    With s = exp(log_scale), sigma the logistic sigmoid and h = 1/255 (half the levels' spacing on that scale),
        P(x) = sigma((x' + h - mean)/s) - sigma((x' - h - mean)/s),
    where x = 0 takes the whole lower tail and x = 1 the whole upper tail (the probabilities sum to 1). Computed in
    float32 without cancellation as log sigma(u) + log sigma(-l) + log(1 - exp(-(u - l))), u and l the arguments
    above, 1 - exp(-(u - l)) by one ``expm1``, floored at 1e-12 so a huge scale keeps a finite log-prob and gradient.
    """
    x, mean, log_scale = _flat32(x, batch_dims), _flat32(mean, batch_dims), _flat32(log_scale, batch_dims)
    half_bin = 1.0 / (num_levels - 1)
    x_prime = 2.0 * x - 1.0  # the levels on [-1, 1]
    centred = x_prime - mean
    inv_scale = torch.exp(-log_scale)
    upper = inv_scale * (centred + half_bin)  # the bin's edges, standardised
    lower = inv_scale * (centred - half_bin)
    log_bin = (-torch.expm1(-2.0 * half_bin * inv_scale)).clamp_min(1e-12).log()  # log(1 - exp(-(upper - lower)))
    interior = F.logsigmoid(upper) + F.logsigmoid(-lower) + log_bin
    log_prob = torch.where(x_prime < -1.0 + half_bin, F.logsigmoid(upper),  # x = 0: P(x' <= -1 + 1/255)
                           torch.where(x_prime > 1.0 - half_bin, F.logsigmoid(-lower), interior))  # x = 1: upper tail
    return log_prob.sum(dim=-1)


def discretized_logistic_image(mean: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] from the logistics' means on the [-1, 1] scale: (mean + 1) / 2, clamped."""
    return ((mean.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def bits_per_dim(bound: torch.Tensor, num_dims: int) -> torch.Tensor:
    """A bound on log p(x) in nats per example -> -bound / (D ln 2), bits per sub-pixel (lower is better); an upper
    bound on the negative log-likelihood in bits/dim when the likelihood is a probability mass on the levels."""
    return -bound.float() / (num_dims * LOG_2)


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
