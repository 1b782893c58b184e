"""LightningModules: M1's VAE and its latent-space classifier; the semi-supervised family on J^alpha
(``semi_supervised.py``): M2, M1+M2 on a frozen VAE encoder, ADGM and SDGM, and
M1+ADGM."""

from ssvae_pl.models.adgm import ADGM, SDGM
from ssvae_pl.models.latent_classifier import LatentClassifier
from ssvae_pl.models.m1adgm import M1ADGM
from ssvae_pl.models.m1m2 import M1M2
from ssvae_pl.models.m2 import M2
from ssvae_pl.models.semi_supervised import SemiSupervised
from ssvae_pl.models.vae import VAE

from ssvae_pl.quiet import quiet_lightning

__all__ = ["VAE", "LatentClassifier", "M2", "M1M2", "ADGM", "SDGM", "M1ADGM", "SemiSupervised"]
quiet_lightning()
