"""Plain Trainers for tests, and the check that a restored model is the trained one."""

from __future__ import annotations

import torch


def quiet_trainer(**kwargs):
    """A CPU ``pl.Trainer`` without progress bar, model summary or sanity check; keyword arguments override."""
    import pytorch_lightning as pl

    options = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0, logger=False, enable_checkpointing=False)
    options.update(kwargs)
    return pl.Trainer(**options)


def assert_restored_equals(restored, model, x) -> None:
    """A model restored from its checkpoint predicts exactly as the trained one, and holds the same tensors."""
    model.eval()
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
