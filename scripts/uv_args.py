"""Print the ``uv pip install`` options that make uv install what pip would on this machine: pip's configured index,
extra indexes, find-links and constraints (``pip config list`` and ``PIP_*``), and pip's choice of the highest
version across all indexes (``--index-strategy unsafe-best-match``). Used by the Makefile's ``venv`` target.

    python scripts/uv_args.py     # e.g. --index-strategy unsafe-best-match --find-links /opt/wheels ...
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

OPTIONS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
           "constraint": "--constraint"}


def pip_settings() -> dict[str, list[str]]:
    """pip's settings of OPTIONS, from its config files then its environment (which wins, as in pip)."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    settings: dict[str, list[str]] = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        if name in OPTIONS and not key.startswith(":env:"):
            settings[name] = value.strip().strip("'\"").split()
    for name in OPTIONS:
        value = os.environ.get("PIP_" + name.upper().replace("-", "_"))
        if value:
            settings[name] = value.split()
    return settings


def main() -> None:
    args = ["--index-strategy", "unsafe-best-match"]
    for name, values in pip_settings().items():
        for value in values:
            args += [OPTIONS[name], value]
    print(shlex.join(args))


if __name__ == "__main__":
    main()
