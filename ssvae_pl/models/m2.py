"""M2 and M1+M2 (SSDGM sections 2.2 and 2.3): a generative model of images and their classes, trained on the
labelled and the unlabelled images at once; its inference network q(y|x) is the classifier.

* M2: classifier q(y|x), encoder q(z|x,y), decoder p(x|y,z) (Bernoulli, or a discretised logistic for 8-bit
  images), p(y) uniform, p(z) = N(0, I); MLPs, or with ``conv_channels`` conv trunks under the encoder and
  the classifier (one each) and transposed convolutions atop the decoder.
  An unlabelled image's bound sums over all K classes exactly (eq. 7); the encoder's first (dense) layer sees
  the image (or its conv features) once and the class as a per-class bias, so the K encodings cost one pass
  over the pixels.
* M1+M2 (``vae_checkpoint``): the same model of z1 ~ q(z1|x), the latents of M1's frozen encoder in its active
  dimensions, drawn afresh at every training step from a posterior cached once per fit (``m1_cache``; the
  posterior mean at evaluation), with a Gaussian p(z1|y,z2).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from torchmetrics.classification import MulticlassAccuracy

from ssvae_pl import elbo
from ssvae_pl.errors import ConfigError
from ssvae_pl.host import check_cuda_once
from ssvae_pl.models.compiling import CompileSetting, check_compile, check_compile_can_train, compiled, fitting
from ssvae_pl.models.declares import Declares
from ssvae_pl.models.inputs import unit_images
from ssvae_pl.models.step_scalars import StepScalars
from ssvae_pl.models.vae import ACTIVE_UNIT_STD, frozen_encoder
from ssvae_pl.nets import (
    Activation,
    Classifier,
    ConditionalBernoulliDecoder,
    ConditionalDiscretizedLogisticDecoder,
    ConditionalGaussianDecoder,
    ConditionalGaussianEncoder,
    ImageClassifier,
)
from ssvae_pl.prediction import check_data_settings, class_predictions

ALPHA_PER_DATAPOINT = 0.1  # the paper's alpha = 0.1 * N, "in all experiments" (weighting: dataset)
BATCH_ALPHA_PER_DATAPOINT = 1.0  # the shipped recipe's alpha = N (weighting: batch; configs/mnist/m2.yaml: 50,000)
EVAL_PIECE_VALUES = 2**21  # an eager CPU evaluation's piece: its widest layer over the K classes (_evaluation_piece)


class M2(Declares, pl.LightningModule):
    """SSDGM's M2 (or M1+M2 with ``vae_checkpoint``), fitted by minimising J^alpha (eq. 9).

    The defaults are the shipped recipe, configs/mnist/m2.yaml's model: ``weighting: batch`` with alpha = N, and
    (``configure_optimizers``, for a plain ``Trainer``) Adam at 3e-3. The paper's own objective is one setting away:
    ``weighting="dataset"``, with which alpha defaults to the paper's 0.1 N. The methods that take images
    (``forward``, ``latent_means``, ``reconstruct``, ``analogies``, ``predict_step``) take floats in [0, 1] or the
    data module's uint8 batches.

    ``weighting: dataset``, the paper's objective: the loss of a training step, one labelled batch and one
    unlabelled batch, is the unbiased per-datapoint estimate of J^alpha / N, where N is ``num_train`` and N_l, N_u
    count the labelled and unlabelled training images (the data module's; with ``data.unlabelled: all`` the
    labelled images are among the unlabelled ones):

        loss = N_l/N * mean_l[-L(x, y)] + N_u/N * mean_u[-U(x)] + alpha/N * mean_l[-log q(y|x)]

    with L and U written as bounds (``elbo.labelled_bound``, ``elbo.unlabelled_bound``; the paper's L and U are
    their negatives). With alpha = 0.1 N the classification weight alpha/N is 0.1, so each labelled example's
    -log q(y|x) weighs 0.1 N / N_l times its bound, as in the original code. The labelled images count as what they
    are in the data: with 100 labels, 0.2% of it.

    ``weighting: batch`` (the default) counts every image of the mixed batch once instead (B_l labelled and B_u
    unlabelled images, the labelled ones oversampled by the data module), keeping each labelled example's
    classification weight alpha / N_l relative to its bound (N / N_l with the default alpha: 500 on MNIST with 100
    labels):

        loss = [B_l * mean_l[-L(x, y) + alpha/N_l * -log q(y|x)] + B_u * mean_u[-U(x)]] / (B_l + B_u)

    The decoder then learns from the labels to use y early, which is what decides M2's early accuracy.

    Args:
        input_shape: (C, H, W) of the images; linked from the data module.
        num_classes: K; linked from the data module.
        num_train: N, the training images (labelled ones included) that J^alpha sums over. ``None``: the data
            module's ``num_train``, filled in when fitting starts and then kept in the checkpoint.
        hidden_dims: hidden widths of q(z|x,y); p(x|y,z) mirrors them. The paper (and Pyro): [500]. With
            ``conv_channels``, the dense layers after the conv trunk (before the transposed convolutions).
        classifier_hidden_dims: hidden widths of q(y|x). The paper: [500]. With ``conv_channels``, the dense
            layers after the classifier's own conv trunk.
        latent_dim: size of z. The paper: 50.
        activation: hidden non-linearity. The paper: softplus.
        min_std: added to softplus(.) so every standard deviation (encoder, Gaussian decoder) is positive.
        alpha: weight of the labelled examples' classification term in J^alpha, in the paper's units (a sum
            over the N training images). ``None`` (the default): ``alpha_per_label`` * N_l if that is set, else N
            under ``weighting: batch`` (the shipped recipe; configs/mnist/m2.yaml's 50,000 on MNIST) and 0.1 * N
            under ``weighting: dataset`` (the paper's choice).
        alpha_per_label: used when ``alpha`` is ``None``: alpha = alpha_per_label * N_l, so that each labelled
            example's classification weight relative to its bound (alpha / N_l under ``weighting: batch``) is the
            same at every label budget; a fixed ``alpha`` makes it shrink as labels are added. ``alpha`` wins when
            both are set: a command-line ``--model.init_args.alpha`` overrides a config's ``alpha_per_label``.
        weighting: ``batch`` (the default: every image of the mixed batch once) or ``dataset`` (the paper's
            J^alpha / N); see above.
        likelihood: p(x|y,z): ``bernoulli`` for (binarised) images, M2; ``discretized_logistic`` for 8-bit grey
            or colour images in [0, 1], M2 (not with ``vae_checkpoint``); ``gaussian`` for M1's latents, M1+M2,
            where it requires ``vae_checkpoint``; ``auto`` picks ``bernoulli`` or ``gaussian`` by whether
            ``vae_checkpoint`` is given. Why ``discretized_logistic`` for colour images: they are 8-bit
            intensities, not binary, so a Bernoulli is no likelihood of them, and a continuous Gaussian density on
            discrete data is unbounded; the discretised logistic is a probability mass on the 256 levels, so the
            bounds are true bounds in nats (``val/bits_per_dim``, ``test/bits_per_dim`` are logged with it).
        conv_channels: ``[]`` (the default): MLPs on the pixels, the paper's. Else the output channels of the
            Conv2d layers (kernel 4, stride 2, padding 1, each halving the image: [32, 64] takes 28x28 to 7x7 and
            32x32 to 8x8) of q(z|x,y)'s trunk and of q(y|x)'s own, mirrored by p(x|y,z)'s ConvTranspose2d layers.
            The image's height and width must be multiples of 2^len(conv_channels). For M2 on images only: M1+M2
            takes its convolutions from the VAE (train the VAE with conv_channels).
        vae_checkpoint: checkpoint of a trained ``VAE``: its encoder is loaded and frozen, and M2 models its
            latents (M1+M2). Not needed to test or predict from this model's own checkpoint, which carries it.
        vae_hparams: the frozen encoder's shape, filled in from ``vae_checkpoint``; kept in this model's
            checkpoint so that it stands on its own.
        m1_active_threshold: M1+M2 models only M1's active latent dimensions, as a vector of their number A: those
            whose posterior mean has a standard deviation above this over the VAE's validation images (the VAE's
            ``latent_mean_std``; the paper's code: 0.1 over 1000 training images). The others are the prior's noise
            for every image. 0 keeps them all.
        m1_cache: M1+M2: q(z1|x) of every training image is computed once when fitting starts and held in memory
            (on the GPU when training there), and each step draws z1 afresh from it. An integer S: the posteriors
            of S fixed binarisations of each image, one of them picked at random per step; ``grey``: of the grey
            image; ``off``: M1's encoder runs at every step on the batch as the data module yields it (a fresh
            binarisation under ``data.binarize: dynamic``).
        class_names: the classes' names, in label order; linked from the data module and kept in the checkpoint, so
            that ``ssvae predict`` writes them (an image folder's sub-folder names). ``None``: ``0`` ... ``K-1``.
        compile: ``torch.compile`` the training loss: ``true``, a mode (``reduce-overhead``: CUDA graphs on a
            GPU) or a backend's name (``ssvae_pl.models.compiling``); off by default. The checkpoint does not
            depend on it.
    """

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
        likelihood: Literal["auto", "bernoulli", "gaussian", "discretized_logistic"] = "auto",
        vae_checkpoint: str | None = None,
        vae_hparams: dict[str, Any] | None = None,
        compile: CompileSetting = False,
        class_names: Sequence[str] | None = None,
        conv_channels: Sequence[int] = (),
        m1_active_threshold: float = ACTIVE_UNIT_STD,
        m1_cache: int | Literal["grey", "off"] = "grey",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if num_train is not None and num_train <= 0:
            raise ConfigError(f"model.num_train must be positive, got {num_train}.")
        if alpha is not None and alpha < 0:
            raise ConfigError(f"model.alpha must be >= 0, got {alpha}.")
        if alpha_per_label is not None and not 0 <= alpha_per_label < float("inf"):
            raise ConfigError(f"model.alpha_per_label must be >= 0, got {alpha_per_label}.")
        if m1_cache not in ("grey", "off") and not (isinstance(m1_cache, int) and m1_cache > 0):
            raise ConfigError(f"model.m1_cache must be a positive number of binarised copies, grey or off, got "
                              f"{m1_cache!r}.")
        if not 0 <= m1_active_threshold < float("inf"):
            raise ConfigError(f"model.m1_active_threshold must be >= 0 (0 keeps all of M1's latent dimensions), got "
                              f"{m1_active_threshold}.")
        m1m2 = vae_checkpoint is not None or vae_hparams is not None
        if likelihood == "auto":
            likelihood = "gaussian" if m1m2 else "bernoulli"
        elif likelihood in ("bernoulli", "discretized_logistic") and m1m2:
            raise ConfigError(f"model.likelihood={likelihood!r} cannot model M1's real-valued latents; use "
                              "'gaussian' or 'auto' with model.vae_checkpoint.")
        elif likelihood == "gaussian" and not m1m2:  # what configs/mnist/m1m2.yaml asks for
            raise ConfigError(
                "model.vae_checkpoint is required for M1+M2 (model.likelihood='gaussian' models M1's latents): "
                "pass the VAE's checkpoint, e.g. "
                "--model.vae_checkpoint lightning_logs/m1_vae/version_0/checkpoints/last.ckpt"
            )
        elif likelihood not in ("bernoulli", "gaussian", "discretized_logistic"):
            raise ConfigError(f"model.likelihood={likelihood!r} is not one of 'auto', 'bernoulli', 'gaussian', "
                              "'discretized_logistic'.")
        conv_channels = list(conv_channels)
        if conv_channels and m1m2:
            raise ConfigError("model.init_args.conv_channels applies to images, but M1+M2 models M1's latents; "
                              "leave it empty ([]) and train the VAE with conv_channels instead.")
        self.m1_encoder = None
        if m1m2:
            self.m1_encoder, vae_hparams = frozen_encoder(vae_checkpoint, vae_hparams, input_shape,
                                                          m1_active_threshold)
            self.hparams["vae_hparams"] = vae_hparams  # this checkpoint then stands on its own
            rank_zero_info(f"M1+M2 models {self.m1_encoder.out_dim} of M1's {self.m1_encoder.latent_dim} latent "
                           f"dimensions, those whose posterior mean varies by more than model.m1_active_threshold="
                           f"{m1_active_threshold} over the VAE's validation images.")
        self.likelihood = likelihood
        # what M2 models: the images, or M1's latents
        in_dim = math.prod(input_shape) if self.m1_encoder is None else self.m1_encoder.out_dim
        decoder_dims = list(reversed(list(hidden_dims)))
        conv = dict(conv_channels=conv_channels, input_shape=input_shape) if conv_channels else {}
        self.classifier = Classifier(in_dim, classifier_hidden_dims, num_classes, activation, **conv)
        self.encoder = ConditionalGaussianEncoder(in_dim, num_classes, hidden_dims, latent_dim, activation, min_std,
                                                  **conv)
        if likelihood == "bernoulli":
            self.decoder = ConditionalBernoulliDecoder(latent_dim, num_classes, decoder_dims, input_shape, activation,
                                                       conv_channels)
        elif likelihood == "discretized_logistic":
            self.decoder = ConditionalDiscretizedLogisticDecoder(latent_dim, num_classes, decoder_dims, input_shape,
                                                                 activation, conv_channels)
        else:
            self.decoder = ConditionalGaussianDecoder(latent_dim, num_classes, decoder_dims, in_dim, activation,
                                                      min_std)
        self.log_prior_y = -math.log(num_classes)  # p(y) uniform
        self.num_labelled: int | None = None  # N_l and N_u of the objective: set_data_sizes(), from the data module
        self.num_unlabelled: int | None = None
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        check_compile(compile)
        self._training_loss = compiled(self.loss_terms, compile)
        self._validation_terms = compiled(self.evaluation_terms, compile)  # a fit's validations, not a lone test
        self._step_scalars = StepScalars()

    # ---- the numbers of the objective --------------------------------------------------------------------------

    def set_data_sizes(self, num_labelled: int, num_unlabelled: int, num_train: int | None = None) -> None:
        """N_l and N_u (and N, unless ``num_train`` was given) of J^alpha; ``setup`` takes them from the data
        module when fitting. The data module owns the split, so these numbers are read from it, not configured."""
        if self.hparams.num_train is None:
            self.hparams.num_train = num_train
        self.num_labelled, self.num_unlabelled = num_labelled, num_unlabelled

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and datamodule is not None and hasattr(datamodule, "num_unlabelled"):
            self.set_data_sizes(datamodule.num_labelled, datamodule.num_unlabelled, datamodule.num_train)
        elif stage == "fit" and (self.num_labelled is None or self.hparams.num_train is None):
            raise ConfigError("M2 needs the numbers of labelled and unlabelled training images: fit it with "
                              "SemiSupervisedDataModule, or call model.set_data_sizes(...) first.")

    @property
    def alpha(self) -> float:
        """alpha of J^alpha, in the paper's units: ``model.alpha``, ``model.alpha_per_label`` * N_l, or else N
        (``weighting: batch``) or 0.1 * N (``weighting: dataset``)."""
        if self.hparams.alpha is not None:
            return float(self.hparams.alpha)
        if self.hparams.alpha_per_label is not None:
            return float(self.hparams.alpha_per_label) * self._data_sizes()[0]
        per_datapoint = ALPHA_PER_DATAPOINT if self.hparams.weighting == "dataset" else BATCH_ALPHA_PER_DATAPOINT
        return per_datapoint * self._num_train()

    def _num_train(self) -> int:
        if self.hparams.num_train is None:
            raise RuntimeError("M2.num_train is unknown: fit with the data module or call set_data_sizes() first.")
        return self.hparams.num_train

    def _data_sizes(self) -> tuple[int, int]:
        """(N_l, N_u)."""
        if self.num_labelled is None:
            raise RuntimeError("M2's N_l and N_u are unknown: fit with the data module or call set_data_sizes().")
        return self.num_labelled, self.num_unlabelled

    def objective_weights(self, batch_labelled: int = 1, batch_unlabelled: int = 1) -> tuple[float, float, float]:
        """The weights of mean_l[-L], mean_u[-U] and mean_l[-log q(y|x)] in the loss: (N_l/N, N_u/N, alpha/N) for
        ``weighting: dataset``; for ``batch``, by the batch's sizes B_l and B_u (see the class docstring)."""
        n = self._num_train()
        num_labelled, num_unlabelled = self._data_sizes()
        if self.hparams.weighting == "dataset":
            return num_labelled / n, num_unlabelled / n, self.alpha / n
        w_l = batch_labelled / (batch_labelled + batch_unlabelled)
        return w_l, 1.0 - w_l, w_l * self.alpha / num_labelled

    # ---- the model -----------------------------------------------------------------------------------------------

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What M2 models: the images themselves (floats in [0, 1]; uint8 ones converted by ``unit_images``), or z1
        of M1's frozen encoder (its active dimensions, (B, A)), drawn from q(z1|x) while training and its mean
        otherwise. M1+M2's training batches may hold cached posteriors instead of images (``m1_cache``): rows
        (B, S, 2A) of S copies of [mean, std], one of which is drawn from per image."""
        if self.m1_encoder is None:
            return unit_images(x)
        if x.dim() == 3:  # cached rows of q(z1|x)
            copies = x.shape[1]
            rows = x[:, 0] if copies == 1 else x[torch.arange(len(x), device=x.device),
                                                  torch.randint(copies, (len(x),), device=x.device)]
            mean, std = rows.chunk(2, dim=-1)  # (B, A) each
        else:
            with torch.no_grad():
                mean, std = self.m1_encoder.posterior(unit_images(x))
        return elbo.reparameterize(mean, std) if self.training else mean

    @torch.no_grad()
    def _posterior_rows(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The cache's rows for images x (floats in [0, 1]): [mean, std] of q(z1|x) for the grey images, or for
        ``m1_cache`` fixed binarisations of them drawn with ``generator`` (one seeded per fit, so every rank and
        every resumption draws the same ones): (B, S, 2A)."""
        if self.hparams.m1_cache == "grey":
            return torch.cat(self.m1_encoder.posterior(x), dim=-1).float().unsqueeze(1)
        copies = [torch.bernoulli(x, generator=generator) for _ in range(self.hparams.m1_cache)]
        return torch.stack([torch.cat(self.m1_encoder.posterior(b), dim=-1).float() for b in copies], dim=1)

    def on_fit_start(self) -> None:
        """M1+M2: q(z1|x) of every training image computed once (M1's encoder is frozen) and held by the data
        module in place of the images (``m1_cache``), unless it is ``off``."""
        check_compile_can_train(self.hparams.compile, self.trainer)
        check_cuda_once()
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.m1_encoder is None or self.hparams.m1_cache == "off" \
                or not hasattr(datamodule, "cache_training_features"):
            return
        copies = 1 if self.hparams.m1_cache == "grey" else self.hparams.m1_cache
        rows = functools.partial(self._posterior_rows, generator=torch.Generator(self.device).manual_seed(0))
        datamodule.cache_training_features(rows, copies * 2 * self.m1_encoder.out_dim, self.device,
                                           "model.init_args.m1_cache")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, K) of q(y|x) for images (B, C, H, W), floats in [0, 1] or the loaders' uint8."""
        return self.classifier(self.features(x))

    @staticmethod
    def _sample_z(mean: torch.Tensor, std: torch.Tensor, eps: torch.Tensor | None) -> torch.Tensor:
        return elbo.reparameterize(mean, std) if eps is None else mean + std * eps.to(std)

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
        z = self._sample_z(mean, std, eps)
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
        z = self._sample_z(mean, std, eps)
        y = torch.cat([y_l, torch.arange(k, device=y_l.device).repeat(b_u)])  # (R,)
        decoded = self.decoder(z, y)  # (R, ...), or a pair of them
        decoded_l = _each(decoded, lambda t: t[:b_l])
        decoded_u = _each(decoded, lambda t: t[b_l:].unflatten(0, (b_u, k)))  # (B_u, K, ...)
        log_px = torch.cat([self._likelihood(decoded_l, h_l),  # (B_l,), then (B_u K,) against h_u not copied K times
                            self._likelihood(decoded_u, h_u.unsqueeze(1), batch_dims=2).flatten()])
        bounds = elbo.labelled_bound(log_px, elbo.kl_standard_normal(mean, std), self.log_prior_y)  # (R,)
        return bounds[:b_l], bounds[b_l:].view(b_u, k)

    def loss_terms(self, batch: dict[str, Any], eps_labelled: torch.Tensor | None = None,
                   eps_unlabelled: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-example terms of a training batch and the loss; ``eps_*`` (both or neither) fix the
        reparameterisation noise: (B_l, Z) and (B_u, K, Z). q(y|x) runs once over the labelled and the unlabelled
        images together, and the encoder and the decoder once over all their rows (``mixed_bounds``)."""
        x_l, y_l = batch["labelled"]
        h_l, h_u = self.features(x_l), self.features(batch["unlabelled"])
        logits_l, logits_u = self.classifier(torch.cat([h_l, h_u])).float().split([len(h_l), len(h_u)])
        bound_l, class_bounds = self.mixed_bounds(h_l, y_l, h_u, eps_labelled, eps_unlabelled)  # (B_l,), (B_u, K)
        classification = F.cross_entropy(logits_l, y_l, reduction="none")  # (B_l,) -log q(y|x)
        bound_u = elbo.unlabelled_bound(logits_u.softmax(dim=-1), class_bounds)  # (B_u,)
        w_l, w_u, w_c = self.objective_weights(len(y_l), len(bound_u))
        # J^alpha / N (eq. 9, per datapoint) = [sum_l -L(x,y) + sum_u -U(x) + alpha E_l[-log q(y|x)]] / N,
        # each sum estimated by its batch mean times the number of images it runs over.
        loss = w_l * -bound_l.mean() + w_u * -bound_u.mean() + w_c * classification.mean()
        return {"elbo_labelled": bound_l, "elbo_unlabelled": bound_u, "classification": classification, "loss": loss}

    # ---- Lightning -----------------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        terms = self._training_loss(batch)
        self._step_scalars.add(self, {f"train/{name}": terms[name] for name in
                                      ("elbo_labelled", "elbo_unlabelled", "classification", "loss")})
        return terms["loss"]

    def on_train_epoch_end(self) -> None:
        self._step_scalars.log_epoch(self)

    def _evaluate(self, stage: str, batch, batch_idx: int, metric: MulticlassAccuracy) -> dict[str, torch.Tensor]:
        """Accuracy and the bound of one evaluation batch; returns the predicted classes (for the callbacks)."""
        x, y = batch
        # seeded noise, so that a model's val/elbo does not jitter (evaluation is deterministic)
        generator = torch.Generator().manual_seed(batch_idx)
        eps = torch.randn(len(x), self.hparams.num_classes, self.hparams.latent_dim, generator=generator)
        terms = self._validation_terms if fitting(self) else self.evaluation_terms
        size = self._evaluation_piece(x) if terms == self.evaluation_terms else len(x)  # compiled: whole
        logits, bound = (torch.cat(parts) for parts in zip(*(terms(*piece) for piece in
                                                             zip(x.split(size), eps.to(x.device).split(size)))))
        metric(logits, y)
        self.log(f"{stage}/elbo", bound.mean(), sync_dist=True, batch_size=len(y))
        if self.likelihood == "discretized_logistic":  # a bound on log p(x) of a probability mass: bits/dim
            bits = elbo.bits_per_dim(bound, math.prod(self.hparams.input_shape))
            self.log(f"{stage}/bits_per_dim", bits.mean(), sync_dist=True, batch_size=len(y))
        self.log(f"{stage}/acc", metric, prog_bar=True, batch_size=len(y))
        return {"pred": logits.argmax(dim=-1)}

    def _evaluation_piece(self, x: torch.Tensor) -> int:
        """Images per piece of an eager evaluation batch on a CPU: the widest layer of the K-class bound (the
        decoder's output or a hidden layer) holds at most ``EVAL_PIECE_VALUES`` numbers over all K classes of a
        piece, so that each element-wise pass works on memory the processor keeps cached (MNIST's M2: 250 images;
        docs/why-cpu-kernels.md). On a GPU the whole batch."""
        if x.device.type != "cpu":
            return max(len(x), 1)
        modelled = math.prod(self.hparams.input_shape) if self.m1_encoder is None else self.m1_encoder.out_dim
        widest = max(modelled, *self.hparams.hidden_dims)
        return max(EVAL_PIECE_VALUES // (self.hparams.num_classes * widest), 1)

    def evaluation_terms(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(y|x)'s logits (B, K) and U(x) (B,) of evaluation images x with the noise ``eps`` (B, K, Z). With
        ``compile``, a fit's validations run it compiled (on a CPU 0.6 s against 0.9 s for the eager pieces of
        ``_evaluate``, for MNIST's 10,000 validation images); a test or a prediction, run once, does not wait for
        its compilation."""
        h = self.features(x)
        logits = self.classifier(h)
        return logits, self.unlabelled_bound(h, eps, logits)

    def validation_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._evaluate("val", batch, batch_idx, self.val_acc)

    def test_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._evaluate("test", batch, batch_idx, self.test_acc)

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        return class_predictions(self, batch)

    def image_classifier(self) -> ImageClassifier:
        """q(y|x) as a plain module, images -> logits, sharing this model's weights; for M1+M2 on the posterior
        mean of M1's frozen encoder (what ``forward`` computes in eval mode)."""
        return ImageClassifier(self.classifier, self.m1_encoder)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_data_settings(self, checkpoint)

    def pictures(self) -> frozenset[str]:
        images = {"reconstructions", "class_samples", "analogies"} if self.generates_images else set()
        return frozenset({"latent_space", "confusion_matrix", *images})

    def latent_name(self) -> str:
        return "M1+M2's z2, mean of q(z2|z1,y)" if self.m1_encoder is not None else "M2's z, mean of q(z|x,y)"

    def monitor(self) -> tuple[str, str]:
        return "val/acc", "max"

    def configure_optimizers(self):
        """Used when no ``optimizer`` is given (a plain ``Trainer``): configs/mnist/m2.yaml's fused Adam at 3e-3."""
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=3e-3, betas=(0.95, 0.999),
                                fused=True)

    # ---- generation ----------------------------------------------------------------------------------------------

    @property
    def generates_images(self) -> bool:
        """M2 on images decodes images; M1+M2 decodes M1's latents (it keeps no M1 decoder)."""
        return self.m1_encoder is None

    def _check_generates_images(self) -> None:
        if not self.generates_images:
            raise NotImplementedError(
                "M1+M2 generates M1 latents, not images: decoding them needs M1's decoder, which this model does "
                "not keep (only M1's frozen encoder). Use M2 on images to sample or draw analogies."
            )

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
        self._check_generates_images()
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
        self._check_generates_images()
        h = self.features(x)
        y = self.classifier(h).argmax(dim=-1)  # (B,)
        return self._decode_mean(self.encoder(h, y)[0], y)

    @torch.no_grad()
    def analogies(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Each image's style in every class (SSDGM fig. 1): z, the mean of q(z|x,y) with y given or else
        predicted by q(y|x), decoded with each class y' -> the means of p(x|y',z), (B, K, C, H, W)."""
        self._check_generates_images()
        k = self.hparams.num_classes
        z = self.latent_means(x, y).unsqueeze(1).expand(-1, k, -1)  # (B, K, Z)
        classes = torch.arange(k, device=z.device).expand(len(z), k)  # (B, K)
        return self._decode_mean(z, classes)  # (B, K, C, H, W)


def _each(decoded, fn):
    """``fn`` of a decoder's output, or of each tensor of a pair of them ((mean, std), (mean, log_scale))."""
    return tuple(fn(t) for t in decoded) if isinstance(decoded, tuple) else fn(decoded)
