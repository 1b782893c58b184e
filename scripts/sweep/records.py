"""The records of a sweep's finished stages: one JSON file (kept in git) that each stage's job updates under a lock as
it ends, so that a sweep resumes from it in a later sitting or a fresh clone, wherever its stages ran."""

from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import time
from pathlib import Path

from ssvae_pl.files import RunLock, atomic_output

from sweep.plan import ROOT, Stage, changed_configs, command_line, shown, stale_record

CODE = ("ssvae_pl", "configs", "scripts", "pyproject.toml")  # what "the tree was clean" looks at


class StageFailed(RuntimeError):
    pass


def load_cache(path: Path) -> dict[str, dict]:
    return json.loads(path.read_text()) if path.is_file() else {}


def update_records(cache_file: Path, changes: dict[str, dict | None]) -> None:
    """Set (or, for None, remove) the records of ``changes`` in ``cache_file``, keeping its other records as they
    are now: each stage's job writes its own record as it ends, and two sweeps of one record may run side by side.
    Under a lock on the file's folder; the file is replaced in one step."""
    with RunLock(cache_file.parent, wait=True):
        records = load_cache(cache_file)
        for key, record in changes.items():
            if record is None:
                records.pop(key, None)
            else:
                records[key] = record  # in its place if the file has it, else at the end
        write_json(cache_file, records)


def write_json(path: Path, data) -> None:
    """Write ``data`` as JSON atomically: an interrupted write never leaves a broken file."""
    with atomic_output(path, overwrite=True) as temporary:
        temporary.write_text(json.dumps(data, indent=2) + "\n")


def code_version() -> dict:
    """The commit of the code a stage runs and whether the code and configs (``CODE``) matched it; None and None
    outside a git checkout."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)

    try:
        commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain", "--", *CODE)
    except OSError:  # no git here
        return {"commit": None, "clean": None}
    if commit.returncode or status.returncode:
        return {"commit": None, "clean": None}
    return {"commit": commit.stdout.strip(), "clean": not status.stdout.strip()}


def check_same_command(stage: Stage, record: dict, cache_file: Path) -> None:
    """Refuse to reuse a record made by another command, or by the same command with other config files."""
    fix = "Use a new --out folder, or another --record file, to run the sweep with the new settings."
    why = stale_record(stage, record)
    if why == "command":
        raise StageFailed(
            f"{stage.key} in {cache_file} was run with a different command:\n  recorded: "
            f"{shlex.join(['ssvae', *record['args']])}\n  planned:  {command_line(stage)}\n{fix}"
        )
    if why == "config":
        raise StageFailed(f"{stage.key} in {cache_file} was run with other contents of "
                          f"{', '.join(changed_configs(stage, record))} (the config has changed since, or the record "
                          f"does not say what it held). {fix}")


def read_test_accuracy(stage: Stage) -> float:
    from ssvae_pl.results import read_scalars  # tensorboard: imported only when needed

    scalars = read_scalars(stage.run_dir)
    if "test/acc" not in scalars:
        raise StageFailed(f"{stage.key}: no test/acc logged in {stage.run_dir}")
    return scalars["test/acc"]


def forget_lost_fits(stages: list[Stage], cache: dict[str, dict]) -> tuple[list[str], list[str]]:
    """Drop from ``cache`` the fits recorded as done whose checkpoint is gone (a fresh clone holds the record, not
    the runs) but which a stage still to run reads, so that they run again, and with them the records of every
    stage that read them, directly or through another: a seed's figures all come from one VAE. Return the keys of
    the lost fits and those of their readers."""
    by_key = {stage.key: stage for stage in stages}
    lost: list[str] = []
    readers: list[str] = []
    while True:
        needed = {key for stage in stages if stage.key not in cache for key in stage.needs}
        gone = [key for key in needed if key in cache and not by_key[key].checkpoint.is_file()]
        if not gone:
            return lost, readers
        for key in gone:
            del cache[key]
        lost += gone
        rerun = set(gone)
        for stage in stages:  # in plan order: a stage comes after the fits it reads
            if stage.key in cache and rerun.intersection(stage.needs):
                del cache[stage.key]
                rerun.add(stage.key)
                readers.append(stage.key)


def fit_summary(stage: Stage) -> dict[str, float]:
    """What a finished fit's TensorBoard events say of it: its epochs, the median seconds of an epoch's training, and
    the last val/acc (with the best), val/elbo and val/active_units it logged; empty without events."""
    from ssvae_pl.results import read_series  # tensorboard: imported only when needed

    try:
        seconds = read_series(stage.run_dir, "time/epoch_seconds")
    except FileNotFoundError:
        return {}
    summary: dict[str, float] = {"epochs": len(seconds)}
    if seconds:
        summary["median_epoch_seconds"] = round(statistics.median(seconds), 2)
    for tag in ("val/acc", "val/elbo", "val/active_units"):
        values = read_series(stage.run_dir, tag)
        if values:
            summary[tag] = round(values[-1], 4)
            if tag == "val/acc":
                summary["best val/acc"] = round(max(values), 4)
    return summary


def summarise_fits(stages: list[Stage], cache: dict[str, dict]) -> bool:
    """Add ``fit_summary`` to the recorded fits that lack one and whose run folder is here; whether any was added."""
    added = False
    for stage in stages:
        record = cache.get(stage.key)
        if stage.args[0] == "fit" and record is not None and "summary" not in record and stage.run_dir.is_dir():
            record["summary"] = fit_summary(stage)
            added = True
    return added


def finish_record(stage: Stage, seconds: float, log_file: Path, threads: int | None, code: dict) -> dict:
    """The record of a stage that has run: its command, configs' digests, the code's commit and whether the tree was
    clean (``code``, taken when it started), duration, log and, for a test, test/acc; for a fit, what its events say
    of it."""
    record: dict = {"args": list(stage.args), "configs": stage.configs, **code, "seconds": round(seconds, 1),
                    "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "log": shown(log_file)}
    if threads is not None:
        record["threads"] = threads
    if stage.key.endswith("-test"):
        record["test_acc"] = read_test_accuracy(stage)
        record["test_error"] = 100 * (1 - record["test_acc"])
    else:
        record["summary"] = fit_summary(stage)
    return record
