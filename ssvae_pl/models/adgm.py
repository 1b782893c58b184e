"""ADGM and SDGM (Maaløe, Sønderby, Sønderby and Winther, "Auxiliary Deep Generative Models", ICML 2016): M2 with an
auxiliary latent a that makes q(y|a,x) and q(z|a,x,y) more expressive, trained on J^alpha (``semi_supervised.py``).

    inference  q(a|x) q(y|a,x) q(z|a,x,y)         generative  ADGM: p(y) p(z) p(x|y,z) p(a|x,y,z)
                                                              SDGM: p(y) p(z) p(a|y,z) p(x|a,y,z)
    L(x, y) = E_q[log p(x|.) + log p(a|.) - log q(a|x)] + log p(y) - KL(q(z|a,x,y) || N(0, I))   (paper eq. 4-5)

An unlabelled image's bound sums exactly over the K classes for each of ``samples`` draws of a (eq. 6); the
classification term is E_q(a|x)[-log q(y|a,x)]. Each Monte Carlo sample is one more row of the batch.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import torch
from torch import nn

from ssvae_pl import elbo
from ssvae_pl.errors import ConfigError
from ssvae_pl.models.compiling import CompileSetting
from ssvae_pl.models.declares import CLASS_IMAGE_PICTURES
from ssvae_pl.models.semi_supervised import SemiSupervised
from ssvae_pl.nets import (
    _ACTIVATIONS,
    Activation,
    Classifier,
    ConditionalBernoulliDecoder,
    ConditionalGaussianDecoder,
    ConditionalGaussianEncoder,
    GaussianEncoder,
    ImageClassifier,
    gaussian_parameters,
    mlp,
    split_class_rows,
)


class AuxiliaryDecoder(nn.Module):
    """p(a|x,y,z) (``x_dim`` > 0, ADGM) or p(a|y,z) (SDGM) = N(mean, diag(std^2)). The first layer is
    W_x x + W_z z + W_y onehot(y) + b, its x part computed once per image (``x_part``) and shared by the K classes."""

    def __init__(self, x_dim: int, latent_dim: int, num_classes: int, hidden_dims: Sequence[int], aux_dim: int,
                 activation: Activation, min_std: float) -> None:
        super().__init__()
        first, self.min_std = hidden_dims[0], min_std
        self.x_layer = nn.Linear(x_dim, first, bias=False) if x_dim else None
        self.z_layer = nn.Linear(latent_dim, first)
        self.class_bias = nn.Parameter(torch.randn(num_classes, first) * (latent_dim + num_classes + x_dim) ** -0.5)
        self.rest = nn.Sequential(_ACTIVATIONS[activation](), mlp(first, hidden_dims[1:], 2 * aux_dim, activation))

    def x_part(self, x: torch.Tensor) -> torch.Tensor | None:
        """W_x x (B, H) of flattened images, or None for SDGM."""
        return None if self.x_layer is None else self.x_layer(x.flatten(1))

    def forward(self, z: torch.Tensor, y: torch.Tensor, x_part: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        pre = self.z_layer(z) + self.class_bias[y]
        return gaussian_parameters(self.rest(pre if x_part is None else pre + x_part), self.min_std)


class AuxiliaryClassifier(nn.Module):
    """q(y|a,x) on a = the mean of q(a|x): images -> logits, free of Lightning (``ssvae export``)."""

    def __init__(self, aux_encoder: GaussianEncoder, classifier: Classifier) -> None:
        super().__init__()
        self.aux_encoder, self.classifier = aux_encoder, classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.classifier(torch.cat([x, self.aux_encoder(x)[0]], dim=-1))


def adgm_networks(shape: Sequence[int], num_classes: int, hidden_dims: Sequence[int], aux_dim: int,
                  latent_dim: int, activation: Activation, min_std: float, skip: bool,
                  likelihood: str) -> dict[str, nn.Module]:
    """The five networks for inputs of ``shape``: images (C, H, W) with a Bernoulli p(x|.), or M1's latents (A,)
    with a Gaussian one (``likelihood``); ``skip`` (SDGM): x decoded from (a, y, z) and a from (y, z)."""
    in_dim, decoder_dims = math.prod(shape), list(reversed(hidden_dims))
    decoder_in = latent_dim + (aux_dim if skip else 0)
    decoder = (ConditionalGaussianDecoder(decoder_in, num_classes, decoder_dims, in_dim, activation, min_std)
               if likelihood == "gaussian" else
               ConditionalBernoulliDecoder(decoder_in, num_classes, decoder_dims, shape, activation))
    return {
        "aux_encoder": GaussianEncoder(in_dim, hidden_dims, aux_dim, activation, min_std),  # q(a|x)
        "classifier": Classifier(in_dim + aux_dim, hidden_dims, num_classes, activation),  # q(y|a,x)
        "encoder": ConditionalGaussianEncoder(in_dim + aux_dim, num_classes, hidden_dims, latent_dim, activation,
                                              min_std),  # q(z|a,x,y)
        "decoder": decoder,  # p(x|.)
        "aux_decoder": AuxiliaryDecoder(0 if skip else in_dim, latent_dim, num_classes, decoder_dims, aux_dim,
                                        activation, min_std),  # p(a|.)
    }


class ADGM(SemiSupervised):
    """The auxiliary deep generative model on (binarised) images; SDGM is ``SDGM`` (the skip variant).

    Args:
        input_shape, num_classes, class_names: linked from the data module.
        num_train, alpha, alpha_per_label, weighting, compile: J^alpha's, as for ``M2``.
        hidden_dims: hidden widths of every network (the decoders mirror them). The paper: [500, 500].
        aux_dim: size of a. The paper: 100.
        latent_dim: size of z. The paper: 100.
        activation: hidden non-linearity (the paper: rectifiers; softplus learns faster here).
        min_std: added to softplus(.) so that every standard deviation is positive.
        samples: Monte Carlo samples of (a, z) per image in training (the paper: 10).
        eval_samples: samples of a per image at validation and test; q(y|a,x) averaged over them.
    """

    skip = False
    likelihood = "bernoulli"  # of p(x|.); "gaussian" on M1's latents (M1ADGM)

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        num_train: int | None = None,
        hidden_dims: Sequence[int] = (500, 500),
        aux_dim: int = 100,
        latent_dim: int = 100,
        activation: Activation = "softplus",
        min_std: float = 1e-4,
        alpha: float | None = None,
        alpha_per_label: float | None = None,
        weighting: Literal["dataset", "batch"] = "batch",
        samples: int = 1,
        eval_samples: int = 1,
        class_names: Sequence[str] | None = None,
        compile: CompileSetting = "auto",
    ) -> None:
        for field, value in (("samples", samples), ("eval_samples", eval_samples), ("aux_dim", aux_dim),
                             ("latent_dim", latent_dim)):
            if value < 1:
                raise ConfigError(f"model.init_args.{field} must be at least 1, got {value}.")
        if not hidden_dims:
            raise ConfigError("model.init_args.hidden_dims needs at least one layer, e.g. [500, 500].")
        super().__init__(num_classes, num_train, alpha, alpha_per_label, weighting, compile)
        self.modelled_shape = self.input_stage()
        for name, net in adgm_networks(self.modelled_shape, num_classes, list(hidden_dims), aux_dim, latent_dim,
                                       activation, min_std, self.skip, self.likelihood).items():
            setattr(self, name, net)
        self.log_prior_y = -math.log(num_classes)

    def _log_px(self, decoded, x: torch.Tensor, batch_dims: int = 1) -> torch.Tensor:
        """log p(x|.) summed over the last dimensions of ``x`` past ``batch_dims``."""
        if self.likelihood == "gaussian":
            return elbo.gaussian_log_likelihood(x, *decoded, batch_dims)
        return elbo.bernoulli_log_likelihood(decoded, x, batch_dims)

    # ---- the bounds ------------------------------------------------------------------------------------------------

    def _aux(self, x: torch.Tensor, eps: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """a ~ q(a|x) and log q(a|x) for flattened images x (N, D): (N, A), (N,)."""
        mean, std = self.aux_encoder(x)
        a = elbo.reparameterize(mean, std, eps)
        return a, elbo.gaussian_log_likelihood(a, mean, std)

    def mixed_bounds(self, x_l: torch.Tensor, y_l: torch.Tensor, x_u: torch.Tensor,
                     eps_a: torch.Tensor | None = None, eps_z: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One draw of a per image and z per (image, class) row: L(x, y) of the labelled images (B_l,), of every
        unlabelled one in every class (B_u, K), and q(y|a,x)'s logits of both. ``eps_a`` (B_l + B_u, A) and
        ``eps_z`` (B_l + B_u K, Z) fix the noise."""
        b_l, b_u, k = len(x_l), len(x_u), self.hparams.num_classes
        x = torch.cat([x_l, x_u]).flatten(1)  # (B, D)
        a, log_q_a = self._aux(x, eps_a)  # (B, A), (B,)
        h = torch.cat([x, a], dim=-1)
        logits = self.classifier(h)  # (B, K)
        mean, std = self.encoder.labelled_and_all_classes(h[:b_l], y_l, h[b_l:])  # (R, Z), R = B_l + B_u K
        z = elbo.reparameterize(mean, std, eps_z)
        rows = torch.cat([torch.arange(b_l, device=x.device), b_l + torch.arange(b_u, device=x.device)
                          .repeat_interleave(k)])  # (R,): the image of each row
        y = torch.cat([y_l, torch.arange(k, device=x.device).repeat(b_u)])  # (R,)
        a_rows = a[rows]
        decoded = self.decoder(torch.cat([z, a_rows], dim=-1) if self.skip else z, y)  # (R, C, H, W) logits
        decoded_l, decoded_u = split_class_rows(decoded, b_l, k)  # (B_l, ...), (B_u, K, ...)
        log_px = torch.cat([self._log_px(decoded_l, x_l),
                            self._log_px(decoded_u, x_u.unsqueeze(1), batch_dims=2).flatten()])  # (R,)
        x_part = self.aux_decoder.x_part(x)
        p_mean, p_std = self.aux_decoder(z, y, None if x_part is None else x_part[rows])
        log_pa = elbo.gaussian_log_likelihood(a_rows, p_mean, p_std)  # (R,)
        bounds = log_px + log_pa - log_q_a[rows] - elbo.kl_standard_normal(mean, std) + self.log_prior_y
        return {"bound_l": bounds[:b_l], "class_bounds": bounds[b_l:].view(b_u, k),
                "logits_l": logits[:b_l], "logits_u": logits[b_l:]}

    def loss_terms(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """J^alpha's terms with ``samples`` draws per image, each draw one more row (``objective``)."""
        x_l, y_l = batch["labelled"]
        x_l, x_u, s = self.features(x_l), self.features(batch["unlabelled"]), self.hparams.samples
        terms = self.mixed_bounds(torch.cat([x_l] * s), y_l.repeat(s), torch.cat([x_u] * s))
        return self.objective(terms["bound_l"], terms["logits_l"], y_l.repeat(s), terms["class_bounds"],
                              terms["logits_u"])

    def evaluation_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        hp, s = self.hparams, self.hparams.eval_samples
        return torch.randn(n, s, hp.aux_dim + hp.num_classes * hp.latent_dim, generator=generator)

    def _sampled_terms(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(y|a,x) (S, B, K) and L(x, y) of every class (S, B, K) for ``eval_samples`` = S draws of a."""
        hp, x = self.hparams, self.features(x)
        n, s = noise.shape[:2]
        eps_a, eps_z = noise.transpose(0, 1).flatten(0, 1).split([hp.aux_dim, hp.num_classes * hp.latent_dim], -1)
        terms = self.mixed_bounds(x[:0], torch.zeros(0, dtype=torch.long, device=x.device), torch.cat([x] * s),
                                  eps_a, eps_z.reshape(-1, hp.latent_dim))
        return terms["logits_u"].float().softmax(-1).view(s, n, -1), terms["class_bounds"].view(s, n, -1)

    def evaluation_terms(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log of q(y|a,x) averaged over ``eval_samples`` draws of a (B, K), and U(x) averaged over them (B,)."""
        q_y, class_bounds = self._sampled_terms(x, noise)
        bound = elbo.unlabelled_bound(q_y.flatten(0, 1), class_bounds.flatten(0, 1)).view(q_y.shape[:2])
        return q_y.mean(0).clamp_min(1e-30).log(), bound.mean(0)

    def bounds_by_class(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log of q(y|a,x) averaged over the draws of a (B, K), and each class's L(x, y) averaged over them (B, K)."""
        q_y, class_bounds = self._sampled_terms(x, noise)
        return q_y.mean(0).clamp_min(1e-30).log(), class_bounds.mean(0)

    # ---- using it --------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, K) of q(y|a,x), a the mean of q(a|x), for images in [0, 1] or the loaders' uint8."""
        return self.classifier_head()(self.features(x))

    def classifier_head(self) -> AuxiliaryClassifier:
        """q(y|a,.) on what the networks model (``features``), a the mean of q(a|.)."""
        return AuxiliaryClassifier(self.aux_encoder, self.classifier)

    def image_classifier(self) -> ImageClassifier:
        """q(y|a,x) as a plain module, images -> logits, sharing this model's weights (to export)."""
        return ImageClassifier(self.classifier_head())

    @torch.no_grad()
    def latent_means(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The means of q(z|a,x,y), a the mean of q(a|x), y given or else predicted: (B, Z)."""
        x = self.features(x).flatten(1)
        h = torch.cat([x, self.aux_encoder(x)[0]], dim=-1)
        y = self.classifier(h).argmax(-1) if y is None else y
        return self.encoder(h, y)[0]

    @torch.no_grad()
    def _decode_mean(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Means of p(x|.) in [0, 1] for z (N, Z) and classes y (N,); SDGM draws a ~ p(a|y,z) first."""
        if self.skip:
            mean, std = self.aux_decoder(z, y, None)
            z = torch.cat([z, mean + std * torch.randn_like(std)], dim=-1)
        return torch.sigmoid(self.decoder(z, y).float())

    @torch.no_grad()
    def sample(self, y: torch.Tensor, num_samples_per_class: int = 1) -> torch.Tensor:
        """Images' means from p(x|.), z ~ p(z), ``num_samples_per_class`` for each class of ``y`` (B,)."""
        y = y.to(self.device).repeat_interleave(num_samples_per_class)
        return self._decode_mean(torch.randn(len(y), self.hparams.latent_dim, device=self.device), y)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Each image decoded from the mean of q(z|a,x,y), y predicted: (B, C, H, W) in [0, 1]."""
        y = self(x).argmax(-1)
        return self._decode_mean(self.latent_means(x, y), y)

    @torch.no_grad()
    def analogies(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Each image's z decoded with every class: (B, K, C, H, W)."""
        k = self.hparams.num_classes
        z = self.latent_means(x, y).repeat_interleave(k, 0)  # (B K, Z)
        classes = torch.arange(k, device=z.device).repeat(len(x))
        return self._decode_mean(z, classes).unflatten(0, (len(x), k))

    def pictures(self) -> frozenset[str]:
        return super().pictures() | CLASS_IMAGE_PICTURES

    def latent_name(self) -> str:
        return f"{type(self).__name__}'s z, mean of q(z|a,x,y)"

    def configure_optimizers(self):
        """Used when no ``optimizer`` is given (a plain ``Trainer``): the configs' Adam at 3e-3 (the paper's 3e-4)."""
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=3e-3, betas=(0.95, 0.999))


class SDGM(ADGM):
    """The skip deep generative model: ADGM's inference model, with p(a|y,z) and p(x|a,y,z)."""

    skip = True
