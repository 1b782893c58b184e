"""What every named dataset's fetch shares: md5 with a small cache beside the file, and fetching into a staging
folder, where the files are verified before they are moved into place one by one (an interrupted or wrong fetch
never leaves a half-written file where the data is read)."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from torchvision.datasets.utils import calculate_md5

from ssvae_pl.data.sources.base import DataSourceError
from ssvae_pl.files import atomic_output

Stager = Callable[[Path], None]  # writes the missing files into the staging folder it is given
MD5_CACHE_SUFFIX = ".md5.json"


def file_md5(path: Path) -> str:
    """md5 of ``path``; reuses ``.<name>.md5.json`` next to it when size, mtime and inode are unchanged."""
    stat = path.stat()
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}
    cache = md5_cache_path(path)
    try:
        cached = json.loads(cache.read_text())
        if {k: cached.get(k) for k in key} == key and isinstance(cached.get("md5"), str):
            return cached["md5"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = md5_of_file(path)
    with contextlib.suppress(OSError):  # a read-only data folder just means no cache
        write_atomically(cache, json.dumps({**key, "md5": digest}).encode())
    return digest


def md5_cache_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{MD5_CACHE_SUFFIX}")


def md5_of_file(path: Path) -> str:
    return calculate_md5(str(path))


def check_md5(path: Path, expected_md5: str | None,
              fix: str = "Fix: delete it so it is fetched again, or replace it with the official file.") -> None:
    """DataSourceError naming ``path`` when its md5 is not ``expected_md5`` (nothing to check when that is empty)."""
    if not expected_md5:
        return
    actual = file_md5(path)
    if actual != expected_md5:
        raise DataSourceError(
            f"{path}: md5 mismatch: expected {expected_md5}, actual {actual}.\n"
            f"The file is corrupted or not the official {path.name}.\n"
            f"{fix[:-1]}; or turn the md5 check off (check_md5=False) if it is a deliberate custom file."
        )


def fetch_into(folder: Path, missing: list[str], stage: Stager, verify: Callable[[Path], None],
               staged_as: str = "<fetched>") -> None:
    """Run ``stage`` in a fresh staging folder beside ``folder``, check each missing file there with ``verify``,
    then move them into ``folder`` (created only then, so a failed fetch leaves nothing behind)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=folder.parent))
    try:
        stage(staging)
        for file_name in missing:
            staged = staging / file_name
            if not staged.is_file():
                raise FileNotFoundError(f"the source did not provide {file_name}")
            try:
                verify(staged)
            except DataSourceError as exc:
                raise ValueError(str(exc).splitlines()[0].replace(str(staging), staged_as)) from None
        folder.mkdir(exist_ok=True)
        for file_name in missing:
            os.replace(staging / file_name, folder / file_name)
            cache = md5_cache_path(staging / file_name)
            if cache.exists():  # still valid: a rename keeps size, mtime and inode
                os.replace(cache, md5_cache_path(folder / file_name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_atomically(path: Path, data: bytes) -> None:
    with atomic_output(path, overwrite=False) as temporary:
        temporary.write_bytes(data)


def gunzip(src: Path, dest: Path) -> None:
    """Decompress ``src`` into ``dest`` atomically."""
    with atomic_output(dest, overwrite=False) as temporary, temporary.open("xb") as out, gzip.open(src, "rb") as f:
        shutil.copyfileobj(f, out, 1 << 20)


def short_reason(exc: BaseException, limit: int = 240) -> str:
    """One line: the exception type and its last non-empty message line (torchvision's are multi-line)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[-1]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def quiet(call: Callable[[], object]) -> str:
    """Run ``call`` with its stdout and stderr (torchvision's download chatter) captured; return that text."""
    import io

    noise = io.StringIO()
    with contextlib.redirect_stdout(noise), contextlib.redirect_stderr(noise):
        call()
    return noise.getvalue()
