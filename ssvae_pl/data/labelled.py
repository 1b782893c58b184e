"""The one place that decides which training images are labelled, and which are held out for validation."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ssvae_pl.errors import ConfigError
from ssvae_pl.files import atomic_output

log = logging.getLogger(__name__)


UNLABELLED = -1  # the label of an image that has none (an image folder's unlabelled_dir)


@dataclass(frozen=True)
class Split:
    """Indices into the training pool (the official training set, 0 .. N-1; or an image folder's labelled images
    followed by its unlabelled ones), each sorted."""

    train: torch.Tensor  # images that training may use, labelled or not
    val: torch.Tensor  # held out for validation (labelled images only)
    labelled: torch.Tensor  # a class-balanced subset of ``train`` (or all its labelled images)


def check_label_budget(num_labelled: int, num_classes: int) -> None:
    """Reject budgets that cannot be split evenly over the classes, before any data is read."""
    if num_labelled <= 0:
        raise ConfigError(f"data.num_labelled must be positive, got {num_labelled}; use e.g. 100 (10 per class).")
    if num_labelled % num_classes:
        lower = num_labelled - num_labelled % num_classes
        raise ConfigError(
            f"data.num_labelled={num_labelled} is not a multiple of the {num_classes} classes; the labelled subset "
            f"is class-balanced, so use {lower or num_classes} or {lower + num_classes}."
        )


def split_train_val(labels: torch.Tensor, val_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random hold-out of ``val_size`` labelled images; every other image is for training."""
    candidates = (labels != UNLABELLED).nonzero().flatten()
    if val_size > len(candidates):
        raise ConfigError(f"data.val_size={val_size} exceeds the {len(candidates)} labelled images; lower it.")
    val = candidates[torch.randperm(len(candidates), generator=generator)[:val_size]]
    train = torch.ones(len(labels), dtype=torch.bool)
    train[val] = False
    return train.nonzero().flatten(), val.sort().values


def class_balanced_subset(
    labels: torch.Tensor, candidates: torch.Tensor, num_labelled: int, num_classes: int, generator: torch.Generator
) -> torch.Tensor:
    """``num_labelled / num_classes`` indices of each class, drawn without replacement from ``candidates``."""
    check_label_budget(num_labelled, num_classes)
    per_class = num_labelled // num_classes
    chosen = []
    for c in range(num_classes):
        of_class = candidates[labels[candidates] == c]
        if len(of_class) < per_class:
            raise ConfigError(
                f"data.num_labelled={num_labelled} asks for {per_class} labelled images of class {c}, but the "
                f"training split holds only {len(of_class)}; lower data.num_labelled or data.val_size."
            )
        chosen.append(of_class[torch.randperm(len(of_class), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values


def all_labelled(labels: torch.Tensor, candidates: torch.Tensor, num_classes: int,
                 class_names: Sequence[str] | None = None) -> torch.Tensor:
    """Every labelled image among ``candidates``; each class must keep at least one."""
    chosen = candidates[labels[candidates] != UNLABELLED]
    counts = torch.bincount(labels[chosen], minlength=num_classes)
    if (counts == 0).any():
        missing = [class_names[c] if class_names else str(c) for c in (counts == 0).nonzero().flatten().tolist()]
        raise ConfigError(
            f"no labelled training image is left for the class(es) {missing} after data.val_size took its share; "
            "add labelled images of them or lower data.val_size."
        )
    return chosen.sort().values


def chosen_labelled(path: str, labels: torch.Tensor, train: torch.Tensor, num_labelled: int | None) -> torch.Tensor:
    """The labelled subset that the JSON file ``path`` names (``data.labelled_indices``): a list of indices into the
    training pool, or a record holding one under ``labelled_indices`` (a run's ``labelled_indices.json``). Each must
    be a labelled training image outside the validation hold-out, and there must be ``num_labelled`` of them."""
    field = "data.labelled_indices"
    try:
        named = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{field}: {path} cannot be read as JSON ({type(err).__name__}); name a file holding a list "
                          "of training image indices, or a run's labelled_indices.json.") from None
    named = named.get("labelled_indices") if isinstance(named, dict) else named
    if not isinstance(named, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in named):
        raise ConfigError(f"{field}: {path} holds no list of integer indices (a list, or labelled_indices: [...]).")
    chosen = torch.tensor(sorted(set(named)), dtype=torch.long)
    outside = chosen[~torch.isin(chosen, train)].tolist() if len(chosen) else []
    if outside:
        raise ConfigError(f"{field}: {len(outside)} of the indices in {path} are not training images outside the "
                          f"validation hold-out (e.g. {outside[:3]}); the hold-out is fixed by data.seed.")
    if len(chosen) and (labels[chosen] == UNLABELLED).any():
        raise ConfigError(f"{field}: {path} names images that have no label; name labelled ones.")
    if num_labelled is not None and num_labelled != len(chosen):
        raise ConfigError(f"data.num_labelled={num_labelled}, but {path} names {len(chosen)} labelled images; set "
                          f"--data.num_labelled {len(chosen)}.")
    return chosen


def make_split(labels: torch.Tensor, num_labelled: int | None, num_classes: int, val_size: int, seed: int,
               class_names: Sequence[str] | None = None, labelled_indices: str | None = None) -> Split:
    """Hold out ``val_size`` labelled images, then pick the labelled subset from the rest (``num_labelled``, class
    balanced; ``None``: all of them; or the images the file ``labelled_indices`` names); ``seed`` alone fixes the
    hold-out and the pick. Images labelled ``UNLABELLED`` only ever train."""
    generator = torch.Generator().manual_seed(seed)
    train, val = split_train_val(labels, val_size, generator)
    if labelled_indices is not None:
        labelled = chosen_labelled(labelled_indices, labels, train, num_labelled)
    elif num_labelled is None:
        labelled = all_labelled(labels, train, num_classes, class_names)
    else:
        labelled = class_balanced_subset(labels, train, num_labelled, num_classes, generator)
    return Split(train=train, val=val, labelled=labelled)


def write_split_record(path: Path, record: dict[str, Any]) -> None:
    """Write a run's split (``labelled_indices.json``) at ``path``. A resumed run finds its own record there and
    leaves it; another run's record is never overwritten (one ``ConfigError``), nor one that cannot be read."""
    if path.is_file():
        try:
            same = json.loads(path.read_text()) == record
        except (OSError, ValueError) as err:
            raise ConfigError(f"{path} cannot be read ({type(err).__name__}: {str(err)[:80]}), so this run's labelled "
                              "subset cannot be checked against it; restore it from a copy, or start a new run with "
                              "--trainer.logger.init_args.version <name>.") from None
        if same:
            return
        raise ConfigError(f"the run folder {path.parent.resolve()} already holds a run with another labelled subset "
                          f"({path.name} differs); pick a new folder with --trainer.logger.init_args.version <name>.")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, overwrite=False) as temporary:
        temporary.write_text(json.dumps(record))
    log.info("labelled indices written to %s", path)
