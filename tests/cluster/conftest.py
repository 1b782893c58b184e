"""The cluster tests run against a real SLURM (``make test-cluster`` starts a one-node one); elsewhere they are
skipped."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def pytest_collection_modifyitems(config, items) -> None:
    here = os.path.dirname(__file__)
    cluster = [item for item in items if str(item.fspath).startswith(here)]
    if not cluster or cluster_up():
        return
    skip = pytest.mark.skip(reason="no SLURM cluster here: `make test-cluster` starts one")
    for item in cluster:
        item.add_marker(skip)


def cluster_up() -> bool:
    if not os.environ.get("SLURM_CONF") or shutil.which("sinfo") is None:
        return False
    state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    return state.returncode == 0 and "idle" in state.stdout
