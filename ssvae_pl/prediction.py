"""``ssvae predict``'s output: the classifiers' class probabilities, one CSV row per image.

``class_predictions`` is the classifiers' ``predict_step``; ``PredictionCSVWriter`` is a Lightning prediction
writer that the ``ssvae`` command adds to every run (its one setting: ``--predictions.output``).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Callable, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from ssvae_pl.errors import ConfigError
from ssvae_pl.files import atomic_output, check_writable, refuse_existing

OVERWRITE_FLAG = "--predictions.overwrite true"


def class_predictions(logits_of: Callable[[torch.Tensor], torch.Tensor], batch: Any) -> dict[str, torch.Tensor]:
    """A classifier's predictions for a batch: ``probs`` (B, K) and ``pred`` (B,), and ``y`` (B,) when the batch
    carries labels (the test set's ``(x, y)``; a folder's batches are the images alone)."""
    x, y = batch if isinstance(batch, (tuple, list)) else (batch, None)
    probs = logits_of(x).float().softmax(dim=-1)  # (B, K)
    predictions = {"probs": probs, "pred": probs.argmax(dim=-1)}
    if y is not None:
        predictions["y"] = y
    return predictions


def class_names(model: pl.LightningModule, datamodule: Any, num_classes: int) -> list[str]:
    """The classes' names: the model's (from its checkpoint), else the data module's, else ``0`` ... ``K-1``."""
    for names in (model.hparams.get("class_names"), getattr(datamodule, "class_names", None)):
        if names is not None and len(names) == num_classes:
            return [str(name) for name in names]
    return [str(k) for k in range(num_classes)]


def check_data_settings(model: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
    """A checkpoint trained on other data settings than the configured data's (image shape, classes, their names or
    order) is refused: its weights would not fit, or its outputs would be read as the wrong classes. One
    ``CheckpointError`` comparing the two, pointing at the run's own config. Called from the models'
    ``on_load_checkpoint``."""
    from ssvae_pl.errors import CheckpointError

    saved, current = checkpoint.get("hyper_parameters", {}), model.hparams
    keys = [key for key in ("input_shape", "num_classes", "class_names")
            if saved.get(key) is not None and current.get(key) is not None and list(_listed(saved[key])) != list(
                _listed(current[key]))]
    if not keys:
        return
    ckpt = getattr(getattr(model, "_trainer", None), "ckpt_path", None)
    config = Path(ckpt).resolve().parent.parent / "config.yaml" if ckpt else None
    fix = f"-c {config}" if config is not None and config.is_file() else "the data settings of its run's config.yaml"
    raise CheckpointError(f"the checkpoint was trained on {_data_description(saved)}, but the data settings give "
                          f"{_data_description(current)}; use the data settings it was trained with: {fix}.")


def _listed(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _data_description(hparams: Any) -> str:
    shape = hparams.get("input_shape")
    names = hparams.get("class_names")
    what = f"{'x'.join(str(n) for n in shape)} images" if shape is not None else "images"
    if names is not None:
        shown = ", ".join(str(n) for n in list(names)[:10]) + (", ..." if len(names) > 10 else "")
        return f"{what} of {len(names)} classes ({shown})"
    return f"{what} of {hparams.get('num_classes')} classes"


class PredictionCSVWriter(BasePredictionWriter):
    """Writes the class probabilities of ``ssvae predict`` to a CSV, in one step once all images are predicted
    (a temporary file beside it, then ``os.replace``), so a run that fails leaves an earlier file as it was.

    Columns: ``file`` (the image's path relative to ``data.predict_dir``, or the test set's index), ``label``
    (the test set's true class; not for a folder), ``predicted`` (the most probable class), then ``prob_<class>``
    for each class, which sum to 1. Classes are written by name: the names the model was trained with (kept in
    its checkpoint: an image folder's sub-folder names, CIFAR-10's ``airplane`` ...; MNIST's are ``0`` ... ``9``).

    Args:
        output: the CSV's path; its folder is created if need be.
        overwrite: replace an existing ``output`` (otherwise ``ssvae predict`` refuses before predicting).
    """

    def __init__(self, output: str = "predictions.csv", overwrite: bool = False) -> None:
        super().__init__(write_interval="epoch")
        self.output, self.overwrite = output, overwrite

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "predict":
            return
        if not callable(getattr(pl_module, "image_classifier", None)):
            raise ConfigError(f"ssvae predict writes class probabilities, and a {type(pl_module).__name__} does not "
                              "classify; use a LatentClassifier, M2 or M1+M2 config and checkpoint.")
        if trainer.world_size > 1:
            raise ConfigError("ssvae predict writes its CSV from one process; pass --trainer.devices 1.")
        if Path(self.output).is_dir():
            raise ConfigError(f"predictions.output: {self.output} is a folder; name the CSV file to write.")
        refuse_existing(self.output, self.overwrite, OVERWRITE_FLAG)  # before the images are predicted
        check_writable(self.output)

    def write_on_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        if not predictions:
            return
        probs = torch.cat([p["probs"] for p in predictions]).cpu()  # (N, K)
        predicted = torch.cat([p["pred"] for p in predictions]).tolist()  # (N,)
        labels = torch.cat([p["y"] for p in predictions]).tolist() if "y" in predictions[0] else None
        files = getattr(trainer.datamodule, "predict_files", None) or range(len(probs))  # else the test index
        if len(files) != len(probs):
            raise RuntimeError(f"{len(probs)} predictions for {len(files)} images")
        names = class_names(pl_module, trainer.datamodule, probs.shape[1])
        predicted = [names[k] for k in predicted]
        labels = None if labels is None else [names[k] for k in labels]
        header = ["file", *(["label"] if labels is not None else []), "predicted", *(f"prob_{n}" for n in names)]
        path = Path(self.output)
        with atomic_output(path, self.overwrite, overwrite_flag=OVERWRITE_FLAG) as temporary, \
                open(temporary, "w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(header)
            for i, (file, row) in enumerate(zip(files, probs.tolist())):
                label = [labels[i]] if labels is not None else []
                writer.writerow([file, *label, predicted[i], *(f"{p:.6g}" for p in row)])
        rank_zero_info(f"ssvae predict: {len(probs)} predictions written to {path}")
