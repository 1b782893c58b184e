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
    if min(in_dim, out_dim, *hidden_dims) <= 0:
        from ssvae_pl.errors import ConfigError

        raise ConfigError(f"layer widths must be positive: {in_dim} in, hidden {list(hidden_dims)}, {out_dim} out; "
                          "check model.init_args.hidden_dims, classifier_hidden_dims and latent_dim.")
    layers: list[nn.Module] = []
    for width in hidden_dims:
        layers += [nn.Linear(in_dim, width), _ACTIVATIONS[activation]()]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


def gaussian_parameters(output: torch.Tensor, min_std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) from a network's output of 2 * D units: std = softplus(.) + min_std, so it is always positive."""
    mean, raw_std = output.chunk(2, dim=-1)  # (..., D), (..., D)
    return mean, F.softplus(raw_std) + min_std


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
        return gaussian_parameters(self.net(x.flatten(start_dim=1)), self.min_std)  # (B, Z), (B, Z)


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


class ConditionalGaussianEncoder(nn.Module):
    """q(z|x,y) = N(mean(x, y), diag(std(x, y)^2)), std = softplus(.) + min_std (SSDGM M2's encoder).

    The first layer is a Linear on [x, onehot(y)]: ``W_x x + W_y onehot(y) + b``. Its x part ``W_x x + b`` is
    computed once per image and the y part, a per-class bias (the columns ``W_y``), is added per class, so all
    K classes cost one pass over the pixels (``all_classes``).
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        hidden_dims: Sequence[int],
        latent_dim: int,
        activation: Activation = "softplus",
        min_std: float = 1e-4,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.latent_dim = latent_dim
        self.min_std = min_std
        hidden_dims = list(hidden_dims)
        first = hidden_dims[0] if hidden_dims else 2 * latent_dim
        self.input_layer = nn.Linear(in_dim, first)  # W_x and b
        self.class_bias = nn.Parameter(torch.empty(num_classes, first))  # W_y, one row per class
        bound = (in_dim + num_classes) ** -0.5  # nn.Linear's init for the concatenated input
        with torch.no_grad():
            self.input_layer.weight.uniform_(-bound, bound)
            self.input_layer.bias.uniform_(-bound, bound)
            self.class_bias.uniform_(-bound, bound)
        if hidden_dims:
            layers = mlp(first, hidden_dims[1:], 2 * latent_dim, activation)  # checks the activation's name
            self.rest = nn.Sequential(_ACTIVATIONS[activation](), *layers)
        else:  # a single layer: the input layer is the output layer
            self.rest = nn.Identity()

    def _head(self, pre_activation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return gaussian_parameters(self.rest(pre_activation), self.min_std)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), each (B, Z), for classes ``y``: indices (B,) or class weights such as one-hots (B, K)."""
        h = self.input_layer(x.flatten(start_dim=1))  # (B, H)
        y_part = self.class_bias[y] if y.dim() == 1 else y.to(h.dtype) @ self.class_bias  # (B, H)
        return self._head(h + y_part)

    def all_classes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), each (B, K, Z): q(z|x,y) for every class y, the x part computed once per image."""
        h = self.input_layer(x.flatten(start_dim=1))  # (B, H)
        h = h.unsqueeze(1) + self.class_bias  # (B, K, H): the class dimension folded in beside the batch
        mean, std = self._head(h.flatten(0, 1))  # (B*K, Z), (B*K, Z)
        return mean.unflatten(0, h.shape[:2]), std.unflatten(0, h.shape[:2])  # (B, K, Z), (B, K, Z)


class ConditionalBernoulliDecoder(BernoulliDecoder):
    """p(x|y,z) = Bernoulli(sigmoid(logits([z, onehot(y)]))); returns the logits, shaped like the images.

    ``z`` is (..., Z) and ``y`` the class indices (...), so a (B, K, Z) batch of latents with (B, K) classes
    gives (B, K, C, H, W) logits.
    """

    def __init__(
        self,
        latent_dim: int,
        num_classes: int,
        hidden_dims: Sequence[int],
        output_shape: Sequence[int],
        activation: Activation = "softplus",
    ) -> None:
        super().__init__(latent_dim + num_classes, hidden_dims, output_shape, activation)
        self.num_classes = num_classes

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return super().forward(_with_onehot(z, y, self.num_classes))  # (..., C, H, W)


class ConditionalGaussianDecoder(nn.Module):
    """p(x|y,z) = N(mean([z, onehot(y)]), diag(std^2)), std = softplus(.) + min_std: for real-valued x such as
    M1's latents (SSDGM M1+M2). Returns (mean, std), each (..., out_dim)."""

    def __init__(
        self,
        latent_dim: int,
        num_classes: int,
        hidden_dims: Sequence[int],
        out_dim: int,
        activation: Activation = "softplus",
        min_std: float = 1e-4,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.min_std = min_std
        self.net = mlp(latent_dim + num_classes, hidden_dims, 2 * out_dim, activation)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return gaussian_parameters(self.net(_with_onehot(z, y, self.num_classes)), self.min_std)  # (..., D) x 2


def _with_onehot(z: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[z, onehot(y)] for latents (..., Z) and class indices (...)."""
    return torch.cat([z, F.one_hot(y, num_classes).to(z.dtype)], dim=-1)  # (..., Z + K)


class ImageClassifier(nn.Module):
    """Class logits of images (B, C, H, W) -> (B, K), from a trained model's networks, free of Lightning (to
    export): ``head`` on the images, or on the posterior means of a frozen ``encoder`` (M1's) when one is given."""

    def __init__(self, head: Classifier, encoder: GaussianEncoder | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = x if self.encoder is None else self.encoder(x)[0]  # (B, C, H, W) or the means (B, Z)
        return self.head(features)  # (B, K)
