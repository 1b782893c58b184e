"""Failures that are not the program's fault, raised by libraries as plain exceptions, turned into the one-line
``ssvae: error:`` messages of ``cli.py``: a ``--ckpt_path`` that is missing or not a checkpoint (checked before
anything runs), a checkpoint whose weights do not fit the configured model, settings the optimiser rejects, and
files or folders that cannot be read or written. ``SSVAE_TRACEBACK=1`` shows the traceback instead."""

from __future__ import annotations

import os
import traceback
from pathlib import Path

from ssvae_pl.checkpoint_io import read_checkpoint
from ssvae_pl.errors import CheckpointError
from ssvae_pl.files import is_write_failure, write_error

SPECIAL_CKPT_PATHS = {"last", "best", "hpc", "registry", "null", "None", ""}


def ckpt_path_argument(command_line: list[str]) -> str | None:
    """The value of ``--ckpt_path`` on the command line, if any (the last one wins, as in the parser)."""
    value = None
    for i, arg in enumerate(command_line):
        if arg == "--ckpt_path" and i + 1 < len(command_line):
            value = command_line[i + 1]
        elif arg.startswith("--ckpt_path="):
            value = arg.split("=", 1)[1]
    return value


def check_ckpt_path(command_line: list[str]) -> None:
    """A ``--ckpt_path`` file that is missing, truncated or not a Lightning checkpoint: one ``CheckpointError``."""
    value = ckpt_path_argument(command_line)
    if value is None or value in SPECIAL_CKPT_PATHS or "://" in value:
        return
    path = Path(value)
    fix = "give a run's checkpoints/last.ckpt, or --ckpt_path last to resume the run in the configured folder"
    if not path.is_file():
        read_checkpoint(path, "--ckpt_path", fix)  # one error: it does not exist
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:  # what torch.save writes; every member's CRC is checked
            corrupt = archive.testzip()
    except (zipfile.BadZipFile, OSError):
        raise CheckpointError(f"--ckpt_path: {value} is truncated or not a checkpoint (not the zip archive that "
                              "torch.save writes).") from None
    if corrupt is not None:
        raise CheckpointError(f"--ckpt_path: {value} is corrupt ({corrupt} fails its checksum).")
    read_checkpoint(path, "--ckpt_path", fix, mmap=True)


def describe(err: BaseException) -> str | None:
    """A one-line message for a known failure anywhere in ``err``'s chain, or None (then the traceback shows)."""
    if os.environ.get("SSVAE_TRACEBACK"):
        return None
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        message = _describe_one(err)
        if message:
            return message
        err = err.__cause__ or err.__context__
    return None


def _describe_one(err: BaseException) -> str | None:
    text = str(err).strip()
    first_line = text.splitlines()[0] if text else type(err).__name__
    if isinstance(err, RuntimeError) and "Error(s) in loading state_dict" in text:
        return ("the checkpoint's weights do not fit the configured model (" + first_line[:200] + "); resume or "
                "test with the model settings it was trained with (the run's config.yaml).")
    if isinstance(err, (ValueError, TypeError)) and _raised_in(err, os.sep.join(["torch", "optim", ""])):
        return f"the optimizer rejects its settings: {first_line}; check --optimizer.init_args."
    if isinstance(err, OSError) and err.filename is not None:
        if is_write_failure(err):
            return str(write_error(err.filename, err))
        return f"{err.strerror or first_line}: {err.filename}; check that the path exists and can be written."
    return None


def _raised_in(err: BaseException, fragment: str) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and fragment in frames[-1].filename
