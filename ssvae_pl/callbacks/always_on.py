"""The pieces every ``ssvae`` Trainer gets beside the config's own (``trainer_pieces``), in one place.

``--print_config`` lists them under ``trainer.callbacks`` and ``trainer.plugins``. The optional ones can be left out
with ``always_on.leave_out`` (``configs/presets/debug.yaml`` leaves out the costly ones); the safety pieces cannot,
but a config may list one with other settings (``NonFiniteGuard`` with ``action: skip``), which then replaces it.
"""

from __future__ import annotations

from typing import Any

from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.plugins.io import CheckpointIO

from ssvae_pl.callbacks.checkpoints import BestCheckpoint, LastCheckpoint
from ssvae_pl.callbacks.pictures import ConfusionMatrix, GenerativeImages, HParamsWithMetrics, LatentSpace
from ssvae_pl.callbacks.robustness import NonFiniteGuard, ResumeWithNewOptimizerSettings, SaveOnInterrupt, SeedEachEpoch
from ssvae_pl.callbacks.timing import EpochTimer, LatentProbe, RunProgressBar
from ssvae_pl.checkpoint_io import AtomicCheckpointIO
from ssvae_pl.errors import ConfigError

# in Lightning's order of calls; LastCheckpoint after BestCheckpoint, so that last.ckpt holds this epoch's best score
ALWAYS_ON = (NonFiniteGuard, SaveOnInterrupt, SeedEachEpoch, EpochTimer, LatentProbe, GenerativeImages, LatentSpace,
             ConfusionMatrix, HParamsWithMetrics, BestCheckpoint, LastCheckpoint, RunProgressBar)
SAFETY = (NonFiniteGuard, SaveOnInterrupt, SeedEachEpoch, LastCheckpoint)
FIT_ONLY = (BestCheckpoint, LastCheckpoint)  # test, validate and predict write no checkpoint
OPTIONAL = tuple(piece.__name__ for piece in ALWAYS_ON if piece not in SAFETY)


def pieces_for(present: list[type], fitting: bool, progress_bar: bool, leave_out: list[str]) -> list[type]:
    """The classes of the always-on callbacks a Trainer gets, given the classes the config lists itself."""
    for name in leave_out:
        if name not in OPTIONAL:
            safety = name in {piece.__name__ for piece in SAFETY}
            raise ConfigError(f"always_on.leave_out: {name} " + (
                "keeps runs safe and cannot be left out; list it in trainer.callbacks with other settings instead."
                if safety else f"is not an always-on piece; the optional ones are {', '.join(OPTIONAL)}."))
    wanted = []
    for piece in ALWAYS_ON:
        if piece.__name__ in leave_out or (piece in FIT_ONLY and not fitting):
            continue
        if piece is RunProgressBar and (not progress_bar or any(issubclass(c, ProgressBar) for c in present)):
            continue
        if not any(issubclass(c, piece) for c in present):
            wanted.append(piece)
    return wanted


def trainer_pieces(callbacks, plugins, optimizer_changes: dict[str, object], fitting: bool = True,
                   progress_bar: bool = True, leave_out: list[str] | None = None) -> tuple[list, list]:
    """The config's callbacks and plugins with the always-on pieces added, ``ResumeWithNewOptimizerSettings`` when
    a resume changes the optimiser, and
    the ``AtomicCheckpointIO`` plugin unless the config names a checkpoint plugin."""
    callbacks = list(callbacks or [])
    for piece in pieces_for([type(c) for c in callbacks], fitting, progress_bar, list(leave_out or [])):
        callbacks.append(piece())
    if optimizer_changes:
        callbacks.append(ResumeWithNewOptimizerSettings(optimizer_changes))
    plugins = list(plugins or []) if isinstance(plugins, (list, tuple, type(None))) else [plugins]
    if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
        plugins.append(AtomicCheckpointIO())
    return callbacks, plugins


def listed_pieces(trainer: Any, subcommand: str, leave_out: list[str]) -> tuple[list[dict], list[dict]]:
    """What ``--print_config`` adds under ``trainer.callbacks`` and ``trainer.plugins``: the always-on pieces this
    config gets, as class paths (``trainer``: the parsed trainer namespace)."""
    from importlib import import_module

    def class_of(entry) -> type:
        path = entry.get("class_path") if hasattr(entry, "get") else str(entry)
        module, _, name = str(path).rpartition(".")
        return getattr(import_module(module), name)

    present = [class_of(c) for c in (trainer.get("callbacks") or [])]
    pieces = pieces_for(present, subcommand == "fit", trainer.get("enable_progress_bar") is not False, leave_out)
    callbacks = [{"class_path": f"ssvae_pl.callbacks.{piece.__name__}"} for piece in pieces]
    plugins = [] if any(issubclass(class_of(p), CheckpointIO) for p in (trainer.get("plugins") or [])
                        if hasattr(p, "get")) else [{"class_path": "ssvae_pl.checkpoint_io.AtomicCheckpointIO"}]
    return callbacks, plugins
