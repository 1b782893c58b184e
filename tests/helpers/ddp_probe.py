"""A callback the distributed test adds to ``ssvae`` runs (``--trainer.callbacks+=ddp_probe.ShardProbe``): each rank
writes what it trained on, and rank 0 the test metrics, as JSON under ``$SSVAE_PROBE_DIR``."""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch


def image_keys(x: torch.Tensor) -> list[int]:
    """One integer per image of a batch of grey images in [0, 1] (``binarize: none``), equal for equal images."""
    pixels = (x.flatten(1).double() * 255).round().long()  # (B, D) the uint8 values
    weights = torch.randint(1, 2**31, (pixels.shape[1],), generator=torch.Generator().manual_seed(0))
    return (pixels.cpu() * weights).sum(dim=1).tolist()


class ShardProbe(pl.Callback):
    def __init__(self) -> None:
        self.out = Path(os.environ["SSVAE_PROBE_DIR"])
        self.unlabelled: list[int] = []
        self.labelled: list[int] = []
        atexit.register(self.record_exit)

    def record_exit(self) -> None:
        """At the interpreter's exit, whether this rank's process group is still alive: left to the interpreter's
        teardown, gloo's threads can abort a run that succeeded."""
        name = f"exit_{sys.argv[1]}_rank{os.environ.get('LOCAL_RANK', '0')}_pid{os.getpid()}.json"
        alive = torch.distributed.is_available() and torch.distributed.is_initialized()
        (self.out / name).write_text(json.dumps({"process_group_alive": alive}))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.unlabelled += image_keys(batch["unlabelled"])
        self.labelled += image_keys(batch["labelled"][0])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        record = {"world_size": trainer.world_size, "unlabelled": self.unlabelled, "labelled": self.labelled,
                  "labelled_indices": trainer.datamodule.split.labelled.tolist()}
        (self.out / f"train_rank{trainer.global_rank}.json").write_text(json.dumps(record))

    def on_test_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
            (self.out / f"test_world{trainer.world_size}.json").write_text(json.dumps(metrics))
