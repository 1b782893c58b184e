"""Plain ``nn.Module`` networks, free of Lightning, so a trained encoder can be frozen inside other models."""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Activation = Literal["softplus", "relu", "tanh", "elu", "gelu"]
_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "softplus": nn.Softplus,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "gelu": nn.GELU,
}


def mlp(in_dim: int, hidden_dims: Sequence[int], out_dim: int, activation: Activation = "softplus") -> nn.Sequential:
    """Linear layers of widths ``hidden_dims`` with ``activation`` between them; the output layer is linear."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {sorted(_ACTIVATIONS)}")
    layers: list[nn.Module] = []
    for width in hidden_dims:
        layers += [nn.Linear(in_dim, width), _ACTIVATIONS[activation]()]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class GaussianEncoder(nn.Module):
    """q(z|x) = N(mean(x), diag(std(x)^2)), std = softplus(.) + min_std so it is always positive."""

    def __init__(
        self,
        in_dim: int,
        hidden_dims: Sequence[int],
        latent_dim: int,
        activation: Activation = "softplus",
        min_std: float = 1e-4,
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.min_std = min_std
        self.net = mlp(in_dim, hidden_dims, 2 * latent_dim, activation)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, raw_std = self.net(x.flatten(start_dim=1)).chunk(2, dim=-1)  # (B, Z), (B, Z)
        return mean, F.softplus(raw_std) + self.min_std


class BernoulliDecoder(nn.Module):
    """p(x|z) = Bernoulli(sigmoid(logits(z))); returns the logits, shaped like the images."""

    def __init__(
        self,
        latent_dim: int,
        hidden_dims: Sequence[int],
        output_shape: Sequence[int],
        activation: Activation = "softplus",
    ) -> None:
        super().__init__()
        self.output_shape = tuple(output_shape)
        self.net = mlp(latent_dim, hidden_dims, int(torch.tensor(self.output_shape).prod()), activation)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).unflatten(-1, self.output_shape)  # (B, C, H, W)


class Classifier(nn.Module):
    """Logits of q(y|input); ``hidden_dims=[]`` is multinomial logistic regression."""

    def __init__(
        self, in_dim: int, hidden_dims: Sequence[int], num_classes: int, activation: Activation = "softplus"
    ) -> None:
        super().__init__()
        self.net = mlp(in_dim, hidden_dims, num_classes, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(start_dim=1))
