"""The ``ssvae`` command: LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``.

    ssvae fit -c configs/mnist/m1_vae.yaml [-c configs/presets/quick.yaml] [--data.num_labelled 600]
    ssvae fit -c configs/mnist/m1_classifier.yaml --model.vae_checkpoint <vae>/checkpoints/last.ckpt
    ssvae test -c configs/mnist/m1_classifier.yaml --ckpt_path <classifier>/checkpoints/last.ckpt
    ssvae predict -c configs/mnist/m1_classifier.yaml --ckpt_path <ckpt> [--data.predict_dir my_images/] \
        [--predictions.output predictions.csv]
    ssvae export --ckpt_path <ckpt> [--output_dir DIR] [--overwrite]     (ssvae_pl/export.py, its own parser)

The numbers the data determine (classes, image shape) reach the model through ``link_arguments``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ssvae_pl.data.datamodule import SemiSupervisedDataModule
from ssvae_pl.data.sources import DataSourceError
from ssvae_pl.errors import CheckpointError, ConfigError, ImageReadError, NumericalError
from ssvae_pl.prediction import PredictionCSVWriter

USER_ERRORS = (ConfigError, CheckpointError, DataSourceError, ImageReadError, NumericalError)
RUN_DEFINING_KEYS = ("seed_everything", "model", "data", "optimizer", "lr_scheduler")


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
    """The run's ``config.yaml`` beside its logs.

    A run folder that already holds a config is the same run resumed (``--ckpt_path last``, a requeued SLURM job)
    when the configs agree on what defines the run (``RUN_DEFINING_KEYS``: not the trainer's settings, so a resumed
    run may train for more epochs): nothing is written. Otherwise it is another run, and the two are
    never mixed: one clear error. A run without a logger (``--trainer.logger false``) has no folder of its own, so
    it writes nothing rather than a config.yaml in the working directory."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.logger is None or self.already_saved:
            return
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        existing = Path(log_dir) / self.config_filename if log_dir else None
        if existing is not None and existing.is_file():
            same = trainer.strategy.broadcast(self._same_run(existing) if trainer.is_global_zero else None)
            if not same:
                raise ConfigError(
                    f"the run folder {Path(log_dir).resolve()} already holds a run with another config "
                    f"({existing.name} differs in model, data, optimizer or seed); pick a new "
                    "folder with --trainer.logger.init_args.version <name>, or resume that run with its own config "
                    "and --ckpt_path last."
                )
            self.already_saved = True
            return
        super().setup(trainer, pl_module, stage)

    def _same_run(self, existing: Path) -> bool:
        def comparable(config: dict) -> dict:  # what the run is; the trainer's settings may change on resuming
            return {k: v for k, v in (config or {}).items() if k in RUN_DEFINING_KEYS}

        try:
            saved = yaml.safe_load(existing.read_text())
        except (OSError, yaml.YAMLError):
            return False
        return _agree(comparable(saved), comparable(yaml.safe_load(self.parser.dump(self.config, skip_none=False))))


def _agree(saved, current) -> bool:
    """Whether two configs agree on every setting they both hold. A setting that only one holds is one that a newer
    version added (``data.image_size``) or an older one had: a run started before an upgrade still resumes."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return all(_agree(saved[key], current[key]) for key in saved.keys() & current.keys())
    return saved == current


class SSVAECLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # `ssvae predict` writes its CSV through this callback: --predictions.output (idle in the other subcommands)
        parser.add_lightning_class_args(PredictionCSVWriter, "predictions")
        parser.link_arguments("data.input_shape", "model.init_args.input_shape", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")


def main(args: list[str] | None = None) -> None:
    command_line = sys.argv[1:] if args is None else list(args)
    if command_line[:1] == ["export"]:  # not a Trainer method: its own small parser
        from ssvae_pl.export import main as export_main

        return export_main(command_line[1:])
    import ssvae_pl.models  # noqa: F401  (registers the model classes for short names)
    from ssvae_pl import faults

    try:
        faults.check_ckpt_path(command_line)
        SSVAECLI(
            datamodule_class=SemiSupervisedDataModule,
            subclass_mode_model=True,
            save_config_callback=SaveConfigToRunFolder,
            seed_everything_default=0,
            args=args,
        )
    except SIGTERMException as stop:  # SIGTERM or a first Ctrl-C, at the end of a batch (callbacks.SaveOnInterrupt)
        saved = getattr(stop, "checkpoint", None)
        where = (f"global step {stop.global_step} (epoch {stop.epoch}) saved to {saved}; resume with the same command "
                 "and --ckpt_path last" if saved else "nothing saved")
        print(f"ssvae: stopped by {getattr(stop, 'signal_name', 'SIGTERM')}: {where}.", file=sys.stderr)
        sys.exit(130 if getattr(stop, "signal_name", "") == "SIGINT" else 143)
    except Exception as err:
        cause = user_error(err) or faults.describe(err)
        if cause is None:
            raise
        print(f"ssvae: error: {cause}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
