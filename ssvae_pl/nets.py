"""Plain ``nn.Module`` networks, free of Lightning, so a trained encoder can be frozen inside other models."""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ssvae_pl.softplus import Softplus, softplus

Activation = Literal["softplus", "relu", "tanh", "elu", "gelu"]
_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "softplus": Softplus,  # nn.Softplus's kernel is slow on CPUs (ssvae_pl/softplus.py)
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
    return mean, softplus(raw_std) + min_std


# ---- convolutional networks (``conv_channels``): 28x28 grey and 32x32 colour images --------------------------------

CONV_FIELD = "model.init_args.conv_channels"


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


def conv_output_shape(input_shape: Sequence[int], conv_channels: Sequence[int]) -> tuple[int, int, int]:
    """(C_L, H / 2^L, W / 2^L): what L = len(conv_channels) layers of Conv2d(kernel 4, stride 2, padding 1) make of
    images (C, H, W), each layer halving the height and width (28 -> 14 -> 7, 32 -> 16 -> 8 -> 4). The
    transposed convolutions of a decoder double them back, so H and W must be multiples of 2^L: else a
    ``ConfigError`` naming ``model.init_args.conv_channels``, the size and the fix."""
    from ssvae_pl.errors import ConfigError

    channels = [int(c) for c in conv_channels]
    if len(input_shape) != 3:
        raise ConfigError(f"{CONV_FIELD}={channels} needs images of shape (C, H, W), but the input shape is "
                          f"{tuple(input_shape)}; leave conv_channels empty ([]) for the MLP.")
    if not channels or min(channels) <= 0:
        raise ConfigError(f"{CONV_FIELD} must be a non-empty list of positive channel counts, got {channels}.")
    _, height, width = (int(d) for d in input_shape)
    layers, factor = len(channels), 2 ** len(channels)
    if height % factor or width % factor:
        fits = 0
        while height % 2 ** (fits + 1) == 0 and width % 2 ** (fits + 1) == 0:
            fits += 1
        raise ConfigError(
            f"{CONV_FIELD}={channels}: each of its {layers} layers (kernel 4, stride 2, padding 1) halves the image, "
            f"so the height and width must be multiples of 2^{layers} = {factor}, but the images are "
            f"{height}x{width}; use at most {fits} conv layer{'' if fits == 1 else 's'} (e.g. "
            f"{CONV_FIELD}: {channels[:fits]}) or resize the images to a multiple of {factor}."
        )
    return channels[-1], height // factor, width // factor


def _init_conv(net: nn.Module) -> None:
    """He (Kaiming) normal weights and zero biases for the (transposed) convolutions. PyTorch's default init keeps
    too little of the signal through a stack of stride-2 layers: with it a 3-layer softplus trunk gave features
    that varied by 0.4% across images, and a classifier on them did not fit 200 labelled images in 60 Adam steps."""
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)


