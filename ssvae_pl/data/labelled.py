"""The one place that decides which training images are labelled, and which are held out for validation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ssvae_pl.errors import ConfigError


@dataclass(frozen=True)
class Split:
    """Indices into the official training set (0 .. N-1), each sorted."""

    train: torch.Tensor  # images that training may use, labelled or not
    val: torch.Tensor  # held out for validation
    labelled: torch.Tensor  # a class-balanced subset of ``train``


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


def split_train_val(num_images: int, val_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random hold-out of ``val_size`` images; the rest are for training."""
    perm = torch.randperm(num_images, generator=generator)
    return perm[val_size:].sort().values, perm[:val_size].sort().values


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


def make_split(labels: torch.Tensor, num_labelled: int, num_classes: int, val_size: int, seed: int) -> Split:
    """Hold out ``val_size`` images, then pick the labelled subset from the rest; ``seed`` alone fixes both."""
    generator = torch.Generator().manual_seed(seed)
    train, val = split_train_val(len(labels), val_size, generator)
    labelled = class_balanced_subset(labels, train, num_labelled, num_classes, generator)
    return Split(train=train, val=val, labelled=labelled)
