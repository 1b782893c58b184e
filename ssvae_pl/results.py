"""Reading a run back from its TensorBoard event files, and writing measured tables into the docs (used by scripts/
and tests)."""

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


def read_series(log_dir: str | Path, tag: str) -> list[float]:
    """Every logged value of the scalar ``tag`` under ``log_dir``, in step order."""
    events = [event for acc in _accumulators(log_dir) if tag in acc.Tags()["scalars"] for event in acc.Scalars(tag)]
    return [event.value for event in sorted(events, key=lambda event: event.step)]


def replace_marked_section(markdown: Path, key: str, body: str) -> None:
    """``body`` into ``markdown`` between the lines ``<!-- KEY -->`` and ``<!-- /KEY -->``, replacing what they held,
    or appended at the end with its markers; the file is replaced in one step."""
    from ssvae_pl.files import atomic_output

    begin, end = f"<!-- {key} -->", f"<!-- /{key} -->"
    section = f"{begin}\n{body.strip()}\n{end}"
    text = markdown.read_text() if markdown.is_file() else ""
    if begin in text and end in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with atomic_output(markdown, overwrite=True) as temporary:
        temporary.write_text(text)
