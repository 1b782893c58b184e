"""M1+M2 (SSDGM section 2.3): M2 on z1 ~ q(z1|x), the latents of M1's frozen VAE encoder in its active
dimensions, with a Gaussian p(z1|y,z2); the M1 stage is ``m1_latents.OnM1Latents``.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

from ssvae_pl.models.compiling import CompileSetting
from ssvae_pl.models.m1_latents import OnM1Latents, check_m1_settings
from ssvae_pl.models.m2 import M2
from ssvae_pl.models.vae import ACTIVE_UNIT_STD
from ssvae_pl.nets import Activation


class M1M2(OnM1Latents, M2):
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
        check_m1_settings(vae_checkpoint, vae_hparams, m1_cache, m1_active_threshold)
        super().__init__(input_shape, num_classes, num_train, hidden_dims, classifier_hidden_dims, latent_dim,
                         activation, min_std, alpha, alpha_per_label, weighting, "gaussian", (), class_names, compile)

    def latent_name(self) -> str:
        return "M1+M2's z2, mean of q(z2|z1,y)"
