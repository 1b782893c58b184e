"""M1+M2 (SSDGM section 2.3): M2 on z1 ~ q(z1|x), the latents of M1's frozen VAE encoder in its active
dimensions, with a Gaussian p(z1|y,z2). q(z1|x) of every training image is computed once per fit (``m1_cache``)
and handed to the data module in place of the images; each step draws z1 afresh from it.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from ssvae_pl import elbo
from ssvae_pl.data.batches import free_memory
from ssvae_pl.errors import ConfigError
from ssvae_pl.models.compiling import CompileSetting
from ssvae_pl.models.inputs import unit_images
from ssvae_pl.models.m2 import M2
from ssvae_pl.models.vae import ACTIVE_UNIT_STD, frozen_encoder
from ssvae_pl.nets import Activation, ImageClassifier


class M1M2(M2):
    """M2 (its arguments, less ``likelihood`` and ``conv_channels``) on M1's frozen encoder; configs/mnist/m1m2.yaml.

    Args:
        vae_checkpoint: checkpoint of a trained ``VAE``: its encoder is loaded and frozen. Not needed to test or
            predict from this model's own checkpoint, which carries it.
        vae_hparams: the frozen encoder's shape, filled in from ``vae_checkpoint`` and kept in the checkpoint.
        m1_active_threshold: model only M1's latent dimensions whose posterior mean has a standard deviation above
            this over the VAE's validation images (its ``latent_mean_std``); 0 keeps them all.
        m1_cache: q(z1|x) of the training images, computed once when fitting starts: ``grey`` of the grey images;
            an integer S: of S fixed binarisations of each, one picked per step; ``off``: M1's encoder runs at
            every step on the batch as the data module yields it.
    """

    likelihoods = ("gaussian",)
    generates_images = False  # it keeps M1's encoder, not M1's decoder

    def __init__(
        self,
        vae_checkpoint: str | None = None,
        vae_hparams: dict[str, Any] | None = None,
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
        m1_active_threshold: float = ACTIVE_UNIT_STD,
        m1_cache: int | Literal["grey", "off"] = "grey",
        class_names: Sequence[str] | None = None,
        compile: CompileSetting = "auto",
    ) -> None:
        if vae_checkpoint is None and vae_hparams is None:
            raise ConfigError("model.vae_checkpoint is required for M1+M2: pass the VAE's checkpoint, e.g. "
                              "--model.vae_checkpoint lightning_logs/m1_vae/version_0/checkpoints/last.ckpt")
        if m1_cache not in ("grey", "off") and not (isinstance(m1_cache, int) and m1_cache > 0):
            raise ConfigError(f"model.m1_cache must be a positive number of binarised copies, grey or off, got "
                              f"{m1_cache!r}.")
        if not 0 <= m1_active_threshold < float("inf"):
            raise ConfigError(f"model.m1_active_threshold must be >= 0 (0 keeps all of M1's latent dimensions), got "
                              f"{m1_active_threshold}.")
        super().__init__(input_shape, num_classes, num_train, hidden_dims, classifier_hidden_dims, latent_dim,
                         activation, min_std, alpha, alpha_per_label, weighting, "gaussian", (), class_names, compile)

    def input_stage(self) -> tuple[int, ...]:
        """M1's frozen encoder, from ``vae_checkpoint`` (or rebuilt from ``vae_hparams``); M2 models its A active
        dimensions: (A,)."""
        hp = self.hparams
        self.m1_encoder, hp["vae_hparams"] = frozen_encoder(hp.vae_checkpoint, hp.vae_hparams, hp.input_shape,
                                                            hp.m1_active_threshold)
        rank_zero_info(f"M1+M2 models {self.m1_encoder.out_dim} of M1's {self.m1_encoder.latent_dim} latent "
                       f"dimensions, those whose posterior mean varies by more than model.m1_active_threshold="
                       f"{hp.m1_active_threshold} over the VAE's validation images.")
        return (self.m1_encoder.out_dim,)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """z1 (B, A): drawn from q(z1|x) while training, its mean otherwise. ``x`` is images, or the cache's rows
        (B, S, 2A) of S copies of [mean, std], one of which is drawn from per image."""
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
    def posterior_rows(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The cache's rows for images x (floats in [0, 1]): [mean, std] of q(z1|x) of the grey images, or of
        ``m1_cache`` binarisations drawn with ``generator``: (B, S, 2A)."""
        if self.hparams.m1_cache == "grey":
            return torch.cat(self.m1_encoder.posterior(x), dim=-1).float().unsqueeze(1)
        copies = [torch.bernoulli(x, generator=generator) for _ in range(self.hparams.m1_cache)]
        return torch.stack([torch.cat(self.m1_encoder.posterior(b), dim=-1).float() for b in copies], dim=1)

    def on_fit_start(self) -> None:
        """The cache: q(z1|x) of every training image, computed once (M1's encoder is frozen) and handed to the
        data module in place of the images; the binarisations are seeded per fit, so every rank and resumption
        draws the same ones."""
        from ssvae_pl.data.datamodule import SemiSupervisedDataModule

        super().on_fit_start()
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.hparams.m1_cache == "off" or not isinstance(datamodule, SemiSupervisedDataModule):
            return
        copies = 1 if self.hparams.m1_cache == "grey" else self.hparams.m1_cache
        holder, count = datamodule.holding_device, datamodule.num_training_images
        need, free = count * copies * 2 * self.m1_encoder.out_dim * 4, free_memory(holder)
        if need > free // 2:
            raise ConfigError(
                f"model.init_args.m1_cache: the cache of {count} training images would take {need / 2**30:.2f} GiB, "
                f"more than half of the {free / 2**30:.2f} GiB free on {holder}; lower it, or turn the cache off "
                "with --model.init_args.m1_cache off.")
        generator = torch.Generator(self.device).manual_seed(0)
        rows = [self.posterior_rows(images.to(self.device), generator).to(holder)
                for images in datamodule.training_images()]
        datamodule.use_training_features(torch.cat(rows))

    def image_classifier(self) -> ImageClassifier:
        """q(y|x) on the posterior mean of M1's frozen encoder, images -> logits (what ``forward`` computes in eval
        mode), sharing this model's weights."""
        return ImageClassifier(self.classifier, self.m1_encoder)

    def latent_name(self) -> str:
        return "M1+M2's z2, mean of q(z2|z1,y)"
