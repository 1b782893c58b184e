"""``AtomicCheckpointIO``: checkpoints that survive a kill during their own writing.

Lightning's ``TorchCheckpointIO`` serialises a checkpoint in memory, then truncates the target file and writes it:
a process killed during that write leaves a partial ``last.ckpt``, and the run cannot be resumed. This plugin
writes to a temporary file in the target's folder (the same filesystem), flushes and ``fsync``s it, and then moves it
over the target with ``os.replace``, a single atomic step: the target holds either the previous checkpoint or the new
one, whole. Remote paths (``s3://``, ...) go through Lightning's own writer.

In a config::

    trainer:
      plugins:
        - class_path: ssvae_pl.checkpoint_io.AtomicCheckpointIO
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning_fabric.utilities.cloud_io import get_filesystem
from pytorch_lightning.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose writes are atomic on local filesystems (temporary file, fsync, ``os.replace``)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed while writing
            stale.unlink(missing_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
