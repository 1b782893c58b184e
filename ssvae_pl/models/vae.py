"""M1, stage one: a VAE trained on all images by maximising the ELBO (SSDGM section 2.1, "latent-feature
discriminative model")."""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import pytorch_lightning as pl
import torch

from ssvae_pl import elbo
from ssvae_pl.errors import CheckpointError, ConfigError
from ssvae_pl.host import check_cuda_once
from ssvae_pl.prediction import check_data_settings
from ssvae_pl.schedule import budget_progress, has_budget
from ssvae_pl.models.declares import Declares
from ssvae_pl.models.compiling import CompileSetting, check_compile, check_compile_can_train, compiled, fitting
from ssvae_pl.models.inputs import unit_images
from ssvae_pl.models.step_scalars import StepScalars
from ssvae_pl.nets import Activation, BernoulliDecoder, DiscretizedLogisticDecoder, GaussianEncoder

# The hyperparameters that fix the encoder's shape: what a frozen copy of it needs to be rebuilt.
ENCODER_HPARAMS = ("input_shape", "hidden_dims", "latent_dim", "activation", "min_std", "conv_channels")
# A latent dimension is active (in use) when its posterior mean varies across images with a standard deviation above
# this (Burda et al. 2016's variance of 0.01; the SSDGM code's 0.1).
ACTIVE_UNIT_STD = 0.1


