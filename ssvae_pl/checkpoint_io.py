"""Checkpoint files. ``AtomicCheckpointIO`` writes one to a temporary file in the target's folder, ``fsync``s it and
moves it over the target with ``os.replace``: a process killed mid-write leaves the previous checkpoint or the new
one, whole, never the partial ``last.ckpt`` of Lightning's ``TorchCheckpointIO`` (truncate, then write). Remote
paths (``s3://``, ...) go through Lightning's own writer. ``read_checkpoint`` reads one for ``ssvae``
(``--ckpt_path``, ``model.vae_checkpoint``, ``ssvae export``), with one ``CheckpointError`` for a missing,
unreadable or foreign file. In a config::

    trainer:
      plugins: [{class_path: ssvae_pl.checkpoint_io.AtomicCheckpointIO}]
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Optional

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning_fabric.utilities.cloud_io import get_filesystem
from pytorch_lightning.plugins.io import TorchCheckpointIO

from ssvae_pl.files import atomic_output


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose writes are atomic on local filesystems (temporary file, fsync, ``os.replace``).
    The checkpoint is serialised in memory first, so that a full disk fails in a plain write that names the file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        remove_stale_temporaries(path)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        with atomic_output(path, overwrite=True, durable=True) as temporary, open(temporary, "wb") as file:
            file.write(buffer.getbuffer())


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary files of ``path`` left by processes killed while writing it (``.<name>.<pid>.*.tmp``
    of a process that no longer runs); a live process's file is left alone."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        pid = stale.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            stale.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def check_checkpoint_file(path: str | Path, field: str, fix: str) -> dict[str, Any]:
    """The checkpoint at ``path`` after a check of the whole file: every member of the zip archive that
    ``torch.save`` writes must pass its checksum (a truncated or damaged file fails here, before anything loads it).
    One ``CheckpointError`` naming ``field``, the file and ``fix`` otherwise."""
    import zipfile

    from ssvae_pl.errors import CheckpointError

    file = Path(path)
    if file.is_file():
        try:
            with zipfile.ZipFile(file) as archive:
                corrupt = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError):
            raise CheckpointError(f"{field}: {path} is truncated or not a checkpoint (not the zip archive that "
                                  f"torch.save writes); {fix}.") from None
        if corrupt is not None:
            raise CheckpointError(f"{field}: {path} is corrupt ({corrupt} fails its checksum); {fix}.")
    return read_checkpoint(file, field, fix, mmap=True)


def read_checkpoint(path: str | Path, field: str, fix: str, mmap: bool = False) -> dict[str, Any]:
    """The Lightning checkpoint at ``path`` (loaded on the CPU, tensors only). A missing file, one that torch cannot
    load (truncated, corrupt, not a torch file) or one without a ``state_dict`` raises one ``CheckpointError`` that
    names ``field``, the file and ``fix`` (what to pass instead)."""
    from ssvae_pl.errors import CheckpointError

    file = Path(path)
    if file.is_dir():
        inside = sorted(file.glob("*.ckpt")) or sorted(file.glob("checkpoints/*.ckpt"))
        example = f", e.g. {inside[-1]}" if inside else ""
        raise CheckpointError(f"{field}: {path} is a folder; pass a checkpoint file{example}.")
    if not file.is_file():
        raise CheckpointError(f"{field}: {path} does not exist; {fix}.")
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception:  # truncated zip, not a torch file, ...: the library's words name nothing the user knows
        raise CheckpointError(f"{field}: {path} cannot be read as a checkpoint (it is truncated, damaged, or not a "
                              f"file that torch.save wrote); {fix}.") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{field}: {path} is not a Lightning checkpoint (no state_dict in it); {fix}.")
    return ckpt
