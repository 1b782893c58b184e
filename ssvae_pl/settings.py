"""Trainer settings that Lightning accepts and that would fail deep inside a run (a dtype clash in the first
product, a division by zero at the first step), checked before anything is built: one ``ConfigError`` naming the key
and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ssvae_pl.errors import ConfigError

# whole-model casts: the models keep fp32 weights, EMA copies and sums (``elbo``); the products go to bf16 by autocast
UNSUPPORTED_PRECISIONS = {"64", "64-true", "16-true", "bf16-true", "transformer-engine", "transformer-engine-float16"}


def _getter(namespace: Any):
    """``namespace.get``, or a getter of nothing for a section that is not there."""
    return namespace.get if hasattr(namespace, "get") else lambda key, default=None: default


def check_trainer_settings(trainer: Any, subcommand: str | None = None) -> None:
    """``trainer``: the subcommand's ``trainer`` namespace (or dict) as parsed."""
    get = _getter(trainer)
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


def check_fit_trains(trainer: Any, optimizer: Any) -> None:
    """A fit that would train nothing and exit 0 (no epoch, no batch, a learning rate of 0) is refused."""
    get = _getter(trainer)
    for key in ("max_epochs", "max_steps", "limit_train_batches"):
        if get(key) == 0:
            raise ConfigError(f"trainer.{key} 0 trains nothing, and the fit would end at once as if it had "
                              "succeeded; give it a positive number.")
    lr = _getter(_getter(optimizer)("init_args"))("lr")
    if isinstance(lr, (int, float)) and lr == 0:
        raise ConfigError("optimizer.init_args.lr 0 leaves the weights as they were initialised; give a positive "
                          "learning rate (the configs: 1e-3 to 3e-3).")


BATCH_LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
                "overfit_batches", "val_check_interval")


def _config_path(arg: str, following: str | None) -> str | None:
    """The config file that ``arg`` (and the word after it) names: ``-c FILE``, ``--config FILE``,
    ``--config=FILE``; else None."""
    if arg in ("-c", "--config"):
        return following
    return arg.split("=", 1)[1] if arg.startswith("--config=") else None


def config_paths(command_line: list[str]) -> list[str]:
    """The ``-c``/``--config`` files of a command line, in order."""
    following = [*command_line[1:], None]
    return [path for arg, after in zip(command_line, following) if (path := _config_path(arg, after)) is not None]


def whole_number_limits(command_line: list[str]) -> dict[str, int]:
    """The batch limits written as whole numbers (``1``: one batch) on the command line or in its config files,
    the last one of each winning. The parser reads them as floats, and Lightning takes 1.0 for every batch."""
    import yaml

    found: dict[str, Any] = {}
    for arg, value in zip(command_line, [*command_line[1:], None]):
        path = _config_path(arg, value)
        if path is not None:
            try:  # the files passed check_config_files: UTF-8 mappings
                config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError):
                continue
            trainer = config.get("trainer") if isinstance(config, dict) else None
            found.update({key: trainer[key] for key in BATCH_LIMITS if isinstance(trainer, dict) and key in trainer})
        elif arg.startswith("--trainer."):
            key, _, inline = arg[len("--trainer."):].partition("=")
            if key in BATCH_LIMITS:
                try:
                    found[key] = yaml.safe_load(inline if inline else value)
                except yaml.YAMLError:
                    continue
    return {key: value for key, value in found.items() if isinstance(value, int) and not isinstance(value, bool)}
