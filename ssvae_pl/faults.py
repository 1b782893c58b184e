"""Failures that are not the program's fault, raised by libraries as plain exceptions, turned into the one-line
``ssvae: error:`` messages of ``cli.py``: a ``--ckpt_path`` that is missing or not a checkpoint (checked before
anything runs), a checkpoint whose weights do not fit the configured model, settings the optimiser rejects, and
files or folders that cannot be read or written. ``SSVAE_TRACEBACK=1`` shows the traceback instead."""

from __future__ import annotations

import os
import re
import traceback

from ssvae_pl.checkpoint_io import check_checkpoint_file
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
    if command_line[:1] == ["fit"]:
        fix = "give a run's checkpoints/last.ckpt, or --ckpt_path last to resume the run in the configured folder"
    else:
        fix = "give a run's checkpoints/last.ckpt, or --ckpt_path last (or best) for the newest run of this config"
    check_checkpoint_file(value, "--ckpt_path", fix)


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
    text, line = str(err).strip(), first_line(err)
    short = union_error(text) if isinstance(err, ValueError) else None
    if short:
        return short
    if isinstance(err, RuntimeError) and "Error(s) in loading state_dict" in text:
        return ("the checkpoint's weights do not fit the configured model (" + line[:200] + "); resume or "
                "test with the model settings it was trained with (the run's config.yaml).")
    if isinstance(err, (ValueError, TypeError)) and _raised_in(err, os.sep.join(["torch", "optim", ""])):
        return f"the optimizer rejects its settings: {line}; check --optimizer.init_args."
    if isinstance(err, OSError) and err.filename is not None:
        if is_write_failure(err):
            return str(write_error(err.filename, err))
        return f"{err.strerror or line}: {err.filename}; check that the path exists and can be written."
    return None


UNION = "Does not validate against any of the Union subtypes"
NOT_THE_POINT = re.compile(r"Expected a <class '(NoneType|str|bool)'>|Expected a dot import path string|"
                           r"Expected a path ")


def union_error(message: str) -> str | None:
    """jsonargparse's report of a value that fits none of a Union's types (a class path that does not import, a
    wrong value inside one, a source's own ``ConfigError``) as one line: the key and the one error that matters,
    without the types tried and the parser's dump."""
    if UNION not in message:
        return None
    head, _, rest = message.partition("Errors:")
    keys = re.findall(r'Parser key "([^"]+)"', head)
    items: list[list[str]] = []
    indent = None
    for line in rest.splitlines()[1:]:
        depth = len(line) - len(line.lstrip())
        if not line.strip():
            continue
        if line.strip().startswith("- ") and (indent is None or depth == indent):
            indent = depth
            items.append([line.strip()[2:]])
        elif items and depth > indent:
            items[-1].append(line)
        else:
            break
    useful = [item for item in items if not NOT_THE_POINT.match(item[0])] or items[:1]
    if not useful:
        return None
    inner = "\n".join(useful[0])
    class_path = re.match(r"Problem with given class_path '([^']+)':\s*", inner)
    if class_path:
        inner = inner[class_path.end():]
    nested = re.match(r'Parser key "([^"]+)":\s*', inner)
    if nested:
        keys.append(("init_args." if class_path else "") + nested.group(1))
        inner = inner[nested.end():]
    given = [g.strip() for g in re.findall(r"Given value: (.*)", inner) if not g.strip().startswith("NestedArg")]
    inner = union_error(inner) or " ".join(inner.split())
    if "Got value" not in inner and given:
        inner += f", got {given[-1]!r}"
    inner = re.sub(r"Expected a <class '(?:[\w.]+\.)?(\w+)'>\. Got value: (.*)", r"expected \1, got \2", inner)
    inner = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", inner)
    where = f" ({class_path.group(1)})" if class_path and nested else ""
    key = ".".join(keys)
    if not key or inner.startswith(key):  # a source's own message names its field
        return inner
    return f"{key}{where}: {inner}"


PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted",
             "Socket Timeout", "Timed out waiting")


def is_peer_lost(err: BaseException) -> bool:
    """Whether ``err`` (or its cause) is a collective of torch.distributed that failed because a peer went away."""
    import torch.distributed as dist

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        distributed = isinstance(err, getattr(dist, "DistError", ())) or "gloo" in str(err) or "NCCL" in str(err)
        if isinstance(err, RuntimeError) and distributed and any(text in str(err) for text in PEER_LOST):
            return True
        err = err.__cause__ or err.__context__
    return False


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _raised_in(err: BaseException, fragment: str) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and fragment in frames[-1].filename
