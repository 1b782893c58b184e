"""Writing output files atomically: a reader, or a run that fails half-way, never sees a half-written file."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (the same folder, so the same filesystem) to write the file to. When the
    block ends without an error, the file replaces ``path`` in one step (``os.replace``); otherwise it is removed
    and whatever was at ``path`` before stays as it was."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
