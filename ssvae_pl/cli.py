"""The ``ssvae`` command: LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``.

    ssvae fit -c configs/mnist/m1_vae.yaml [-c configs/presets/quick.yaml] [--data.num_labelled 600]
    ssvae fit -c configs/mnist/m1_classifier.yaml --model.vae_checkpoint <vae>/checkpoints/last.ckpt
    ssvae test -c configs/mnist/m1_classifier.yaml --ckpt_path <classifier>/checkpoints/last.ckpt

The numbers the data determine (classes, image shape) reach the model through ``link_arguments``.
"""

from __future__ import annotations

import sys

from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from ssvae_pl.data.datamodule import SemiSupervisedDataModule
from ssvae_pl.data.sources import DataSourceError
from ssvae_pl.errors import CheckpointError, ConfigError

USER_ERRORS = (ConfigError, CheckpointError, DataSourceError)


def user_error(err: BaseException) -> BaseException | None:
    """The user error behind ``err``: jsonargparse wraps errors raised while it instantiates a model."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, USER_ERRORS):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


class SaveConfigToRunFolder(SaveConfigCallback):
    """The run's ``config.yaml`` beside its logs; a run without a logger (``--trainer.logger false``) has no folder
    of its own, so it writes nothing rather than a config.yaml in the working directory."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.logger is not None:
            super().setup(trainer, pl_module, stage)


class SSVAECLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.input_shape", "model.init_args.input_shape", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")


def main(args: list[str] | None = None) -> None:
    import ssvae_pl.models  # noqa: F401  (registers the model classes for short names)

    try:
        SSVAECLI(
            datamodule_class=SemiSupervisedDataModule,
            subclass_mode_model=True,
            save_config_callback=SaveConfigToRunFolder,
            seed_everything_default=0,
            args=args,
        )
    except Exception as err:
        cause = user_error(err)
        if cause is None:
            raise
        print(f"ssvae: error: {cause}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
