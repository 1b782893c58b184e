"""Reading a run's metrics back from its TensorBoard event files (used by scripts/ and tests)."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def read_scalars(log_dir: str | Path) -> dict[str, float]:
    """The last logged value of every scalar tag under ``log_dir`` (a run's version folder)."""
    files = sorted(Path(log_dir).glob("events.out.tfevents.*"))
    if not files:
        raise FileNotFoundError(f"no TensorBoard event file in {log_dir}")
    scalars: dict[str, float] = {}
    for file in files:
        events = EventAccumulator(str(file), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars[tag] = events.Scalars(tag)[-1].value
    return scalars
