"""M2 (SSDGM section 2.2): a generative model of images and their classes, p(x|y,z) p(y) p(z), whose inference
network q(y|x) is the classifier, trained on labelled and unlabelled images at once (J^alpha, eq. 9, in
``semi_supervised.py``). q(z|x,y) and p(x|y,z) are MLPs, or conv trunks with ``conv_channels``; p(x|y,z) is a
Bernoulli, or a discretised logistic for 8-bit images. The sum over the K classes of an unlabelled image (eq. 7)
is exact and runs as one batch of (image, class) rows (``mixed_bounds``).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import torch

from ssvae_pl import elbo
from ssvae_pl.errors import ConfigError
from ssvae_pl.models.compiling import CompileSetting
from ssvae_pl.models.declares import CLASS_IMAGE_PICTURES
from ssvae_pl.models.semi_supervised import SemiSupervised
from ssvae_pl.nets import (
    Activation,
    Classifier,
    ConditionalBernoulliDecoder,
    ConditionalDiscretizedLogisticDecoder,
    ConditionalGaussianDecoder,
    ConditionalGaussianEncoder,
    ImageClassifier,
    split_class_rows,
)

EVAL_PIECE_VALUES = 2**21  # an eager CPU evaluation's piece: its widest layer over the K classes (evaluation_piece)


def m2_networks(shape: Sequence[int], num_classes: int, hidden_dims: Sequence[int],
                classifier_hidden_dims: Sequence[int], latent_dim: int, activation: Activation, min_std: float,
                likelihood: str, conv_channels: Sequence[int] = ()) -> tuple[Classifier, ConditionalGaussianEncoder,
                                                                             torch.nn.Module]:
    """q(y|x), q(z|x,y) and p(x|y,z) of M2 for inputs of ``shape``: images (C, H, W), or M1's latents (A,) with a
    Gaussian p(x|y,z). The decoder mirrors the encoder's hidden widths (and conv trunk)."""
    in_dim, decoder_dims = math.prod(shape), list(reversed(list(hidden_dims)))
    conv = dict(conv_channels=list(conv_channels), input_shape=shape) if conv_channels else {}
    classifier = Classifier(in_dim, classifier_hidden_dims, num_classes, activation, **conv)
    encoder = ConditionalGaussianEncoder(in_dim, num_classes, hidden_dims, latent_dim, activation, min_std, **conv)
    if likelihood == "gaussian":
        decoder = ConditionalGaussianDecoder(latent_dim, num_classes, decoder_dims, in_dim, activation, min_std)
    else:
        decoder_class = {"bernoulli": ConditionalBernoulliDecoder,
                         "discretized_logistic": ConditionalDiscretizedLogisticDecoder}[likelihood]
        decoder = decoder_class(latent_dim, num_classes, decoder_dims, shape, activation, list(conv_channels))
    return classifier, encoder, decoder


