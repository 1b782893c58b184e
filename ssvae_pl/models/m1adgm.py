"""M1+ADGM: ADGM (``adgm.py``) on z1 ~ q(z1|x), the latents of M1's frozen VAE encoder in its active dimensions, as
M1+M2 stacks M2 on them, with a Gaussian p(z1|y,z2) and p(a|z1,y,z2); the M1 stage is ``m1_latents.OnM1Latents``.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

from ssvae_pl.models.adgm import ADGM
from ssvae_pl.models.compiling import CompileSetting
from ssvae_pl.models.m1_latents import OnM1Latents, check_m1_settings
from ssvae_pl.models.vae import ACTIVE_UNIT_STD
from ssvae_pl.nets import Activation


class M1ADGM(OnM1Latents, ADGM):
    """ADGM (its arguments) on M1's frozen encoder; configs/mnist/m1adgm.yaml. ``vae_checkpoint``, ``vae_hparams``,
    ``m1_active_threshold`` and ``m1_cache`` are M1+M2's (``M1M2``)."""

    likelihood = "gaussian"

    def __init__(
        self,
        vae_checkpoint: str | None = None,
        vae_hparams: dict[str, Any] | None = None,
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
        m1_active_threshold: float = ACTIVE_UNIT_STD,
        m1_cache: int | Literal["grey", "off"] = "grey",
        class_names: Sequence[str] | None = None,
        compile: CompileSetting = "auto",
    ) -> None:
        check_m1_settings(vae_checkpoint, vae_hparams, m1_cache, m1_active_threshold)
        super().__init__(input_shape, num_classes, num_train, hidden_dims, aux_dim, latent_dim, activation, min_std,
                         alpha, alpha_per_label, weighting, samples, eval_samples, class_names, compile)

    def latent_name(self) -> str:
        return "M1+ADGM's z2, mean of q(z2|a,z1,y)"
