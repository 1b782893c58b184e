"""Images as the models take them: the data module's loaders yield uint8, the networks compute on floats in [0, 1]."""

from __future__ import annotations

import torch


def unit_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 images in 0..255 -> float32 in [0, 1], as the data module's ``on_after_batch_transfer`` converts an
    evaluation batch (``to_model_input``: x / 255, no binarising; evaluation's images come binarised already, one
    fixed sample in {0, 255}, when the data module binarises). Anything else is returned as it is."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x
