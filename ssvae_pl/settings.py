"""Trainer settings that Lightning accepts and that would fail deep inside a run (a dtype clash in the first
product, a division by zero at the first step), checked before anything is built: one ``ConfigError`` naming the key
and the fix."""

from __future__ import annotations

from typing import Any

from ssvae_pl.errors import ConfigError

# whole-model casts: the models keep fp32 weights, EMA copies and sums (``elbo``); the products go to bf16 by autocast
UNSUPPORTED_PRECISIONS = {"64", "64-true", "16-true", "bf16-true", "transformer-engine", "transformer-engine-float16"}


def check_trainer_settings(trainer: Any, subcommand: str | None = None) -> None:
    """``trainer``: the subcommand's ``trainer`` namespace (or dict) as parsed."""
    get = trainer.get if hasattr(trainer, "get") else lambda key, default=None: default
    devices, nodes = get("devices"), get("num_nodes") or 1
    if subcommand == "predict" and (nodes != 1 or devices not in (None, "auto", 1, "1", [0], "0,")):
        raise ConfigError(f"ssvae predict writes its CSV from one process, and trainer.devices {devices!r} (num_nodes "
                          f"{nodes}) asks for several; pass --trainer.devices 1.")
    precision = get("precision")
    if precision is not None and str(precision) in UNSUPPORTED_PRECISIONS:
        raise ConfigError(f"trainer.precision {precision!r} casts the whole model, which ssvae's models do not "
                          "support (their weights and sums stay fp32); use bf16-mixed or 16-mixed (products in "
                          "half precision), or 32-true.")
    accumulate = get("accumulate_grad_batches")
    if accumulate is not None and (isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1):
        raise ConfigError(f"trainer.accumulate_grad_batches must be a whole number >= 1 (1: no accumulation), got "
                          f"{accumulate!r}.")
    clip = get("gradient_clip_val")
    if clip is not None and not clip >= 0:
        raise ConfigError(f"trainer.gradient_clip_val must be >= 0 (0 or null: no clipping), got {clip!r}.")
