"""A family model on M1's latents (SSDGM section 2.3): its networks see z1 ~ q(z1|x) of M1's frozen VAE encoder, in
its active dimensions, in place of the images, with a Gaussian p(z1|.). q(z1|x) of every training image is computed
once per fit (``m1_cache``) and handed to the data module in place of the images; each step draws z1 afresh from it.
``OnM1Latents`` is mixed in before the model it stacks on: ``M1M2(OnM1Latents, M2)``, ``M1ADGM(OnM1Latents, ADGM)``.
"""

from __future__ import annotations

from typing import Any

import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from ssvae_pl import elbo
from ssvae_pl.data.batches import free_memory
from ssvae_pl.errors import ConfigError
from ssvae_pl.models.declares import CLASS_IMAGE_PICTURES
from ssvae_pl.models.inputs import unit_images
from ssvae_pl.models.vae import frozen_encoder
from ssvae_pl.nets import ImageClassifier


def check_m1_settings(vae_checkpoint: str | None, vae_hparams: dict[str, Any] | None, m1_cache: Any,
                      m1_active_threshold: float) -> None:
    """The settings of the M1 stage, checked before anything is built: each wrong one is a ``ConfigError``."""
    if vae_checkpoint is None and vae_hparams is None:
        raise ConfigError("model.vae_checkpoint is required on M1's latents: pass the VAE's checkpoint, e.g. "
                          "--model.vae_checkpoint lightning_logs/m1_vae/version_0/checkpoints/last.ckpt")
    if m1_cache not in ("grey", "off") and not (isinstance(m1_cache, int) and m1_cache > 0):
        raise ConfigError(f"model.m1_cache must be a positive number of binarised copies, grey or off, got "
                          f"{m1_cache!r}.")
    if not 0 <= m1_active_threshold < float("inf"):
        raise ConfigError(f"model.m1_active_threshold must be >= 0 (0 keeps all of M1's latent dimensions), got "
                          f"{m1_active_threshold}.")


class OnM1Latents:
    """The M1 stage of a stacked model. Its hparams: ``vae_checkpoint``, ``vae_hparams``, ``m1_active_threshold``,
    ``m1_cache`` and ``input_shape`` (``M1M2`` documents them). The model it stacks on calls ``input_stage()`` to
    learn the shape it models, ``features(x)`` for what its networks see, and ``classifier_head()`` for q(y|.)."""

    def input_stage(self) -> tuple[int, ...]:
        """M1's frozen encoder, from ``vae_checkpoint`` (or rebuilt from ``vae_hparams``); the model models its A
        active dimensions: (A,)."""
        hp = self.hparams
        self.m1_encoder, hp["vae_hparams"] = frozen_encoder(hp.vae_checkpoint, hp.vae_hparams, hp.input_shape,
                                                            hp.m1_active_threshold)
        rank_zero_info(f"{type(self).__name__} models {self.m1_encoder.out_dim} of M1's {self.m1_encoder.latent_dim} "
                       f"latent dimensions, those whose posterior mean varies by more than model.m1_active_threshold="
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
        """q(y|.) on the posterior mean of M1's frozen encoder, images -> logits (what ``forward`` computes in eval
        mode), sharing this model's weights."""
        return ImageClassifier(self.classifier_head(), self.m1_encoder)

    def pictures(self) -> frozenset[str]:
        return super().pictures() - CLASS_IMAGE_PICTURES

    def _check_generates_images(self) -> None:
        raise NotImplementedError(
            f"{type(self).__name__} generates M1 latents, not images: decoding them needs M1's decoder, which this "
            "model does not keep (only M1's frozen encoder). Use the model on images to sample or draw analogies.")

    def sample(self, y: torch.Tensor, num_samples_per_class: int = 1) -> torch.Tensor:
        self._check_generates_images()

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        self._check_generates_images()

    def analogies(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self._check_generates_images()
