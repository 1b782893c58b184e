"""The ``ssvae`` command: LightningCLI with ``fit``, ``validate``, ``test``, ``predict`` and ``suggest``.

    ssvae fit -c configs/mnist/m1_vae.yaml [-c configs/presets/quick.yaml] [--data.num_labelled 600]
    ssvae fit -c configs/mnist/m1_classifier.yaml --model.vae_checkpoint <vae>/checkpoints/last.ckpt
    ssvae test -c configs/mnist/m1_classifier.yaml --ckpt_path <classifier>/checkpoints/last.ckpt
    ssvae predict -c configs/mnist/m1_classifier.yaml --ckpt_path <ckpt> [--data.predict_dir my_images/] \
        [--predictions.output predictions.csv]
    ssvae suggest -c configs/mnist/m2.yaml --ckpt_path <ckpt> --suggest.count 50   (ssvae_pl/suggest.py)
    ssvae export --ckpt_path <ckpt> [--output_dir DIR] [--overwrite]     (ssvae_pl/export.py, its own parser)

The numbers the data determine (classes, image shape) reach the model through ``link_arguments``.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import threading
import warnings
from pathlib import Path
from typing import NoReturn

import yaml
from jsonargparse import Namespace
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from ssvae_pl import faults, runs
from ssvae_pl.callbacks import run_folder, trainer_pieces
from ssvae_pl.callbacks.always_on import OPTIONAL, listed_pieces
from ssvae_pl.callbacks.checkpoints import last_checkpoint_path
from ssvae_pl.data.datamodule import SemiSupervisedDataModule
from ssvae_pl.data.sources import DataSourceError
from ssvae_pl.errors import CheckpointError, ConfigError, ImageReadError, NumericalError, OutputError
from ssvae_pl.files import atomic_output, write_error
from ssvae_pl.models.declares import AsksModel
from ssvae_pl.precision import best_precision
from ssvae_pl.prediction import PredictionCSVWriter
from ssvae_pl.quiet import quiet_lightning
from ssvae_pl.settings import check_fit_trains, check_trainer_settings, config_paths, whole_number_limits
from ssvae_pl.suggest import Suggestion

USER_ERRORS = (ConfigError, CheckpointError, DataSourceError, ImageReadError, NumericalError, OutputError,
               MisconfigurationException)


def user_error(err: BaseException) -> BaseException | None:
    """The user error behind ``err``: jsonargparse wraps errors raised while it instantiates a model."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, USER_ERRORS):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


# checked equal by runs.prepare (the model's arguments may hold the checkpoint's data-derived values), or the resume
NOT_RECORDED = ("seed_everything", "model.", "data.", "ckpt_path", "trainer.logger.init_args.version")


