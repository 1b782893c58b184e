"""The opt-in ``compile`` of the models: torch.compile applied to the training loss, not to the module."""

from __future__ import annotations

from typing import Callable, Union

import torch

from ssvae_pl.errors import ConfigError

CompileSetting = Union[bool, str]  # False, True (torch.compile's default backend) or a backend's name


def check_compile(setting: CompileSetting) -> None:
    if isinstance(setting, str) and setting not in torch._dynamo.list_backends(exclude_tags=()):
        raise ConfigError(f"model.compile={setting!r} is not a torch.compile backend; use true, false or one of "
                          f"{sorted(torch._dynamo.list_backends(exclude_tags=()))}.")


def compiled(fn: Callable, setting: CompileSetting) -> Callable:
    """``fn`` itself when ``setting`` is False, else ``torch.compile(fn)`` (with the named backend, if a string).
    Compiling the bound loss method leaves the module and its state dict untouched: checkpoints carry no
    ``_orig_mod.`` keys and load without compile."""
    if setting is False:
        return fn
    return torch.compile(fn) if setting is True else torch.compile(fn, backend=setting)