class M2(SemiSupervised):
    """SSDGM's M2 on images; the defaults are configs/mnist/m2.yaml's model (docs/why-m2-recipe.md). The methods
    that take images (``forward``, ``latent_means``, ``reconstruct``, ``analogies``) take floats in [0, 1] or the
    data module's uint8 batches.

    Args:
        input_shape: (C, H, W) of the images; linked from the data module.
        num_classes: K; linked from the data module.
        num_train: N, the training images that J^alpha sums over. ``None``: the data module's, when fitting starts.
        hidden_dims: hidden widths of q(z|x,y); p(x|y,z) mirrors them (after the conv trunk with
            ``conv_channels``). The paper: [500].
        classifier_hidden_dims: hidden widths of q(y|x) (after its own conv trunk). The paper: [500].
        latent_dim: size of z. The paper: 50.
        activation: hidden non-linearity. The paper: softplus.
        min_std: added to softplus(.) so that every standard deviation is positive.
        alpha: weight of the classification term in J^alpha, in the paper's units (a sum over the N training
            images). ``None``: ``alpha_per_label`` * N_l if set, else N (``weighting: batch``) or 0.1 N
            (``weighting: dataset``, the paper's).
        alpha_per_label: alpha = alpha_per_label * N_l, the same weight per label at every label budget.
        weighting: ``batch`` (every image of the mixed batch once) or ``dataset`` (the paper's J^alpha / N).
        likelihood: p(x|y,z): ``bernoulli`` for (binarised) images; ``discretized_logistic`` for 8-bit grey or
            colour images (a probability mass on the 256 levels: the bounds are in nats, and bits/dim are logged).
        conv_channels: ``[]``: MLPs on the pixels (the paper's). Else the channels of the stride-2 Conv2d layers
            (kernel 4) of q(z|x,y)'s and q(y|x)'s trunks, mirrored by p(x|y,z); H and W must be multiples of
            2^len(conv_channels).
        class_names: the classes' names, in label order; linked from the data module, kept in the checkpoint.
        compile: ``torch.compile`` the training loss: ``auto`` (where a compiler is found; the default), ``true``,
            ``false``, a mode or a backend (``models/compiling.py``).
    """

    likelihoods: tuple[str, ...] = ("bernoulli", "discretized_logistic")

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        num_train: int | None = None,
        hidden_dims: Sequence[int] = (500,),
        classifier_hidden_dims: Sequence[int] = (500,),
        latent_dim: int = 50,
        activation: Activation = "softplus",
        min_std: float = 1e-4,
        alpha: float | None = None,
        alpha_per_label: float | None = None,
        weighting: Literal["dataset", "batch"] = "batch",
        likelihood: Literal["bernoulli", "discretized_logistic"] = "bernoulli",
        conv_channels: Sequence[int] = (),
        class_names: Sequence[str] | None = None,
        compile: CompileSetting = "auto",
    ) -> None:
        super().__init__(num_classes, num_train, alpha, alpha_per_label, weighting, compile)
        if likelihood not in self.likelihoods:
            raise ConfigError(f"model.likelihood={likelihood!r} is not one of {', '.join(self.likelihoods)} for "
                              f"{type(self).__name__}" + (" ('gaussian' models M1's latents: that is M1+M2, "
                              "class_path ssvae_pl.models.M1M2)." if likelihood == "gaussian" else "."))
        self.likelihood = likelihood
        self.modelled_shape = self.input_stage()
        self.classifier, self.encoder, self.decoder = m2_networks(
            self.modelled_shape, num_classes, hidden_dims, classifier_hidden_dims, latent_dim, activation, min_std,
            likelihood, conv_channels)
        self.log_prior_y = -math.log(num_classes)  # p(y) uniform

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, K) of q(y|x) for images (B, C, H, W), floats in [0, 1] or the loaders' uint8."""
        return self.classifier(self.features(x))

    def _log_likelihood(self, h: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(h|y,z) per example: h (B, ...), y (B,), z (B, Z) -> (B,)."""
        return self._likelihood(self.decoder(z, y), h)

    def _likelihood(self, decoded, h: torch.Tensor, batch_dims: int = 1) -> torch.Tensor:
        """log p(h|y,z) from the decoder's output (a tensor, or a pair of them), summed over the dimensions after
        the first ``batch_dims``; ``h`` broadcasts against the output."""
        if self.likelihood == "bernoulli":
            return elbo.bernoulli_log_likelihood(decoded, h, batch_dims)
        if self.likelihood == "discretized_logistic":
            mean, log_scale = decoded  # (..., C, H, W) each
            return elbo.discretized_logistic_log_likelihood(mean, log_scale, h, batch_dims=batch_dims)
        mean, std = decoded  # (..., D) each
        return elbo.gaussian_log_likelihood(h, mean, std, batch_dims)  # over M1's active dimensions

    def labelled_bound(self, h: torch.Tensor, y: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """L(x, y) of eq. 6 as a bound, one z sample: h (B, ...), y (B,) -> (B,). ``eps`` (B, Z) fixes the noise."""
        mean, std = self.encoder(h, y)  # (B, Z), (B, Z)
        z = elbo.reparameterize(mean, std, eps)
        return elbo.labelled_bound(self._log_likelihood(h, y, z), elbo.kl_standard_normal(mean, std),
                                   self.log_prior_y)

    def class_bounds(self, h: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """L(x, y) for every class y at once: h (B, ...) -> (B, K). ``eps`` (B, K, Z) fixes the noise. The class
        dimension is folded into the batch (``mixed_bounds`` with no labelled rows)."""
        no_labels = torch.zeros(0, dtype=torch.long, device=h.device)
        no_eps = None if eps is None else eps.new_zeros(0, eps.shape[-1])
        return self.mixed_bounds(h[:0], no_labels, h, no_eps, eps)[1]

    def unlabelled_bound(self, h: torch.Tensor, eps: torch.Tensor | None = None,
                         logits: torch.Tensor | None = None) -> torch.Tensor:
        """U(x) of eq. 7 as a bound, summed exactly over the classes: h (B, ...) -> (B,). Its gradient reaches the
        classifier through q(y|x)."""
        logits = self.classifier(h) if logits is None else logits
        return elbo.unlabelled_bound(logits.float().softmax(dim=-1), self.class_bounds(h, eps))

    def mixed_bounds(self, h_l: torch.Tensor, y_l: torch.Tensor, h_u: torch.Tensor,
                     eps_labelled: torch.Tensor | None = None,
                     eps_unlabelled: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """L(x, y) of the labelled examples (B_l,) and of every unlabelled one in every class (B_u, K) in ONE pass
        of the encoder and the decoder: the B_l labelled rows and the B_u K (image, class) rows stacked as one
        batch, the encoder's image part computed once per image, the likelihood of each image broadcast over its K
        rows (no K copies of the images). The same numbers as ``labelled_bound`` class by class, in a fraction of
        the operator calls (which is what a small model's step costs)."""
        b_l, b_u, k = len(h_l), len(h_u), self.hparams.num_classes
        mean, std = self.encoder.labelled_and_all_classes(h_l, y_l, h_u)  # (R, Z) each, R = B_l + B_u K
        eps = None if eps_labelled is None else torch.cat([eps_labelled, eps_unlabelled.flatten(0, 1)])
        z = elbo.reparameterize(mean, std, eps)
        y = torch.cat([y_l, torch.arange(k, device=y_l.device).repeat(b_u)])  # (R,)
        decoded = self.decoder(z, y)  # (R, ...), or a pair of them
        decoded_l, decoded_u = split_class_rows(decoded, b_l, k)  # (B_l, ...), (B_u, K, ...)
        log_px = torch.cat([self._likelihood(decoded_l, h_l),  # (B_l,), then (B_u K,) against h_u not copied K times
                            self._likelihood(decoded_u, h_u.unsqueeze(1), batch_dims=2).flatten()])
        bounds = elbo.labelled_bound(log_px, elbo.kl_standard_normal(mean, std), self.log_prior_y)  # (R,)
        return bounds[:b_l], bounds[b_l:].view(b_u, k)

    def loss_terms(self, batch: dict[str, Any], eps_labelled: torch.Tensor | None = None,
                   eps_unlabelled: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """J^alpha's terms of a training batch (``objective``); ``eps_*`` (both or neither) fix the noise: (B_l, Z)
        and (B_u, K, Z). q(y|x) runs once over all the images, the encoder and the decoder once over all the rows."""
        x_l, y_l = batch["labelled"]
        h_l, h_u = self.features(x_l), self.features(batch["unlabelled"])
        logits_l, logits_u = self.classifier(torch.cat([h_l, h_u])).split([len(h_l), len(h_u)])
        bound_l, class_bounds = self.mixed_bounds(h_l, y_l, h_u, eps_labelled, eps_unlabelled)  # (B_l,), (B_u, K)
        return self.objective(bound_l, logits_l, y_l, class_bounds, logits_u)

    def evaluation_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(n, self.hparams.num_classes, self.hparams.latent_dim, generator=generator)

    def bounds_by_class(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(y|x)'s logits (B, K) and L(x, y) of every class (B, K) of images x with the noise ``eps`` (B, K, Z)."""
        h = self.features(x)
        return self.classifier(h), self.class_bounds(h, eps)

    def evaluation_piece(self, x: torch.Tensor) -> int:
        """On a CPU, images per piece such that the widest layer of the K-class bound holds at most
        ``EVAL_PIECE_VALUES`` numbers, which the processor keeps cached (docs/why-cpu-kernels.md)."""
        if x.device.type != "cpu":
            return max(len(x), 1)
        widest = max(math.prod(self.modelled_shape), *self.hparams.hidden_dims)
        return max(EVAL_PIECE_VALUES // (self.hparams.num_classes * widest), 1)

    def log_evaluation(self, stage: str, bound: torch.Tensor, batch_size: int) -> None:
        if self.likelihood == "discretized_logistic":  # a bound on log p(x) of a probability mass: bits/dim
            bits = elbo.bits_per_dim(bound, math.prod(self.hparams.input_shape))
            self.log(f"{stage}/bits_per_dim", bits.mean(), sync_dist=True, batch_size=batch_size)

    def classifier_head(self) -> Classifier:
        """q(y|.) on what the networks model (``features``)."""
        return self.classifier

    def image_classifier(self) -> ImageClassifier:
        """q(y|x) as a plain module, images -> logits, sharing this model's weights (to export)."""
        return ImageClassifier(self.classifier_head())

    def pictures(self) -> frozenset[str]:
        return super().pictures() | CLASS_IMAGE_PICTURES

    def latent_name(self) -> str:
        return "M2's z, mean of q(z|x,y)"

    def metrics(self) -> frozenset[str]:
        bits = {"val/bits_per_dim"} if self.likelihood == "discretized_logistic" else set()
        return super().metrics() | bits

    def configure_optimizers(self):
        """Used when no ``optimizer`` is given (a plain ``Trainer``): configs/mnist/m2.yaml's fused Adam at 3e-3."""
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=3e-3, betas=(0.95, 0.999),
                                fused=True)

    # ---- generation ----------------------------------------------------------------------------------------------

    def _decode_mean(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The means of p(x|y,z), images in [0, 1]: z (..., Z), y (...) -> (..., C, H, W). Bernoulli means, or the
        logistics' means clamped to [0, 1]."""
        if self.likelihood == "discretized_logistic":
            return elbo.discretized_logistic_image(self.decoder(z, y)[0])
        return torch.sigmoid(self.decoder(z, y).float())

    @torch.no_grad()
    def sample(self, y: torch.Tensor, num_samples_per_class: int = 1) -> torch.Tensor:
        """Images' means from p(x|y,z) (in [0, 1]), z ~ p(z), ``num_samples_per_class`` for each entry of ``y``
        (class indices (B,)): (B * num_samples_per_class, C, H, W), those of y[0] first."""
        y = y.to(self.device).repeat_interleave(num_samples_per_class)  # (B*S,)
        z = torch.randn(len(y), self.hparams.latent_dim, device=self.device)  # (B*S, Z)
        return self._decode_mean(z, y)

    @torch.no_grad()
    def latent_means(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The means of q(z|x,y), y given or else predicted by q(y|x): (B, Z). In M2, z holds what y does not
        (the style), so the classes should mix in it."""
        h = self.features(x)
        if y is None:
            y = self.classifier(h).argmax(dim=-1)  # (B,)
        return self.encoder(h, y)[0]

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Each image decoded from the mean of q(z|x,y) with y predicted by q(y|x): means in [0, 1] (B, C, H, W)."""
        h = self.features(x)
        y = self.classifier(h).argmax(dim=-1)  # (B,)
        return self._decode_mean(self.encoder(h, y)[0], y)

    @torch.no_grad()
    def analogies(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Each image's style in every class (SSDGM fig. 1): z, the mean of q(z|x,y) with y given or else
        predicted by q(y|x), decoded with each class y' -> the means of p(x|y',z), (B, K, C, H, W)."""
        k = self.hparams.num_classes
        z = self.latent_means(x, y).unsqueeze(1).expand(-1, k, -1)  # (B, K, Z)
        classes = torch.arange(k, device=z.device).expand(len(z), k)  # (B, K)
        return self._decode_mean(z, classes)  # (B, K, C, H, W)

