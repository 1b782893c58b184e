"""Writing output files: the one guard for every file the product writes (checkpoints, predictions, exports, the
data files fetched or converted, run records).

* Atomic: a reader, or a run that fails half-way, never sees a half-written file (a temporary file beside the
  target, then ``os.replace``).
* Never replaced by surprise: an existing file is replaced only where the caller says so (``overwrite``).
* One clear error when the disk is full or the folder cannot be written, naming the file being written.
* One writer at a time: ``RunLock`` holds a folder (a fit's run folder; a sweep's records).
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ssvae_pl.errors import ConfigError, OutputError

_FIXES = {
    errno.ENOSPC: "free some space, or write elsewhere",
    errno.EDQUOT: "free some space, or write elsewhere",
    errno.EROFS: "the filesystem is read-only: write elsewhere",
    errno.EACCES: "make the folder writable, or write elsewhere",
    errno.EPERM: "make the folder writable, or write elsewhere",
}


@contextmanager
def atomic_output(path: str | Path, overwrite: bool, durable: bool = False,
                  overwrite_flag: str = "--overwrite") -> Iterator[Path]:
    """A temporary path beside ``path`` (the same folder, so the same filesystem) to write the file to. When the
    block ends without an error, the file replaces ``path`` in one step (``os.replace``); otherwise it is removed
    and whatever was at ``path`` before stays as it was.

    ``overwrite``: whether an existing ``path`` may be replaced; if not, an ``OutputError`` names the file and
    ``overwrite_flag``. ``durable``: the file is fsync'ed before it replaces ``path``, and the folder after, so
    that a power loss cannot undo the replacement (checkpoints). An ``OSError`` while writing (a full disk, a
    read-only folder) becomes an ``OutputError`` naming ``path``. The folder is created if need be."""
    path = Path(path)
    refuse_existing(path, overwrite, overwrite_flag)
    make_folder(path.parent)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield temporary
        if durable:
            with open(temporary, "rb+") as written:
                os.fsync(written.fileno())
        os.replace(temporary, path)
        if durable:
            fsync_folder(path.parent)
    except OSError as err:
        if isinstance(err, OutputError):
            raise
        raise write_error(path, err) from err
    finally:
        try:
            temporary.unlink(missing_ok=True)
        except OSError:  # a read-only folder: nothing was written there either
            pass


def refuse_existing(path: str | Path, overwrite: bool, overwrite_flag: str = "--overwrite") -> None:
    """An existing ``path`` that may not be replaced: one ``OutputError`` naming it and ``overwrite_flag``."""
    if not overwrite and Path(path).exists():
        raise OutputError(f"{path} already exists; pass {overwrite_flag} to replace it, or write elsewhere.")


def check_writable(path: str | Path) -> None:
    """Before the work that ends in writing ``path``: its folder exists (created if need be) and takes a new file
    (one made and removed at once); otherwise one ``OutputError`` naming ``path`` and the fix."""
    folder = Path(path).parent
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"cannot write {path}: {folder} is a file, not a folder; write elsewhere.")
    make_folder(folder)
    try:
        descriptor, probe = tempfile.mkstemp(dir=folder, prefix=f".{Path(path).name}.", suffix=".probe")
        os.close(descriptor)
        os.unlink(probe)
    except OSError as err:
        raise write_error(path, err) from err


def make_folder(folder: str | Path) -> None:
    """``mkdir -p``, with a folder that cannot be created (read-only, full, forbidden) as one ``OutputError``."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(folder, err) from err


def write_error(path: str | Path, err: OSError) -> OutputError:
    """``err``, raised while ``path`` was written, as one message that names the file and the fix."""
    reason = (err.strerror or os.strerror(err.errno)) if err.errno else str(err)
    fix = _FIXES.get(err.errno, "check that the folder exists and can be written")
    error = OutputError(f"cannot write {path}: {reason}; {fix}.")
    error.errno = err.errno
    return error


def is_write_failure(err: OSError) -> bool:
    """Whether ``err`` is a failure to write (a full disk, a read-only or forbidden folder)."""
    return err.errno in _FIXES


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


class RunLock:
    """An exclusive ``flock`` on a run folder while a fit writes into it: a second fit aimed at the same folder
    stops with one error instead of interleaving checkpoints. Released when the process ends, however it ends.
    ``wait``: block until the folder is free instead (a sweep's records, written by its stages as they end)."""

    def __init__(self, folder: Path, wait: bool = False) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self._descriptor = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(self._descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(self._descriptor)
            raise ConfigError(f"the run folder {folder.resolve()} is in use by another ssvae fit; wait for it to end, "
                              "or start this one with --trainer.logger.init_args.version <new name>.") from None

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
