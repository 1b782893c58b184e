"""``ssvae suggest``: which unlabelled images to label next, ranked by a trained classifier (``ranking.py``).

    ssvae suggest -c <config> --ckpt_path <ckpt> --suggest.count 50 --suggest.output to_label.csv

It ranks the unlabelled training images of the configured data (never the labelled ones, by the config's split
and the run's ``labelled_indices.json``, nor the validation images), or ``data.predict_dir``'s images, and writes
the CSV (rank, file or index, score, predicted class, class probabilities), a contact sheet beside it
(``to_label.png``) and, for files, links to them in ``--suggest.link_dir`` to sort into ``labelled/<class>/``.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
import torch

from ssvae_pl import ranking
from ssvae_pl.checkpoint_io import read_checkpoint
from ssvae_pl.data.labelled import UNLABELLED
from ssvae_pl.errors import ConfigError
from ssvae_pl.files import atomic_output, refuse_existing
from ssvae_pl.models.declares import Declares
from ssvae_pl.prediction import class_names

OVERWRITE_FLAG = "--suggest.overwrite true"


@dataclass
class Suggestion:
    """What ``ssvae suggest`` writes (``--suggest.*``).

    Args:
        count: how many images to suggest.
        output: the CSV; the contact sheet is written beside it, as ``<stem>.png``.
        strategy: ``entropy`` or ``margin`` of q(y|x); ``bound``: the entropy of the generative model's own class
            posterior, softmax of L(x, y) (M2, M1+M2, ADGM, SDGM); ``spread``: margin, taken in turn from each
            predicted class; ``random``.
        link_dir: for images in files, a folder that receives a link to each suggested file (``0001_<name>``).
        overwrite: replace the CSV, the sheet and the links' folder where they exist.
        seed: the draw of ``random`` and of the bounds' noise.
    """

    count: int = 50
    output: str = "to_label.csv"
    strategy: str = "margin"
    link_dir: Optional[str] = None
    overwrite: bool = False
    seed: int = 0


def check_settings(settings: Suggestion, model: pl.LightningModule) -> list[Path]:
    """One ``ConfigError`` for a setting that cannot work, before anything is computed; the files to write."""
    if settings.count < 1:
        raise ConfigError(f"suggest.count must be at least 1, got {settings.count}.")
    if settings.strategy not in ranking.STRATEGIES:
        raise ConfigError(f"suggest.strategy must be one of {', '.join(ranking.STRATEGIES)}, got "
                          f"{settings.strategy!r}.")
    offered = model.strategies() if isinstance(model, Declares) else frozenset()
    if not offered:
        raise ConfigError(f"ssvae suggest ranks images by a classifier's q(y|x), and a {type(model).__name__} does "
                          "not classify; use the checkpoint and config of M1's classifier, M2, M1+M2, ADGM or SDGM.")
    if settings.strategy not in offered:
        raise ConfigError(f"suggest.strategy {settings.strategy} needs the bound L(x, y) of every class, which a "
                          f"{type(model).__name__} has not; use one of {', '.join(sorted(offered))}.")
    csv_file = Path(settings.output)
    if csv_file.suffix.lower() != ".csv":
        raise ConfigError(f"suggest.output: {settings.output} should name a .csv file (the sheet goes beside it).")
    outputs = [csv_file, csv_file.with_suffix(".png")]
    for path in outputs:
        refuse_existing(path, settings.overwrite, OVERWRITE_FLAG)
    if settings.link_dir is not None and Path(settings.link_dir).exists() and any(Path(settings.link_dir).iterdir()) \
            and not settings.overwrite:
        raise ConfigError(f"suggest.link_dir: {settings.link_dir} already holds files; empty it, name another "
                          f"folder, or pass {OVERWRITE_FLAG}.")
    return outputs


def unlabelled_pool(datamodule, ckpt_path: str | None) -> tuple[torch.Tensor, list[str], list[Path] | None]:
    """The images to rank (uint8, N x C x H x W), their names (a file, or the training set's index), and their
    files where they have some: ``data.predict_dir``'s images, else the training images that are neither labelled
    (by the split or the run's record) nor held out for validation (nor, in a folder, labelled by their folder)."""
    hp = datamodule.hparams
    if hp.predict_dir is not None:
        datamodule.setup("predict")
        images = torch.cat([batch[0] if isinstance(batch, (list, tuple)) else batch
                            for batch in datamodule.predict_dataloader()]).cpu()
        return images, list(datamodule.predict_files), [Path(hp.predict_dir) / name for name in
                                                        datamodule.predict_files]
    datamodule.setup("validate")
    split = datamodule.split
    labelled = split.labelled
    record = Path(ckpt_path).resolve().parent.parent / "labelled_indices.json" if ckpt_path else None
    if record is not None and record.is_file():  # the run's own subset, whatever the config says now
        labelled = torch.cat([labelled, torch.tensor(json.loads(record.read_text())["labelled_indices"],
                                                     dtype=torch.long)])
    idx = split.train[~torch.isin(split.train, labelled)]
    images, labels = datamodule.pool_images(idx)
    if datamodule.pool_files is None:
        return images, [str(i) for i in idx.tolist()], None
    unlabelled = labels == UNLABELLED  # a folder's labelled images are labelled already
    root = Path(datamodule.source.unlabelled_dir or ".")
    names = [datamodule.pool_files[i] for i in idx[unlabelled].tolist()]
    return images[unlabelled], names, [root / name.removeprefix("unlabelled/") for name in names]


@torch.no_grad()
def rank_images(model: pl.LightningModule, images: torch.Tensor, strategy: str, batch_size: int,
                seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q(y|x) of every image (N, K) and its score under ``strategy`` (N,); the bounds' noise drawn from ``seed``."""
    from ssvae_pl.models.inputs import unit_images

    model.eval()
    generator = torch.Generator().manual_seed(seed)
    probs, bounds = [], []
    for batch in images.split(batch_size):
        x = unit_images(batch.to(model.device))
        if strategy in ranking.NEEDS_BOUNDS:
            logits, class_bounds = model.bounds_by_class(x, model.evaluation_noise(len(x), generator).to(x.device))
            bounds.append(class_bounds.float().cpu())
        else:
            logits = model(x)
        probs.append(logits.float().softmax(dim=-1).cpu())
    probs = torch.cat(probs)
    return probs, ranking.scores(strategy, probs, torch.cat(bounds) if bounds else None, generator)


def write_csv(path: Path, names: list[str], column: str, picked: torch.Tensor, score: torch.Tensor,
              probs: torch.Tensor, classes: list[str], overwrite: bool) -> None:
    with atomic_output(path, overwrite, overwrite_flag=OVERWRITE_FLAG) as temporary, \
            open(temporary, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["rank", column, "score", "predicted", *(f"prob_{name}" for name in classes)])
        for rank, i in enumerate(picked.tolist(), 1):
            row = probs[i].tolist()
            writer.writerow([rank, names[i], f"{score[i]:.6g}", classes[int(probs[i].argmax())],
                             *(f"{p:.6g}" for p in row)])


def contact_sheet(path: Path, images: torch.Tensor, captions: list[str], overwrite: bool, columns: int = 10) -> None:
    """The images (uint8, N x C x H x W) in rows of ``columns``, each at least 64 pixels wide, its caption below."""
    from PIL import Image, ImageDraw, ImageFont

    scale = max(1, -(-64 // images.shape[-1]))
    height, width = images.shape[-2] * scale, images.shape[-1] * scale
    cell_w, cell_h = max(width, 72) + 6, height + 18
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for k, (image, caption) in enumerate(zip(images, captions)):
        array = image.permute(1, 2, 0).numpy()
        tile = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).convert("RGB")
        x, y = (k % columns) * cell_w + 3, (k // columns) * cell_h + 2
        sheet.paste(tile.resize((width, height), Image.NEAREST), (x, y))
        draw.text((x, y + height + 1), caption, fill="black", font=font)
    with atomic_output(path, overwrite, overwrite_flag=OVERWRITE_FLAG) as temporary:
        sheet.save(temporary, format="PNG")


def link_files(folder: Path, files: list[Path]) -> None:
    """A link to each file in ``folder``, named by its rank (``0001_<name>``), in place of the folder's old links."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        if old.is_symlink() or old.is_file():
            old.unlink()
    for rank, file in enumerate(files, 1):
        os.symlink(file.resolve(), folder / f"{rank:04d}_{file.name}")


def suggest(trainer: pl.Trainer, model: pl.LightningModule, datamodule, ckpt_path: str | None,
            settings: Suggestion) -> None:
    """The ``suggest`` subcommand: load ``ckpt_path`` into ``model``, rank the unlabelled pool, write the outputs."""
    csv_file, sheet = check_settings(settings, model)
    checkpoint = read_checkpoint(ckpt_path, "--ckpt_path", "give the checkpoint of a trained classifier")
    model.on_load_checkpoint(checkpoint)  # the data settings it was trained with
    model.load_state_dict(checkpoint["state_dict"])
    model.to(trainer.strategy.root_device)
    started = time.perf_counter()
    images, names, files = unlabelled_pool(datamodule, ckpt_path)
    if len(images) == 0:
        raise ConfigError("ssvae suggest found no unlabelled image to rank: add images to data.dataset.unlabelled_dir "
                          "or name a folder with --data.predict_dir.")
    if settings.count > len(images):
        raise ConfigError(f"suggest.count={settings.count} exceeds the {len(images)} unlabelled images; lower it.")
    if settings.link_dir is not None and files is None:
        raise ConfigError(f"suggest.link_dir: the {datamodule.hparams.dataset} images are not files; links are for "
                          "an image folder (data.dataset.unlabelled_dir or data.predict_dir).")
    probs, score = rank_images(model, images, settings.strategy, datamodule.hparams.eval_batch_size, settings.seed)
    picked = ranking.pick(settings.strategy, score, probs.argmax(dim=-1), settings.count)
    classes = class_names(model, datamodule, probs.shape[1])
    seconds = time.perf_counter() - started
    write_csv(csv_file, names, "file" if files is not None else "index", picked, score, probs, classes,
              settings.overwrite)
    contact_sheet(sheet, images[picked], [f"#{r}: {classes[int(probs[i].argmax())]}"
                                          for r, i in enumerate(picked.tolist(), 1)], settings.overwrite)
    if settings.link_dir is not None:
        link_files(Path(settings.link_dir), [files[i] for i in picked.tolist()])
    where = f", links in {settings.link_dir}" if settings.link_dir is not None else ""
    print(f"ssvae suggest: ranked {len(images)} unlabelled images by {settings.strategy} in {seconds:.1f} s; "
                   f"the {len(picked)} to label next are in {csv_file} and {sheet}{where}")
