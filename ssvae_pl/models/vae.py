"""M1, stage one: a VAE trained on all images by maximising the ELBO (SSDGM section 2.1, "latent-feature
discriminative model")."""

from __future__ import annotations

import math
from typing import Any, Sequence

import pytorch_lightning as pl
import torch

from ssvae_pl import elbo
from ssvae_pl.models.compiling import CompileSetting, check_compile, compiled
from ssvae_pl.nets import Activation, BernoulliDecoder, GaussianEncoder

# The hyperparameters that fix the encoder's shape: what a frozen copy of it needs to be rebuilt.
ENCODER_HPARAMS = ("input_shape", "hidden_dims", "latent_dim", "activation", "min_std")


class FrozenEncoder(GaussianEncoder):
    """M1's encoder as a fixed feature map inside another model: no gradients (so DDP never registers it), and eval
    mode whatever its parent asks (Lightning switches the whole model to train mode every epoch)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenEncoder:
        return super().train(False)


def build_encoder(input_shape: Sequence[int], hidden_dims: Sequence[int], latent_dim: int, activation: Activation,
                  min_std: float, frozen: bool = False) -> GaussianEncoder:
    encoder_class = FrozenEncoder if frozen else GaussianEncoder
    return encoder_class(math.prod(input_shape), hidden_dims, latent_dim, activation, min_std)


class VAE(pl.LightningModule):
    """Gaussian MLP encoder q(z|x), Bernoulli MLP decoder p(x|z), prior p(z) = N(0, I).

    Args:
        input_shape: (C, H, W) of the images; linked from the data module.
        num_classes: linked from the data module; the VAE does not use labels, but records them.
        hidden_dims: hidden widths of the encoder; the decoder mirrors them. The paper: [600, 600].
        latent_dim: size of z. The paper: 50.
        activation: hidden non-linearity. The paper: softplus.
        min_std: added to softplus(.) so the encoder's standard deviation is never zero.
        compile: ``torch.compile`` the training loss (``true``, or a backend's name); off by default. The
            checkpoint does not depend on it.
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
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = build_encoder(input_shape, hidden_dims, latent_dim, activation, min_std)
        self.decoder = BernoulliDecoder(latent_dim, list(reversed(hidden_dims)), input_shape, activation)
        check_compile(compile)
        self._training_terms = compiled(self.forward, compile)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-example terms of the bound for a batch of images in [0, 1]: each value has shape (B,)."""
        mean, std = self.encoder(x)  # (B, Z), (B, Z)
        z = elbo.reparameterize(mean, std)
        recon = elbo.bernoulli_log_likelihood(self.decoder(z), x)
        kl = elbo.kl_standard_normal(mean, std)
        return {"elbo": elbo.elbo(recon, kl), "recon": recon, "kl": kl}

    def _log_terms(self, stage: str, terms: dict[str, torch.Tensor], names: Sequence[str]) -> None:
        on_step = stage == "train"
        for name in names:
            self.log(f"{stage}/{name}", terms[name].mean(), on_step=on_step, on_epoch=True,
                     prog_bar=name == "elbo", sync_dist=not on_step, batch_size=len(terms[name]))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        terms = self._training_terms(batch["unlabelled"])  # every training image, labelled or not
        self._log_terms("train", terms, ("elbo", "recon", "kl"))
        return -terms["elbo"].mean()

    def validation_step(self, batch, batch_idx: int) -> None:
        self._log_terms("val", self(batch[0]), ("elbo", "recon", "kl"))

    def test_step(self, batch, batch_idx: int) -> None:
        self._log_terms("test", self(batch[0]), ("elbo", "recon", "kl"))

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        mean, std = self.encoder(batch[0])
        return {"z_mean": mean, "z_std": std, "y": batch[1]}

    def configure_optimizers(self):
        """Used when the config names no ``optimizer``; the configs do name one."""
        return torch.optim.Adam(self.parameters(), lr=3e-4)

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """Images' Bernoulli means decoded from z ~ p(z): (num_samples, C, H, W)."""
        z = torch.randn(num_samples, self.hparams.latent_dim, device=self.device)
        return torch.sigmoid(self.decoder(z).float())

    @torch.no_grad()
    def latent_means(self, x: torch.Tensor) -> torch.Tensor:
        """The means of q(z|x): (B, Z)."""
        return self.encoder(x)[0]

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Images decoded from the means of q(z|x): Bernoulli means (B, C, H, W)."""
        return torch.sigmoid(self.decoder(self.latent_means(x)).float())


def load_frozen_encoder(path: str, field: str = "model.vae_checkpoint") -> tuple[FrozenEncoder, dict[str, Any]]:
    """The encoder of a VAE checkpoint, frozen (``FrozenEncoder``), and the hparams that shape it.

    Raises ``CheckpointError`` naming ``field`` and the file when it is missing, unreadable or not a VAE.
    """
    from pathlib import Path

    from ssvae_pl.errors import CheckpointError

    file = Path(path)
    retrain = "train one with `ssvae fit -c configs/mnist/m1_vae.yaml` and pass its checkpoints/last.ckpt"
    if not file.is_file():
        raise CheckpointError(f"{field}: {path} does not exist; {retrain}.")
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, not a torch file, ...
        raise CheckpointError(
            f"{field}: {path} cannot be read as a checkpoint ({type(err).__name__}: {str(err)[:120]}); it may be "
            f"truncated or corrupt. {retrain[0].upper() + retrain[1:]}."
        ) from None
    hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    state = ckpt.get("state_dict", {}) if isinstance(ckpt, dict) else {}
    class_path = hparams.get("_class_path", "")
    encoder_state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    if (class_path and class_path.rsplit(".", 1)[-1] != "VAE") or not encoder_state or not all(
        k in hparams for k in ENCODER_HPARAMS
    ):
        raise CheckpointError(
            f"{field}: {path} is not a VAE checkpoint (it holds {class_path or 'no VAE hyperparameters'}); {retrain}."
        )
    encoder_hparams = {k: hparams[k] for k in ENCODER_HPARAMS}
    encoder_hparams["input_shape"] = list(encoder_hparams["input_shape"])
    encoder_hparams["hidden_dims"] = list(encoder_hparams["hidden_dims"])
    encoder = build_encoder(**encoder_hparams, frozen=True)
    try:
        encoder.load_state_dict(encoder_state)
    except RuntimeError as err:
        raise CheckpointError(f"{field}: {path} does not match its own hyperparameters: {str(err)[:200]}") from None
    return encoder, encoder_hparams


def frozen_encoder(
    vae_checkpoint: str | None, vae_hparams: dict[str, Any] | None, input_shape: Sequence[int]
) -> tuple[FrozenEncoder, dict[str, Any]]:
    """M1's frozen encoder for a model built on it (the latent classifier, M1+M2).

    Rebuilt from ``vae_hparams`` when that model is restored from its own checkpoint (the weights come with its
    state dict, so the VAE file is not needed), else loaded from ``vae_checkpoint``. The VAE must have seen images
    of ``input_shape``.
    """
    from ssvae_pl.errors import CheckpointError

    if vae_hparams is not None:
        encoder = build_encoder(**vae_hparams, frozen=True)
    else:
        encoder, vae_hparams = load_frozen_encoder(vae_checkpoint)
    if list(vae_hparams["input_shape"]) != list(input_shape):
        raise CheckpointError(
            f"model.vae_checkpoint: the VAE was trained on images of shape {tuple(vae_hparams['input_shape'])} "
            f"but the data are {tuple(input_shape)}; use a VAE trained on the same dataset."
        )
    return encoder, vae_hparams

