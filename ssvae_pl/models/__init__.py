"""LightningModules: M1's VAE and its latent-space classifier."""

from ssvae_pl.models.latent_classifier import LatentClassifier
from ssvae_pl.models.vae import VAE

__all__ = ["VAE", "LatentClassifier"]
