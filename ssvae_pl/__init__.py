"""ssvae-pl: semi-supervised VAEs (Kingma, Rezende, Mohamed and Welling, NeurIPS 2014) in PyTorch Lightning.

    from ssvae_pl import M2, SemiSupervisedDataModule     # also VAE, LatentClassifier, M1M2; docs/python_api.md

Layout: ``data/`` (files on disk -> mixed batches), ``elbo.py`` (the bounds), ``nets.py`` (plain networks),
``models/`` (LightningModules), ``cli.py`` (the ``ssvae`` command). The classes are imported on first use, so that
``import ssvae_pl`` stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["VAE", "LatentClassifier", "M2", "M1M2", "ADGM", "SDGM", "M1ADGM", "SemiSupervisedDataModule", "ImageFolder",
           "best_precision"]

_MODELS = ("VAE", "LatentClassifier", "M2", "M1M2", "ADGM", "SDGM", "M1ADGM")
_HOMES = {**dict.fromkeys(_MODELS, "ssvae_pl.models"), "SemiSupervisedDataModule": "ssvae_pl.data",
          "ImageFolder": "ssvae_pl.data", "best_precision": "ssvae_pl.precision"}

if TYPE_CHECKING:
    from ssvae_pl.data import ImageFolder, SemiSupervisedDataModule
    from ssvae_pl.models import ADGM, M1ADGM, M1M2, M2, SDGM, VAE, LatentClassifier
    from ssvae_pl.precision import best_precision


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_HOMES[name]), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