class ConvTrunk(nn.Module):
    """Images (B, C, H, W) -> features (B, C_L * H/2^L * W/2^L): Conv2d(kernel 4, stride 2, padding 1) layers of
    ``conv_channels`` output channels, each followed by ``activation``, then flattened. An encoder's or a
    classifier's MLP runs on these features."""

    def __init__(self, input_shape: Sequence[int], conv_channels: Sequence[int],
                 activation: Activation = "softplus") -> None:
        super().__init__()
        self.out_shape = conv_output_shape(input_shape, conv_channels)
        self.out_dim = math.prod(self.out_shape)
        layers: list[nn.Module] = []
        in_channels = int(input_shape[0])
        for width in conv_channels:
            layers += [nn.Conv2d(in_channels, int(width), kernel_size=4, stride=2, padding=1), _activation(activation)]
            in_channels = int(width)
        self.net = nn.Sequential(*layers)
        _init_conv(self.net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(start_dim=1)  # (B, C_L * h * w)


class DeconvHead(nn.Module):
    """The mirror of ``ConvTrunk``, for decoders: features (..., C_L * h * w), the output of a decoder's MLP, ->
    ``activation``, unflattened to (C_L, h, w), then ConvTranspose2d(kernel 4, stride 2, padding 1) layers
    through the reversed ``conv_channels`` to ``output_shape`` (out_channels, H, W); the last layer is linear."""

    def __init__(self, output_shape: Sequence[int], conv_channels: Sequence[int],
                 activation: Activation = "softplus") -> None:
        super().__init__()
        self.in_shape = conv_output_shape(output_shape, conv_channels)  # (C_L, h, w)
        self.in_dim = math.prod(self.in_shape)
        widths = [int(c) for c in reversed(list(conv_channels))][1:] + [int(output_shape[0])]
        layers: list[nn.Module] = [_activation(activation)]
        in_channels = self.in_shape[0]
        for i, width in enumerate(widths):
            layers.append(nn.ConvTranspose2d(in_channels, width, kernel_size=4, stride=2, padding=1))
            if i < len(widths) - 1:
                layers.append(_activation(activation))
            in_channels = width
        self.net = nn.Sequential(*layers)
        _init_conv(self.net)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        lead = h.shape[:-1]  # (B,) or (B, K)
        out = self.net(h.reshape(-1, *self.in_shape))  # (prod(lead), out_channels, H, W)
        return out.reshape(*lead, *out.shape[1:])


def _image_features(in_dim: int, conv_channels: Sequence[int], input_shape: Sequence[int] | None,
                    activation: Activation) -> tuple[ConvTrunk | None, int]:
    """(trunk, its feature count) for ``conv_channels``, or (None, in_dim) for the MLP on the flattened pixels."""
    if not conv_channels:
        return None, in_dim
    if input_shape is None or math.prod(input_shape) != in_dim:
        raise ValueError(f"conv_channels needs the images' input_shape (C, H, W) of {in_dim} values, got {input_shape}")
    trunk = ConvTrunk(input_shape, conv_channels, activation)
    return trunk, trunk.out_dim


class GaussianEncoder(nn.Module):
    """q(z|x) = N(mean(x), diag(std(x)^2)), std = softplus(.) + min_std so it is always positive.

    An MLP on the flattened pixels, or with ``conv_channels`` (and ``input_shape`` (C, H, W)) a ``ConvTrunk``
    followed by the MLP of widths ``hidden_dims``.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dims: Sequence[int],
        latent_dim: int,
        activation: Activation = "softplus",
        min_std: float = 1e-4,
        conv_channels: Sequence[int] = (),
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.min_std = min_std
        self.trunk, features = _image_features(in_dim, conv_channels, input_shape, activation)
        self.net = mlp(features, hidden_dims, 2 * latent_dim, activation)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x.flatten(start_dim=1) if self.trunk is None else self.trunk(x)
        return gaussian_parameters(self.net(h), self.min_std)  # (B, Z), (B, Z)


class BernoulliDecoder(nn.Module):
    """p(x|z) = Bernoulli(sigmoid(logits(z))); returns the logits, shaped like the images.

    An MLP to the pixels, or with ``conv_channels`` the MLP of widths ``hidden_dims`` to (C_L, H/2^L, W/2^L) and
    a ``DeconvHead`` of transposed convolutions back to the images' shape.
    """

    def __init__(
        self,
        latent_dim: int,
        hidden_dims: Sequence[int],
        output_shape: Sequence[int],
        activation: Activation = "softplus",
        conv_channels: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.output_shape = tuple(output_shape)
        if not conv_channels:
            self.deconv = None
            self.net = mlp(latent_dim, hidden_dims, int(torch.tensor(self.output_shape).prod()), activation)
        else:
            deconv = DeconvHead(self.output_shape, conv_channels, activation)
            self.net = mlp(latent_dim, hidden_dims, deconv.in_dim, activation)
            self.deconv = deconv

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.deconv is None:
            return self.net(z).unflatten(-1, self.output_shape)  # (..., C, H, W)
        return self.deconv(self.net(z))  # (..., C, H, W)


class DiscretizedLogisticDecoder(BernoulliDecoder):
    """p(x|z) for 8-bit images: one discretised logistic per sub-pixel (``elbo.discretized_logistic_log_likelihood``),
    its mean and log-scale on the [-1, 1] scale of x' = 2x - 1. The network outputs 2C channels (an MLP, or
    transposed convolutions with ``conv_channels``); returns (mean, log_scale), each (..., C, H, W), the
    log-scale clamped below at ``min_log_scale`` (a scale of exp(-7) ~ 1e-3 is already well under a level's
    width, 2/255)."""

    def __init__(
        self,
        latent_dim: int,
        hidden_dims: Sequence[int],
        output_shape: Sequence[int],
        activation: Activation = "softplus",
        conv_channels: Sequence[int] = (),
        min_log_scale: float = -7.0,
    ) -> None:
        channels, *size = output_shape
        super().__init__(latent_dim, hidden_dims, (2 * channels, *size), activation, conv_channels)
        self.image_shape = tuple(output_shape)
        self.min_log_scale = min_log_scale

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_scale = super().forward(z).chunk(2, dim=-3)  # (..., C, H, W) each
        return mean, log_scale.clamp_min(self.min_log_scale)


class Classifier(nn.Module):
    """Logits of q(y|input); ``hidden_dims=[]`` is multinomial logistic regression. With ``conv_channels`` (and
    ``input_shape``) a ``ConvTrunk`` of its own comes first and ``hidden_dims`` are the MLP layers after it."""

    def __init__(
        self, in_dim: int, hidden_dims: Sequence[int], num_classes: int, activation: Activation = "softplus",
        conv_channels: Sequence[int] = (), input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.trunk, features = _image_features(in_dim, conv_channels, input_shape, activation)
        self.net = mlp(features, hidden_dims, num_classes, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(start_dim=1) if self.trunk is None else self.trunk(x))


class ConditionalGaussianEncoder(nn.Module):
    """q(z|x,y) = N(mean(x, y), diag(std(x, y)^2)), std = softplus(.) + min_std (SSDGM M2's encoder).

    The first layer is a Linear on [x, onehot(y)]: ``W_x x + W_y onehot(y) + b``. Its x part ``W_x x + b`` is
    computed once per image and the y part, a per-class bias (the columns ``W_y``), is added per class, so all
    K classes cost one pass over the pixels (``all_classes``).

    With ``conv_channels`` (and ``input_shape``), x is the output of a ``ConvTrunk``, run once per image, and the
    class enters the same way: as a per-class bias of the first dense layer after the trunk.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        hidden_dims: Sequence[int],
        latent_dim: int,
        activation: Activation = "softplus",
        min_std: float = 1e-4,
        conv_channels: Sequence[int] = (),
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.latent_dim = latent_dim
        self.min_std = min_std
        self.trunk, in_dim = _image_features(in_dim, conv_channels, input_shape, activation)
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

    def _image_part(self, x: torch.Tensor) -> torch.Tensor:
        """W_x x + b of the first dense layer, x the flattened pixels or the trunk's features: (B, H)."""
        return self.input_layer(x.flatten(start_dim=1) if self.trunk is None else self.trunk(x))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), each (B, Z), for classes ``y``: indices (B,) or class weights such as one-hots (B, K)."""
        h = self._image_part(x)  # (B, H)
        y_part = self.class_bias[y] if y.dim() == 1 else y.to(h.dtype) @ self.class_bias  # (B, H)
        return self._head(h + y_part)

    def all_classes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), each (B, K, Z): q(z|x,y) for every class y, the x part computed once per image."""
        no_labels = torch.zeros(0, dtype=torch.long, device=x.device)
        mean, std = self.labelled_and_all_classes(x[:0], no_labels, x)  # (B*K, Z), (B*K, Z)
        shape = (len(x), len(self.class_bias))
        return mean.unflatten(0, shape), std.unflatten(0, shape)  # (B, K, Z), (B, K, Z)

    def labelled_and_all_classes(self, x_l: torch.Tensor, y_l: torch.Tensor,
                                 x_u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), each (B_l + B_u K, Z), in one pass: q(z|x,y) of the B_l images ``x_l`` in their classes
        ``y_l`` (indices), then of the B_u images ``x_u`` in every class (row B_l + i K + y); the x part is
        computed once per image, the class part added to it (its rows of ``class_bias``)."""
        h = self._image_part(torch.cat([x_l, x_u]))  # (B_l + B_u, H)
        b_l = len(x_l)
        pre = torch.cat([h[:b_l] + self.class_bias[y_l],  # (B_l, H)
                         (h[b_l:].unsqueeze(1) + self.class_bias).flatten(0, 1)])  # (B_u K, H)
        return self._head(pre)


class ClassConditional:
    """Mixin that turns a decoder of z into a decoder of (z, y): its network sees [z, onehot(y)]. The base
    decoder's first argument is its input width, here ``latent_dim + num_classes``; the weights keep the base's
    names, so checkpoints do not depend on the mixin. ``z`` is (..., Z) and ``y`` the class indices (...), so a
    (B, K, Z) batch of latents with (B, K) classes decodes to (B, K, ...)."""

    def __init__(self, latent_dim: int, num_classes: int, *args, **kwargs) -> None:
        super().__init__(latent_dim + num_classes, *args, **kwargs)
        self.num_classes = num_classes

    def forward(self, z: torch.Tensor, y: torch.Tensor):
        return super().forward(_with_onehot(z, y, self.num_classes))


class GaussianDecoder(nn.Module):
    """p(x|z) = N(mean(z), diag(std(z)^2)), std = softplus(.) + min_std: for real-valued x such as M1's latents
    (SSDGM M1+M2). Returns (mean, std), each (..., out_dim)."""

    def __init__(
        self,
        latent_dim: int,
        hidden_dims: Sequence[int],
        out_dim: int,
        activation: Activation = "softplus",
        min_std: float = 1e-4,
    ) -> None:
        super().__init__()
        self.min_std = min_std
        self.net = mlp(latent_dim, hidden_dims, 2 * out_dim, activation)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return gaussian_parameters(self.net(z), self.min_std)  # (..., D) x 2


class ConditionalBernoulliDecoder(ClassConditional, BernoulliDecoder):
    """p(x|y,z) = Bernoulli(sigmoid(logits([z, onehot(y)]))); returns the logits (..., C, H, W).
    Arguments: (latent_dim, num_classes, hidden_dims, output_shape, activation, conv_channels)."""


class ConditionalDiscretizedLogisticDecoder(ClassConditional, DiscretizedLogisticDecoder):
    """p(x|y,z) for 8-bit images, a discretised logistic per sub-pixel from [z, onehot(y)]; returns (mean,
    log_scale), each (..., C, H, W) (see ``DiscretizedLogisticDecoder``). Arguments: (latent_dim, num_classes,
    hidden_dims, output_shape, activation, conv_channels, min_log_scale)."""


class ConditionalGaussianDecoder(ClassConditional, GaussianDecoder):
    """p(x|y,z) = N(mean([z, onehot(y)]), diag(std^2)) for M1's latents (M1+M2); returns (mean, std), each
    (..., out_dim). Arguments: (latent_dim, num_classes, hidden_dims, out_dim, activation, min_std)."""


def _with_onehot(z: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[z, onehot(y)] for latents (..., Z) and class indices (...)."""
    return torch.cat([z, F.one_hot(y, num_classes).to(z.dtype)], dim=-1)  # (..., Z + K)


def split_class_rows(decoded, num_labelled: int, num_classes: int):
    """A decoder's output over the rows of ``labelled_and_all_classes`` (a tensor, or a pair of them: (mean, std),
    (mean, log_scale)) split into its B_l labelled rows and its B_u K class rows as (B_u, K, ...)."""
    def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return t[:num_labelled], t[num_labelled:].unflatten(0, ((len(t) - num_labelled) // num_classes, num_classes))

    if isinstance(decoded, tuple):
        labelled, unlabelled = zip(*(split(t) for t in decoded))
        return labelled, unlabelled
    return split(decoded)


class ImageClassifier(nn.Module):
    """Class logits of images (B, C, H, W) -> (B, K), from a trained model's networks, free of Lightning (to
    export): ``head`` on the images, or on the posterior means of a frozen ``encoder`` (M1's) when one is given,
    in the dimensions it hands on (its ``latents``: ``models.vae.FrozenEncoder``)."""

    def __init__(self, head: Classifier, encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.encoder is None:
            return self.head(x)  # (B, K)
        return self.head(self.encoder.latents(x))  # (B, K) from the posterior means (B, A)
