"""Lightning's known-harmless console lines, silenced for the ``ssvae`` command and for Python use alike (installed
when ``ssvae_pl.models`` is imported); every other warning stays."""

from __future__ import annotations

import logging
import warnings

HARMLESS_WARNINGS = (  # known and expected
    r".*configure_optimizers` will be overridden by `SSVAECLI",  # the configs' optimizer replaces the models' own
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",
    r"Precision bf16-mixed is not supported by the model summary",  # its size estimate, in fp32
    r"Found \d+ module\(s\) in eval mode at the start of training",  # M1's frozen encoder, by design
    r"You're using the WeightAveraging callback, but loading a checkpoint outside",  # a test of the averaged weights
    r"The `srun` command is available on your system but is not used",  # SLURM installed, a run outside a job
    r"Checkpoint directory .* exists and is not empty",  # a resume; LastCheckpoint refuses another fit's folder
)
HARMLESS_LINES = (
    "Tip: ",  # Lightning's advertising ("Tip: ... try installing ...")
    "Found current_model_state in the checkpoint",  # EMAWeights' resume, as designed
)


class _Harmless(logging.Filter):
    """Drops the log records of ``HARMLESS_LINES``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(fragment in str(record.msg) for fragment in HARMLESS_LINES)


def quiet_lightning() -> None:
    """Installs the filters (once; Lightning's log handler exists once it is imported)."""
    import pytorch_lightning  # noqa: F401  (adds its console handler)

    for pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for handler in logging.getLogger("pytorch_lightning").handlers:
        if not any(isinstance(f, _Harmless) for f in handler.filters):
            handler.addFilter(_Harmless())
