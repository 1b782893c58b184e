"""Writing output files atomically: a reader, or a run that fails half-way, never sees a half-written file.
The one place that does it, for checkpoints, predictions, exports and the data files fetched or converted."""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_output(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` (the same folder, so the same filesystem) to write the file to. When the
    block ends without an error, the file replaces ``path`` in one step (``os.replace``); otherwise it is removed
    and whatever was at ``path`` before stays as it was. ``durable``: the file is fsync'ed before it replaces
    ``path``, and the folder after, so that a power loss cannot undo the replacement (checkpoints)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield temporary
        if durable:
            with open(temporary, "rb+") as written:
                os.fsync(written.fileno())
        os.replace(temporary, path)
        if durable:
            fsync_folder(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
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
