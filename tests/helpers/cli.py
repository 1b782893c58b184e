"""``ssvae`` run in the test's own process: what a subprocess would return (exit status, stdout, stderr), without
an interpreter's start-up and imports for each call. Signals, locks held by another process and DDP still need a
real subprocess (``test_trust.ssvae``)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path


def _printed(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def ssvae_here(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``ssvae <args>`` in ``cwd``, in this process. An unexpected exception propagates (a traceback fails the
    test, as a subprocess's would)."""
    from ssvae_pl.cli import main

    out, err, before = io.StringIO(), io.StringIO(), os.getcwd()
    code = 0
    os.chdir(cwd)
    try:
        with redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings():
            warnings.showwarning = _printed  # as the command prints them, not recorded by pytest
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            try:
                main(list(args))
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        os.chdir(before)
    return subprocess.CompletedProcess(["ssvae", *args], code, out.getvalue(), err.getvalue())