class FrozenEncoder(GaussianEncoder):
    """M1's encoder as a fixed feature map inside another model: no gradients (so DDP never registers it), and eval
    mode whatever its parent asks (Lightning switches the whole model to train mode every epoch).

    ``active_dims`` (a buffer of indices, kept in the checkpoint) lists the latent dimensions it hands on: M1's
    active units for M1+M2 (``active_dims``), every dimension otherwise. ``posterior`` and ``latents`` return those
    dimensions only, as vectors of that size.
    """

    def __init__(self, *args: Any, active_dims: Sequence[int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        dims = range(self.latent_dim) if active_dims is None else active_dims
        self.register_buffer("active_dims", torch.as_tensor(list(dims), dtype=torch.int64))
        self.requires_grad_(False)
        self.eval()

    @property
    def out_dim(self) -> int:
        return len(self.active_dims)

    def train(self, mode: bool = True) -> FrozenEncoder:
        return super().train(False)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of q(z1|x) in the handed-on dimensions, for images x (floats in [0, 1]): (B, A) each."""
        mean, std = self(x)
        return mean[:, self.active_dims], std[:, self.active_dims]

    def latents(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """z1 for images x: the posterior mean, or a draw from q(z1|x) (``sample``): (B, A)."""
        mean, std = self.posterior(x)
        return elbo.reparameterize(mean, std) if sample else mean


def active_dims(latent_mean_std: torch.Tensor, threshold: float) -> list[int]:
    """M1's active units (Burda et al. 2016): the dimensions whose posterior mean varies across images with a
    standard deviation above ``threshold``; 0 keeps them all."""
    if threshold <= 0:
        return list(range(len(latent_mean_std)))
    return torch.nonzero(latent_mean_std > threshold).flatten().tolist()


def build_encoder(input_shape: Sequence[int], hidden_dims: Sequence[int], latent_dim: int, activation: Activation,
                  min_std: float, conv_channels: Sequence[int] = (), frozen: bool = False,
                  active_dims: Sequence[int] | None = None) -> GaussianEncoder:
    shape = dict(conv_channels=list(conv_channels), input_shape=input_shape)
    if frozen:
        return FrozenEncoder(math.prod(input_shape), hidden_dims, latent_dim, activation, min_std,
                             active_dims=active_dims, **shape)
    return GaussianEncoder(math.prod(input_shape), hidden_dims, latent_dim, activation, min_std, **shape)


class VAE(Declares, pl.LightningModule):
    """Gaussian encoder q(z|x), decoder p(x|z), prior p(z) = N(0, I); MLPs (the paper's), or convolutional.

    The defaults are configs/mnist/m1_vae.yaml's model (the paper's M1), and ``configure_optimizers`` its Adam; train
    it on ``binarize="dynamic"`` data, as that config does. The methods that take images (``forward``,
    ``latent_means``, ``reconstruct``, ``predict_step``) take floats in [0, 1] or the data module's uint8 batches.

    Args:
        input_shape: (C, H, W) of the images; linked from the data module.
        num_classes: linked from the data module; the VAE does not use labels, but records them.
        hidden_dims: hidden widths of the encoder; the decoder mirrors them. The paper: [600, 600]. With
            ``conv_channels``, the dense layers after the conv trunk (before the transposed convolutions).
        latent_dim: size of z. The paper: 50.
        activation: hidden non-linearity. The paper: softplus.
        min_std: added to softplus(.) so the encoder's standard deviation is never zero.
        conv_channels: ``[]`` (the default): MLPs on the pixels, the paper's. Else the output channels of the
            encoder's Conv2d layers (kernel 4, stride 2, padding 1, each halving the image: e.g. [32, 64] takes
            28x28 to 7x7 and 32x32 to 8x8), mirrored by the decoder's ConvTranspose2d layers. The image's height
            and width must be multiples of 2^len(conv_channels).
        likelihood: p(x|z). ``bernoulli`` (the paper's) for binarised images. ``discretized_logistic`` for 8-bit
            grey or colour images in [0, 1] (use them unbinarised): Bernoulli is no likelihood of 8-bit
            intensities and a Gaussian density on discrete data is unbounded, while the discretised logistic
            (``elbo.discretized_logistic_log_likelihood``) is a probability mass on the 256 levels, so the ELBO
            is a true bound in nats; ``val/bits_per_dim`` and ``test/bits_per_dim`` are logged with it.
        class_names: the classes' names, in label order; linked from the data module and kept in the checkpoint, so
            that ``ssvae predict`` writes them (an image folder's sub-folder names). ``None``: ``0`` ... ``K-1``.
        compile: ``torch.compile`` the training loss: ``true``, a mode (``reduce-overhead``: CUDA graphs on a
            GPU) or a backend's name (``ssvae_pl.models.compiling``); off by default. The checkpoint does not
            depend on it.
        kl_warmup_epochs: KL warm-up (deterministic annealing; Bowman et al. 2016, Sonderby et al. 2016): the
            training loss weighs the KL term by beta, rising linearly from 0 to 1 over this many epochs (step by
            step), then the true ELBO. Early on the encoder is free to use its latent dimensions before the KL
            term prunes them. 0 (the paper's, and the default): no warm-up, or the one ``kl_warmup_fraction`` sets.
            Validation and test always report the true ELBO; ``train/kl_weight`` logs beta.
        kl_warmup_fraction: the same warm-up over this share of the run's budget (``budget_progress``: its
            ``max_time``, ``max_steps`` or ``max_epochs``, whichever ends it first), so that a run stopped by time
            warms up over the same part of it on a fast machine as on a slow one; the default is
            configs/mnist/m1_vae.yaml's 0.5. ``kl_warmup_epochs`` above 0 takes its place; 0: no warm-up.

    ``val/active_units`` counts the latent dimensions whose posterior mean has a standard deviation above
    ``ACTIVE_UNIT_STD`` across the validation images (Burda et al. 2016): the ones the model uses. The standard
    deviations are kept in the checkpoint (``latent_mean_std``); M1+M2 models the dimensions above its
    ``m1_active_threshold``.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        hidden_dims: Sequence[int] = (600, 600),
        latent_dim: int = 50,
        activation: Activation = "softplus",
        min_std: float = 1e-4,
        compile: CompileSetting = False,
        class_names: Sequence[str] | None = None,
        conv_channels: Sequence[int] = (),
        likelihood: Literal["bernoulli", "discretized_logistic"] = "bernoulli",
        kl_warmup_epochs: float = 0.0,
        kl_warmup_fraction: float = 0.5,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not 0 <= kl_warmup_epochs < float("inf"):
            raise ConfigError(f"model.kl_warmup_epochs must be >= 0 (0: no warm-up), got {kl_warmup_epochs}.")
        if not 0 <= kl_warmup_fraction <= 1:
            raise ConfigError(f"model.kl_warmup_fraction must be in [0, 1] (a share of the run's budget; 0: no "
                              f"warm-up), got {kl_warmup_fraction}.")
        if likelihood not in ("bernoulli", "discretized_logistic"):
            raise ConfigError(f"model.likelihood={likelihood!r} is not 'bernoulli' or 'discretized_logistic'.")
        self.likelihood = likelihood
        conv_channels = list(conv_channels)
        self.encoder = build_encoder(input_shape, hidden_dims, latent_dim, activation, min_std, conv_channels)
        decoder_class = BernoulliDecoder if likelihood == "bernoulli" else DiscretizedLogisticDecoder
        self.decoder = decoder_class(latent_dim, list(reversed(hidden_dims)), input_shape, activation, conv_channels)
        # the standard deviation of each latent dimension's posterior mean over the validation images, measured at
        # every validation (zeros until then): which dimensions the model uses, for M1+M2's active_dims
        self.register_buffer("latent_mean_std", torch.zeros(latent_dim))
        check_compile(compile)
        self._training_terms = compiled(self.forward, compile)
        self._validation_terms = compiled(self.evaluation_terms, compile)
        self._step_scalars = StepScalars(progress_bar="train/elbo")

    def log_likelihood(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x|z) per example: (B,)."""
        if self.likelihood == "bernoulli":
            return elbo.bernoulli_log_likelihood(self.decoder(z), x)
        mean, log_scale = self.decoder(z)
        return elbo.discretized_logistic_log_likelihood(mean, log_scale, x)

    def decode_mean(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] decoded from z: the Bernoulli means, or the logistics' means (clamped)."""
        if self.likelihood == "bernoulli":
            return torch.sigmoid(self.decoder(z).float())
        return elbo.discretized_logistic_image(self.decoder(z)[0])

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-example terms of the bound for a batch of images (B, C, H, W), floats in [0, 1] or the loaders' uint8
        (``unit_images``): each value has shape (B,)."""
        x = unit_images(x)
        return self._bound_terms(x, *self.encoder(x))

    def _bound_terms(self, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> dict[str, torch.Tensor]:
        """The terms of ``forward`` from q(z|x)'s parameters, (B, Z) each."""
        z = elbo.reparameterize(mean, std)
        recon = self.log_likelihood(z, x)
        kl = elbo.kl_standard_normal(mean, std)
        return {"elbo": elbo.elbo(recon, kl), "recon": recon, "kl": kl}

    def evaluation_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The bound's terms of evaluation images (``bits_per_dim`` too for 8-bit images) and ``z_mean``, the
        posterior means (B, Z). With ``compile``, a fit's validations run it compiled (``compiling.fitting``)."""
        x = unit_images(x)
        mean, std = self.encoder(x)
        terms = {**self._bound_terms(x, mean, std), "z_mean": mean}
        if self.likelihood != "bernoulli":
            terms["bits_per_dim"] = elbo.bits_per_dim(terms["elbo"], math.prod(self.hparams.input_shape))
        return terms

    def _log_terms(self, stage: str, terms: dict[str, torch.Tensor]) -> None:
        names = ("elbo", "recon", "kl") if self.likelihood == "bernoulli" else ("elbo", "recon", "kl", "bits_per_dim")
        for name in names:
            self.log(f"{stage}/{name}", terms[name].mean(), prog_bar=name == "elbo", sync_dist=True,
                     batch_size=len(terms[name]))

    def kl_weight(self, batch_idx: int = 0) -> float:
        """beta of the KL warm-up at this training step, at most 1: global step / (kl_warmup_epochs x batches per
        epoch), else the run's budget_progress / kl_warmup_fraction; 1 without warm-up or outside training."""
        epochs, fraction = self.hparams.kl_warmup_epochs, self.hparams.kl_warmup_fraction
        if self._trainer is None or not self.trainer.training:
            return 1.0
        if epochs > 0:
            batches = self.trainer.num_training_batches
            return min(1.0, self.trainer.global_step / (epochs * batches)) if math.isfinite(batches) else 1.0
        return min(1.0, budget_progress(self.trainer, batch_idx) / fraction) if fraction > 0 else 1.0

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        terms = self._training_terms(batch["unlabelled"])  # every training image, labelled or not
        beta = self.kl_weight(batch_idx)
        self._step_scalars.add(self, {f"train/{name}": terms[name] for name in ("elbo", "recon", "kl")},
                               step_only={"train/kl_weight": beta} if beta < 1.0 else None)
        return -terms["elbo"].mean() if beta == 1.0 else -(terms["recon"] - beta * terms["kl"]).mean()

    def on_fit_start(self) -> None:
        check_compile_can_train(self.hparams.compile, self.trainer)
        check_cuda_once()
        if self.hparams.kl_warmup_epochs <= 0 < self.hparams.kl_warmup_fraction and not has_budget(self.trainer):
            raise ConfigError(f"model.kl_warmup_fraction={self.hparams.kl_warmup_fraction} is a share of the run's "
                              "budget, and this run has none: set trainer.max_epochs, max_steps or max_time, or "
                              "warm up over model.kl_warmup_epochs instead.")

    def on_train_epoch_end(self) -> None:
        self._step_scalars.log_epoch(self)

    def on_validation_epoch_start(self) -> None:
        self._mean_moments = torch.zeros(3, self.hparams.latent_dim, dtype=torch.float64, device=self.device)

    def validation_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        """The bound's terms logged, the moments of the posterior means added up; returns those means (B, Z) as
        ``z_mean`` (for ``LatentProbe``'s vote)."""
        terms = (self._validation_terms if fitting(self) else self.evaluation_terms)(batch[0])
        self._log_terms("val", terms)
        mean = terms["z_mean"].detach().double()  # (B, Z): count, sum and sum of squares per dimension
        self._mean_moments += torch.stack([torch.ones_like(mean).sum(0), mean.sum(0), mean.square().sum(0)])
        return {"z_mean": terms["z_mean"].detach()}

    def on_validation_epoch_end(self) -> None:
        count, total, squares = self.all_gather(self._mean_moments).reshape(-1, 3, self.hparams.latent_dim).sum(0)
        if count[0] > 1:
            variance = (squares - total.square() / count) / (count - 1)
            self.latent_mean_std.copy_(variance.clamp_min(0).sqrt())  # the same on every rank
            self.log("val/active_units", (self.latent_mean_std > ACTIVE_UNIT_STD).sum().float())

    def test_step(self, batch, batch_idx: int) -> None:
        self._log_terms("test", self.evaluation_terms(batch[0]))

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        mean, std = self.encoder(unit_images(batch[0]))
        return {"z_mean": mean, "z_std": std, "y": batch[1]}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_data_settings(self, checkpoint)

    def pictures(self) -> frozenset[str]:
        return frozenset({"reconstructions", "prior_samples", "latent_space", "knn_probe"})

    def latent_name(self) -> str:
        return "M1's z, mean of q(z|x)"

    def monitor(self) -> tuple[str, str]:
        return "val/elbo", "max"

    def metrics(self) -> frozenset[str]:
        bits = {"val/bits_per_dim"} if self.likelihood != "bernoulli" else set()
        return frozenset({"val/elbo", "val/recon", "val/kl", "val/active_units", *bits})

    def configure_optimizers(self):
        """Used when no ``optimizer`` is given (a plain ``Trainer``): configs/mnist/m1_vae.yaml's fused Adam at 1e-3."""
        return torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """Images' means in [0, 1] (Bernoulli, or the logistics' clamped) from z ~ p(z): (num_samples, C, H, W)."""
        z = torch.randn(num_samples, self.hparams.latent_dim, device=self.device)
        return self.decode_mean(z)

    @torch.no_grad()
    def latent_means(self, x: torch.Tensor) -> torch.Tensor:
        """The means of q(z|x): (B, Z)."""
        return self.encoder(unit_images(x))[0]

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Images decoded from the means of q(z|x): their means in [0, 1] (B, C, H, W)."""
        return self.decode_mean(self.latent_means(x))


def load_frozen_encoder(path: str, field: str = "model.vae_checkpoint"
                        ) -> tuple[dict[str, torch.Tensor], dict[str, Any], torch.Tensor]:
    """A VAE checkpoint's encoder weights, the hparams that shape the encoder, and its ``latent_mean_std``.

    Raises ``CheckpointError`` naming ``field`` and the file when it is missing, unreadable or not a VAE.
    """
    from ssvae_pl.checkpoint_io import read_checkpoint

    retrain = "train one with `ssvae fit -c configs/mnist/m1_vae.yaml` and pass its checkpoints/last.ckpt"
    ckpt = read_checkpoint(path, field, retrain)
    hparams, state = ckpt.get("hyper_parameters", {}), ckpt["state_dict"]
    class_path = hparams.get("_class_path", "")
    encoder_state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    if (class_path and class_path.rsplit(".", 1)[-1] != "VAE") or not encoder_state \
            or not all(k in hparams for k in ENCODER_HPARAMS) or "latent_mean_std" not in state:
        raise CheckpointError(
            f"{field}: {path} is not a VAE checkpoint (it holds {class_path or 'no VAE hyperparameters'}); {retrain}."
        )
    encoder_hparams = {k: hparams[k] for k in ENCODER_HPARAMS}
    for key in ("input_shape", "hidden_dims", "conv_channels"):
        encoder_hparams[key] = list(encoder_hparams[key] or [])
    return encoder_state, encoder_hparams, state["latent_mean_std"]


def frozen_encoder(vae_checkpoint: str | None, vae_hparams: dict[str, Any] | None, input_shape: Sequence[int],
                   active_threshold: float | None = None) -> tuple[FrozenEncoder, dict[str, Any]]:
    """M1's frozen encoder for a model built on it (the latent classifier, M1+M2), and the hparams that rebuild it.

    Rebuilt from ``vae_hparams`` when that model is restored from its own checkpoint (the weights come with its
    state dict, so the VAE file is not needed), else loaded from ``vae_checkpoint``. With ``active_threshold``
    (M1+M2) it hands on M1's active dimensions only (``active_dims``; recorded in the hparams as ``active_dims``),
    judged by the VAE's ``latent_mean_std``. The VAE must have seen images of ``input_shape``.
    """
    field = "model.vae_checkpoint"
    if vae_hparams is not None:
        _check_input_shape(vae_hparams, input_shape, field)
        encoder = build_encoder(**vae_hparams, frozen=True)
    else:
        state, vae_hparams, spread = load_frozen_encoder(vae_checkpoint, field)
        _check_input_shape(vae_hparams, input_shape, field)
        if active_threshold is not None:
            if active_threshold > 0 and not bool(spread.any()):  # never measured
                raise ConfigError(
                    f"{field}: {vae_checkpoint} carries no measure of which latent dimensions M1 uses (it was fitted "
                    "without validation images); refit it with data.val_size > 0, or keep every dimension with "
                    "--model.init_args.m1_active_threshold 0.")
            vae_hparams["active_dims"] = active_dims(spread, active_threshold)
            if not vae_hparams["active_dims"]:
                raise ConfigError(
                    f"{field}: none of the VAE's {len(spread)} latent dimensions varies across images by more than "
                    f"model.m1_active_threshold={active_threshold} (largest: {spread.max().item():.3g}), so M1+M2 "
                    "has nothing to model; train the VAE longer, or lower model.m1_active_threshold (0 keeps every "
                    "dimension).")
        encoder = build_encoder(**vae_hparams, frozen=True)
        try:
            encoder.load_state_dict({**state, "active_dims": encoder.active_dims})
        except RuntimeError as err:
            raise CheckpointError(f"{field}: {vae_checkpoint} does not match its own hyperparameters: "
                                  f"{str(err)[:200]}") from None
    return encoder, vae_hparams


def _check_input_shape(vae_hparams: dict[str, Any], input_shape: Sequence[int], field: str) -> None:
    if list(vae_hparams["input_shape"]) != list(input_shape):
        raise CheckpointError(
            f"{field}: the VAE was trained on images of shape {tuple(vae_hparams['input_shape'])} "
            f"but the data are {tuple(input_shape)}; use a VAE trained on the same dataset."
        )