class SSVAEParser(LightningArgumentParser):
    """A parser error is one line, ``ssvae: error: <what>; <command> --help lists every key``, not a usage dump;
    ``--print_config`` lists the always-on callbacks and plugin beside the config's own."""

    def _parse_common(self, cfg, *args, **kwargs):
        request = getattr(self, "print_config", None)
        key = request.get("key") if isinstance(request, dict) else None
        if key in ("fit", "validate", "test", "predict") and cfg.get(key) is not None:
            section = cfg[key]
            leave_out = list(section.get("always_on.leave_out") or [])
            callbacks, plugins = listed_pieces(section.trainer, key, leave_out)
            trainer = section.trainer
            trainer.callbacks = list(trainer.get("callbacks") or []) + [Namespace(**c) for c in callbacks]
            trainer.plugins = list(trainer.get("plugins") or []) + [Namespace(**p) for p in plugins]
        return super()._parse_common(cfg, *args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        first = faults.union_error(message) or " ".join(message.split())
        print(f"ssvae: error: {first[:600]}; `{prog} --help` lists every key.", file=sys.stderr)
        sys.exit(2)


def check_config_files(command_line: list[str]) -> None:
    """Every ``-c``/``--config`` file of the command line must be UTF-8 text holding a YAML mapping of settings;
    otherwise one ``ConfigError`` naming the file, the line where YAML stopped, and the fix."""
    for value in config_paths(command_line):
        if not Path(value).is_file():
            continue
        try:
            config = yaml.safe_load(Path(value).read_bytes().decode("utf-8"))
        except UnicodeDecodeError as err:
            raise ConfigError(f"{value} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                              "save it as UTF-8.") from None
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            line = f" line {where.line + 1}, column {where.column + 1}" if where else ""
            raise ConfigError(f"{value}:{line} is not valid YAML ({getattr(err, 'problem', None) or err}).") from None
        if not isinstance(config, dict):
            what = "nothing" if config is None else f"a YAML {type(config).__name__}"
            raise ConfigError(f"{value} holds {what}, not settings: a config file is a mapping of keys to values "
                              "(trainer:, model:, data:, ...), as in configs/mnist/m2.yaml.")


class SaveConfigToRunFolder(SaveConfigCallback):
    """The run's ``config.yaml`` beside its logs, written when a fit starts a run. A resumed fit (the folder was
    checked by ``runs.prepare``) keeps it, and records the settings it changed (the trainer's, the optimiser's
    arguments) in ``config.resume-<n>.yaml`` beside it. ``test``, ``validate`` and ``predict`` write nothing."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        log_dir = run_folder(trainer)  # a collective under DDP: every rank asks
        if stage != "fit" or log_dir is None or self.already_saved:
            return
        existing = log_dir / self.config_filename
        if existing.is_file():
            if trainer.is_global_zero:
                self._record_resume(log_dir, existing)
            self.already_saved = True
            return
        super().setup(trainer, pl_module, stage)

    def _record_resume(self, log_dir: Path, existing: Path) -> None:
        current = yaml.safe_load(self.parser.dump(self.config, skip_unset=False))
        changed = [(key, there, here) for key, there, here in runs.differences(yaml.safe_load(existing.read_text()),
                                                                                current)
                   if not key.startswith(NOT_RECORDED)]
        if not changed:
            return
        number = 1 + len(list(log_dir.glob("config.resume-*.yaml")))
        record = log_dir / f"config.resume-{number}.yaml"
        with atomic_output(record, overwrite=False) as temporary:
            temporary.write_text(self.parser.dump(self.config, skip_unset=False))
        what = "; ".join(f"{key} {there!r} -> {here!r}" for key, there, here in changed[:6])
        rank_zero_info(f"ssvae: resuming {log_dir} with changed settings: {what}; recorded in {record.name}.")


class SSVAETrainer(Trainer):
    """Lightning's Trainer, and ``suggest``."""

    def suggest(self, model: LightningModule, datamodule: SemiSupervisedDataModule | None = None,
                ckpt_path: str | None = None, suggest: Suggestion = Suggestion()) -> None:
        """Rank the unlabelled images by what labelling them would teach the classifier; write the CSV and sheet."""
        from ssvae_pl.suggest import suggest as run_suggest

        run_suggest(self, model, datamodule, ckpt_path, suggest)


# model settings that a fit fills in (from the data module, or M1's checkpoint): a checkpoint holds them, a config not
FILLED_MODEL_SETTINGS = frozenset({"num_train", "vae_hparams", "input_shape", "num_classes", "class_names"})


def check_model_settings_kept(given: dict | None, restored: dict | None, ckpt_path: str) -> None:
    """A fit from a checkpoint builds the model from the checkpoint's hyperparameters (Lightning's ``dict_kwargs``
    over the config's ``init_args``): a model setting of the command that differs from the checkpoint's would be
    dropped without a word, so it is a ``ConfigError`` naming the key and both values."""
    if not given or not restored:
        return
    mine = given.get("init_args") or {}
    kept = {**(restored.get("init_args") or {}), **(restored.get("dict_kwargs") or {})}
    for key, value in mine.items():
        if key not in FILLED_MODEL_SETTINGS and key in kept and kept[key] != value:
            raise ConfigError(
                f"model.init_args.{key}: {value!r} here, {kept[key]!r} in --ckpt_path {ckpt_path}; a fit from a "
                f"checkpoint keeps its model's settings, so give {kept[key]!r} (or leave it out), or fit a new "
                "run without --ckpt_path.")


class SSVAECLI(LightningCLI):
    """LightningCLI with the run-folder rules of ``runs.py`` and the always-on trust pieces of ``trainer_pieces``."""

    current: SSVAECLI | None = None  # the command being run, for the messages of main()
    command_line: list[str] = []  # as typed (main sets it): which batch limits were whole numbers

    def __init__(self, *args, **kwargs) -> None:
        self.optimizer_changes: dict[str, object] = {}
        self._lock: runs.RunLock | None = None
        SSVAECLI.current = self
        super().__init__(*args, parser_class=SSVAEParser, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "suggest": {"model", "datamodule"}}

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs) -> LightningArgumentParser:
        if subcommand != "suggest":
            return super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        parser = self.init_parser(**kwargs)  # as Lightning's, but no group named after the method: --suggest.* is
        self._add_arguments(parser)  # the Suggestion's own
        self._subcommand_method_arguments[subcommand] = parser.add_method_arguments(
            klass, subcommand, skip=set(self.subcommands()[subcommand]), as_group=False)
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # `ssvae predict` writes its CSV through this callback: --predictions.output (idle in the other subcommands)
        parser.add_lightning_class_args(PredictionCSVWriter, "predictions")
        parser.add_argument("--always_on.leave_out", type=list[str], default=[],
                            help=f"always-on callbacks to leave out, of: {', '.join(OPTIONAL)} "
                                 "(ssvae_pl/callbacks/always_on.py)")
        parser.link_arguments("data.input_shape", "model.init_args.input_shape", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if subcommand:
            config = self.config[subcommand]
            check_trainer_settings(config.get("trainer"), subcommand)
            if subcommand == "fit":
                check_fit_trains(config.get("trainer"), config.get("optimizer"))
            current = yaml.safe_load(self._parser(subcommand).dump(config, skip_unset=False))
            saved = runs.prepare(config, subcommand, current)
            if saved is not None:
                self.optimizer_changes = optimizer_arguments_changed(saved, current)
        super()._parse_ckpt_path()  # the checkpoint's hyperparameters over the config's model
        if subcommand == "fit" and config.get("ckpt_path"):
            restored = yaml.safe_load(self._parser(subcommand).dump(self.config[subcommand], skip_unset=False))
            check_model_settings_kept(current.get("model"), restored.get("model"), config.get("ckpt_path"))

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer_config = self.config_init[self.subcommand]["trainer"] if self.subcommand else {}
        fitting = self.subcommand in (None, "fit")
        leave_out = self.config_init[self.subcommand].get("always_on.leave_out") if self.subcommand else []
        callbacks, plugins = trainer_pieces(trainer_config.get("callbacks"), trainer_config.get("plugins"),
                                            self.optimizer_changes, fitting,
                                            trainer_config.get("enable_progress_bar") is not False, leave_out)
        if not fitting and not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            kwargs["enable_checkpointing"] = False  # nothing to write, nor Lightning's default checkpoint's warnings
            warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`, callbacks used to "
                                                      r"create the checkpoint need to be provided")
        kwargs.update(whole_number_limits(self.command_line))  # `1` is one batch, not the parser's 1.0 (all)
        if self.subcommand == "predict" and trainer_config.get("devices") in (None, "auto"):
            kwargs["devices"] = 1  # the CSV is written by one process
        if trainer_config.get("precision") is None:  # none named
            if self.subcommand == "predict":  # predictions in float32, as the exports compute them
                kwargs["precision"] = "32-true"
            else:  # the processor's fastest
                kwargs["precision"], why = best_precision(trainer_config.get("accelerator", "auto"))
                rank_zero_info(f"precision {kwargs['precision']}: {why} (--trainer.precision chooses another)")
        for callback in callbacks:  # what the config asks of the model, before anything is written
            if isinstance(callback, AsksModel):
                callback.check(self.model)
        return super().instantiate_trainer(callbacks=callbacks, plugins=plugins, **kwargs)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except OSError as err:  # a write that failed without naming its file (the TensorBoard writer, ...)
            if isinstance(err, OutputError) or err.filename is not None:
                raise
            logger = self.trainer.logger
            folder = getattr(logger, "log_dir", None) or os.getcwd()
            raise write_error(f"{folder} (the run's logs and checkpoints)", err) from err

    def before_fit(self) -> None:
        logger = self.trainer.logger
        if logger is not None and getattr(logger, "log_dir", None) and runs.is_rank_zero():
            self._lock = runs.RunLock(Path(logger.log_dir))  # not a collective: the logger's own folder


def optimizer_arguments_changed(saved: dict, current: dict) -> dict[str, object]:
    """The optimiser's arguments that a resumed run sets differently from its saved config (``lr``, ...)."""
    before = (saved.get("optimizer") or {}).get("init_args") or {}
    now = (current.get("optimizer") or {}).get("init_args") or {}
    return {key: value for key, value in now.items() if before.get(key) != value}


def _thread_error(args: threading.ExceptHookArgs) -> None:
    """An ``OSError`` in a writer thread (TensorBoard's event writer on a full disk) is raised again by the main
    thread at its next write, which reports it in one line: the thread's own traceback is not printed."""
    if not issubclass(args.exc_type, OSError):
        threading.__excepthook__(args)


def quiet_command() -> None:
    """``quiet.quiet_lightning``, and writer threads' ``OSError`` left to the main thread's one line."""
    threading.excepthook = _thread_error
    quiet_lightning()


def main(args: list[str] | None = None) -> None:
    command_line = sys.argv[1:] if args is None else list(args)
    quiet_command()
    try:
        if command_line[:1] == ["export"]:  # not a Trainer method: its own small parser
            from ssvae_pl.export import main as export_main

            return export_main(command_line[1:])
        import ssvae_pl.models  # noqa: F401  (registers the model classes for short names)

        check_config_files(command_line)
        faults.check_ckpt_path(command_line)
        SSVAECLI.command_line = command_line
        SSVAECLI(
            parser_kwargs={"description": "Semi-supervised learning with deep generative models (Kingma et al., "
                                          "2014). Subcommands: fit, validate, test, predict, suggest (which "
                                          "images to label next) and export (a classifier as TorchScript and "
                                          "ONNX: `ssvae export --help`)."},
            datamodule_class=SemiSupervisedDataModule,
            trainer_class=SSVAETrainer,
            subclass_mode_model=True,
            trainer_defaults={"logger": {"class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                                         "init_args": {"save_dir": "lightning_logs", "default_hp_metric": False}}},
            save_config_callback=SaveConfigToRunFolder,
            seed_everything_default=0,
            args=args,
        )
    except SIGTERMException as stop:  # SIGTERM or a first Ctrl-C, at the end of a batch (callbacks.SaveOnInterrupt)
        if getattr(stop, "finished", False):  # it came after the last epoch: nothing to resume
            print(f"ssvae: {stop.signal_name} came after training had finished: the run is complete",
                  file=sys.stderr)
            sys.exit(0)
        saved = getattr(stop, "checkpoint", None)
        where = (f"global step {stop.global_step} (epoch {stop.epoch}) saved to {saved}; resume with: "
                 f"{resume_command(command_line, saved, getattr(stop, 'run_folder', False))}" if saved
                 else "nothing saved")
        print(f"ssvae: stopped by {getattr(stop, 'signal_name', 'SIGTERM')}: {where}", file=sys.stderr)
        sys.exit(130 if getattr(stop, "signal_name", "") == "SIGINT" else 143)
    except SystemExit as stop:  # Lightning's sys.exit(1) after a second Ctrl-C: one line, the last checkpoint
        interrupt = stop.__context__
        if not isinstance(interrupt, KeyboardInterrupt):
            raise
        saved = getattr(interrupt, "checkpoint", None)
        where = (f"the last checkpoint is {saved}; resume with: "
                 f"{resume_command(command_line, saved, getattr(interrupt, 'run_folder', False))}" if saved
                 else "no checkpoint was written")
        print(f"ssvae: stopped at once by a second Ctrl-C: {where}", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        runs.remove_unused()
        cause = user_error(err) or faults.describe(err) or peer_lost(err, command_line)
        if cause is None:
            raise
        print(f"ssvae: error: {' '.join(str(cause).split())}", file=sys.stderr)
        sys.exit(2)
    finally:
        end_process_group()
        release_run_folder()


def release_run_folder() -> None:
    """The run folder's lock, released when the command ends (also when ``main`` is called from Python)."""
    command = SSVAECLI.current
    if command is not None and command._lock is not None:
        command._lock.release()
        command._lock = None


def peer_lost(err: BaseException, command_line: list[str]) -> str | None:
    """A DDP fit whose other process died (killed, out of memory): the collective this one waited in fails. One
    line naming that, and the command that resumes the run from its last checkpoint."""
    if not faults.is_peer_lost(err):
        return None
    cli = SSVAECLI.current
    trainer = getattr(cli, "trainer", None)
    last = last_checkpoint_path(trainer) if trainer is not None else None
    reason = re.sub(r"^\[[^\]]*\]\s*", "", faults.first_line(err)).split(". ")[0]
    message = f"another process of this distributed run ended unexpectedly ({reason[:120]})"
    if last is None or not Path(last).is_file():
        return message + "; no checkpoint was written yet: start the fit again."
    return f"{message}; resume from {last} with: {resume_command(command_line, last, trainer.logger is not None)}"


def end_process_group() -> None:
    """Destroys the process group that a DDP run set up, while the interpreter is still whole. Left to the
    interpreter's exit, gloo's worker threads can abort a run that succeeded ("terminate called without an active
    exception", exit -6) after its last line was printed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resume_command(command_line: list[str], saved: str, in_run_folder: bool) -> str:
    """The command that continues an interrupted fit from its ``saved`` checkpoint: the same one, in the same run
    folder (``<run>/checkpoints/last.ckpt``) with ``--ckpt_path last``; a fit without a run folder (no logger) from
    the checkpoint itself."""
    kept, skip = [], False
    for arg in command_line:
        if skip:
            skip = False
        elif arg in ("--ckpt_path", "--trainer.logger.init_args.version"):
            skip = True
        elif not arg.startswith(("--ckpt_path=", "--trainer.logger.init_args.version=")):
            kept.append(arg)
    if not in_run_folder:
        return shlex.join(["ssvae", *kept, "--ckpt_path", str(saved)])
    version = Path(saved).parent.parent.name
    return shlex.join(["ssvae", *kept, "--trainer.logger.init_args.version", version, "--ckpt_path", "last"])


if __name__ == "__main__":
    main()
