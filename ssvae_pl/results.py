"""Reading a run back from its TensorBoard event files (used by scripts/ and tests)."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def _event_files(log_dir: str | Path) -> list[Path]:
    files = sorted(Path(log_dir).glob("events.out.tfevents.*"))
    if not files:
        raise FileNotFoundError(f"no TensorBoard event file in {log_dir}")
    return files


def _accumulators(log_dir: str | Path):
    for file in _event_files(log_dir):
        events = EventAccumulator(str(file), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
        events.Reload()
        yield events


def read_scalars(log_dir: str | Path) -> dict[str, float]:
    """The last logged value of every scalar tag under ``log_dir`` (a run's version folder)."""
    scalars: dict[str, float] = {}
    for events in _accumulators(log_dir):
        for tag in events.Tags()["scalars"]:
            scalars[tag] = events.Scalars(tag)[-1].value
    return scalars


def read_tags(log_dir: str | Path) -> dict[str, set[str]]:
    """Every tag under ``log_dir`` by kind: ``scalars``, ``images`` and ``hparams`` (the HParams plugin's
    summaries: ``_hparams_/experiment``, ``_hparams_/session_start_info``, ...)."""
    tags: dict[str, set[str]] = {"scalars": set(), "images": set(), "hparams": set()}
    for events in _accumulators(log_dir):
        tags["scalars"] |= set(events.Tags()["scalars"])
        tags["images"] |= set(events.Tags()["images"])
        tags["hparams"] |= set(events.PluginTagToContent("hparams"))
    return tags
