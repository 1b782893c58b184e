"""Run folders ``<save_dir>/<name>/<version>/`` of the TensorBoard logger, one run each (``config.yaml``, events,
``labelled_indices.json``, ``checkpoints/``). ``prepare`` settles which folder a command works in, before anything
is instantiated or written:
* ``fit --ckpt_path last`` continues the newest run of the same config in its own folder (one TensorBoard curve);
  ``fit --ckpt_path <a run's checkpoint>`` continues in that checkpoint's folder;
* a fit into a folder holding another run (model, data, seed, optimiser or scheduler class differ), or any run
  without ``--ckpt_path``, is one ``ConfigError`` and touches nothing; so is a checkpoint of another model class;
* ``test`` and ``validate`` log into the checkpoint's own run folder, ``predict`` nowhere; none creates a run
  folder.
``lock`` keeps a second process out of a folder that a fit is writing to."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from lightning_fabric.utilities.rank_zero import _get_rank

from ssvae_pl.checkpoint_io import check_checkpoint_file
from ssvae_pl.errors import ConfigError
from ssvae_pl.files import RunLock, make_folder

CONFIG_FILE = "config.yaml"
LAST = "last.ckpt"
SUBSET_KEYS = ("data.seed", "data.num_labelled", "data.val_size", "data.dataset")


def run_defining(config: dict) -> dict:
    """What a run is: the seed, the model, the data, the optimiser's and scheduler's classes. The trainer's settings
    and the optimiser's arguments (a lower learning rate after a divergence) may change when a run is resumed."""
    defined = {key: config.get(key) for key in ("seed_everything", "model", "data")}
    for key in ("optimizer", "lr_scheduler"):
        value = config.get(key)
        defined[key] = value.get("class_path") if isinstance(value, dict) else value
    return defined


def differences(saved: Any, current: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Every (dotted key, saved value, current value) where two configs differ."""
    if isinstance(saved, dict) and isinstance(current, dict):
        found = []
        for key in sorted(saved.keys() | current.keys(), key=str):
            found += differences(saved.get(key), current.get(key), f"{prefix}{key}.")
        return found
    return [] if saved == current else [(prefix.rstrip("."), saved, current)]


def read_config(folder: Path) -> dict | None:
    """The run folder's ``config.yaml``, or None when it has none; an unreadable one is one error."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a mapping")
        return config
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"{path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:100]}), so the "
                          "run in that folder cannot be compared or resumed; restore the file from a copy, or "
                          "start a new run with --trainer.logger.init_args.version <new name>.") from None


def check_same_run(folder: Path, saved: dict, current: dict) -> None:
    """Nothing, when the folder's ``saved`` config defines the same run as ``current``; otherwise one error naming
    the first setting that differs."""
    diff = differences(run_defining(saved), run_defining(current))
    if diff:
        key, there, here = diff[0]
        what = "another labelled subset" if key.startswith(SUBSET_KEYS) else "another config"
        raise ConfigError(f"the run folder {folder.resolve()} already holds a run with {what} ({key}: {there!r} "
                          f"there, {here!r} here); start a new run with --trainer.logger.init_args.version <new "
                          "name>, or resume that one with its own settings.")


def tensorboard_args(trainer_config) -> Any | None:
    """The logger's ``init_args`` namespace when the trainer logs to one TensorBoard or CSV logger, else None."""
    logger = trainer_config.get("logger")
    if logger is None or isinstance(logger, (bool, list)) or not hasattr(logger, "get"):
        return None
    if not str(logger.get("class_path", "")).endswith(("TensorBoardLogger", "CSVLogger")):
        return None
    return logger.get("init_args")


def _folder_name(version) -> str:
    """The run folder's name for the logger's ``version``: one folder, never a path into another run's."""
    name = f"version_{version}" if isinstance(version, int) else str(version)
    if not name.strip() or name in (".", "..") or "/" in name or "\\" in name:
        fix = name.replace("/", "-").replace("\\", "-").strip(".") or "my-run"
        raise ConfigError(f"trainer.logger.init_args.version {name!r} is not one folder name (a version names one "
                          f"folder under the logger's save_dir/name); use one without '/', e.g. {fix!r}.")
    return name


def _run_of_checkpoint(ckpt: Path, parent: Path) -> Path | None:
    """The run folder under ``parent`` that holds ``ckpt`` in its ``checkpoints/``, if any."""
    folder = ckpt.resolve().parent.parent
    if ckpt.resolve().parent.name == "checkpoints" and folder.parent == parent.resolve() \
            and (folder / CONFIG_FILE).is_file():
        return folder
    return None


def newest_run(parent: Path, current: dict) -> Path:
    """The run folder under ``parent`` of the same run as ``current`` whose ``last.ckpt`` is the newest."""
    candidates = []
    for folder in parent.iterdir() if parent.is_dir() else []:
        try:
            if (folder / CONFIG_FILE).is_file() and not differences(run_defining(read_config(folder)),
                                                                     run_defining(current)):
                candidates.append(folder)
        except ConfigError:  # another run's unreadable config: not this run
            continue
    with_last = [f for f in candidates if (f / "checkpoints" / LAST).is_file()]
    if with_last:
        return max(with_last, key=lambda f: (f / "checkpoints" / LAST).stat().st_mtime)
    if candidates:
        raise ConfigError(f"--ckpt_path last: the run folder {candidates[0].resolve()} has no checkpoints/{LAST} "
                          "(it stopped before its first epoch ended); start it again without --ckpt_path.")
    raise ConfigError(f"--ckpt_path last: no run of this config under {parent.resolve()} to resume; start one "
                      "without --ckpt_path (or point --trainer.logger.init_args.save_dir/name at the run).")


def waiting_hpc_checkpoint(trainer_config) -> Path | None:
    """The SLURM pre-emption checkpoint (``hpc_ckpt_<n>.ckpt``, the highest n) that Lightning resumes a fit from
    without ``--ckpt_path``: only inside a SLURM job; elsewhere Lightning ignores the file, and so does ``ssvae``."""
    from lightning_fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return None
    root = Path(trainer_config.get("default_root_dir") or os.getcwd())
    numbered = [(int(p.stem.rsplit("_", 1)[1]), p) for p in root.glob("hpc_ckpt_*.ckpt")
                if p.stem.rsplit("_", 1)[1].isdigit()]
    return max(numbered)[1] if numbered else None


def checkpoint_run_folder(ckpt: Path) -> Path | None:
    """The run folder whose ``checkpoints/`` a checkpoint's ``LastCheckpoint`` wrote into, as the checkpoint
    records it (Lightning's ``ModelCheckpoint`` state keeps its ``dirpath``); None when it records none."""
    state = check_checkpoint_file(ckpt, str(ckpt), "move it out of the way").get("callbacks") or {}
    dirpath = (state.get("LastCheckpoint") or {}).get("dirpath")
    return Path(dirpath).resolve().parent if dirpath else None


def _hpc_folder(hpc: Path, parent: Path, folder: Path | None) -> Path:
    """The run folder a waiting SLURM checkpoint continues: its own, which must be ``folder`` when one is named."""
    own = checkpoint_run_folder(hpc)
    if own is None or own.parent != parent.resolve() or (folder is not None and own != folder.resolve()):
        where = f"the run {own}" if own is not None else "no run folder it records"
        raise ConfigError(f"{hpc.resolve()} (a SLURM pre-emption checkpoint, which Lightning would resume this fit "
                          f"from) belongs to {where}, not to {folder.resolve() if folder else parent.resolve()}; move "
                          "it out of the working folder, or resume its own run.")
    return own


def prepare(config, subcommand: str, current: dict) -> dict | None:
    """Settle the run folder of ``config`` (the subcommand's namespace, changed in place: the logger's version,
    ``ckpt_path``) before anything is built. ``current`` is the config as ``config.yaml`` would record it. Returns
    the saved config of the run being resumed, or None."""
    ckpt = config.get("ckpt_path")
    ckpt_file = Path(ckpt) if ckpt not in (None, "last", "best", "hpc", "registry") and "://" not in str(ckpt) \
        else None
    if ckpt_file is not None:
        check_model_class(ckpt_file, config.get("model"))
    logger = tensorboard_args(config.trainer)
    if subcommand != "fit":
        _prepare_evaluation(config, logger, ckpt_file, subcommand, current)
        return None
    if logger is None:
        if ckpt == "last":
            raise ConfigError("--ckpt_path last resumes a run folder, and this fit has no logger (trainer.logger "
                              "false); give the checkpoint's path instead.")
        return None
    parent = logger_parent(logger)
    version = logger.get("version")
    hpc = waiting_hpc_checkpoint(config.trainer) if ckpt is None else None
    if version is not None:
        folder = parent / _folder_name(version)
    elif ckpt == "last":
        folder = newest_run(parent, current)
    elif ckpt_file is not None:
        folder = _run_of_checkpoint(ckpt_file, parent)
    else:
        folder = None
    if hpc is not None:
        folder = _hpc_folder(hpc, parent, folder)
    if folder is None:
        if is_rank_zero():  # other ranks write nothing: Lightning broadcasts rank 0's folder
            logger.version = reserve_new_folder(parent).name
        return None
    logger.version = folder.name
    if not is_rank_zero():  # a DDP launcher's other process: rank 0 checked the folder before starting it
        if ckpt == "last":
            config.ckpt_path = str(folder / "checkpoints" / LAST)
        return read_config(folder)
    if folder.is_dir():
        RunLock(folder).release()  # a fit writing there now: "in use", before anything else is said of it
    saved = read_config(folder)
    if saved is None:
        if ckpt == "last":
            raise ConfigError(f"--ckpt_path last: {folder.resolve()} holds no run to resume; start it without "
                              "--ckpt_path.")
        return None
    check_same_run(folder, saved, current)
    if ckpt is None and hpc is None:
        raise ConfigError(f"the run folder {folder.resolve()} already holds this run; continue it with --ckpt_path "
                          "last, or start another with --trainer.logger.init_args.version <new name>.")
    if ckpt == "last":
        last = folder / "checkpoints" / LAST
        if not last.is_file():
            raise ConfigError(f"--ckpt_path last: {last.resolve()} does not exist (the run stopped before its first "
                              "epoch ended); start it again without --ckpt_path, in a new folder.")
        check_checkpoint_file(last, "--ckpt_path last", _other_checkpoints_fix(last))
        config.ckpt_path = str(last)
    return saved


def _prepare_evaluation(config, logger, ckpt_file: Path | None, subcommand: str, current: dict) -> None:
    """``test``, ``validate`` and ``predict``: the trained checkpoint they evaluate, and where they log."""
    ckpt = config.get("ckpt_path")
    if ckpt_file is None and "://" not in str(ckpt):
        ckpt_file = trained_checkpoint(ckpt, logger, current, subcommand)
        check_model_class(ckpt_file, config.get("model"))
        config.ckpt_path = str(ckpt_file)
    _log_beside_checkpoint(config, logger, ckpt_file, subcommand)


def logger_parent(logger) -> Path:
    """``<save_dir>/<name>``: the folder that holds the logger's run folders."""
    return Path(logger.get("save_dir") or ".") / (logger.get("name") or "lightning_logs")


def _other_checkpoints_fix(broken: Path) -> str:
    """The fix for a damaged checkpoint: another one of the same run, where there is one."""
    others = sorted(p for p in broken.parent.glob("*.ckpt") if p != broken)
    if others:
        return f"resume from another checkpoint of the run instead: --ckpt_path {others[-1]}"
    return "restore it from a copy, or start the run again in a new folder"


def is_rank_zero() -> bool:
    """Whether this process is global rank 0, as its environment says before Lightning sets anything up (a DDP
    launcher's other processes are started with their rank in the environment)."""
    return _get_rank() in (None, 0)


_RESERVED: list[Path] = []


def reserve_new_folder(parent: Path) -> Path:
    """A new ``version_<n>`` folder under ``parent``, created at once (``mkdir`` is atomic), so that fits started
    side by side never share one. A fit that fails before writing anything leaves none (``remove_unused``)."""
    make_folder(parent)
    taken = [int(f.name.split("_", 1)[1]) for f in parent.glob("version_*") if f.name.split("_", 1)[1].isdigit()]
    number = max(taken, default=-1) + 1
    while True:
        try:
            (parent / f"version_{number}").mkdir()
            _RESERVED.append(parent / f"version_{number}")
            return parent / f"version_{number}"
        except FileExistsError:
            number += 1


def remove_unused() -> None:
    """Remove the folders this process reserved for a run that never started (a fit refused after the
    reservation: a setting that Lightning or the data reject): no ``config.yaml``, nothing but the logger's first
    event file, which TensorBoard would list as a run."""
    for folder in _RESERVED:
        files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else None
        if files is None or (folder / CONFIG_FILE).exists() \
                or not all(p.name.startswith("events.out.tfevents.") for p in files):
            continue
        for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        folder.rmdir()
    _RESERVED.clear()


def trained_checkpoint(ckpt: str | None, logger, current: dict, subcommand: str) -> Path:
    """The checkpoint that ``test``, ``validate`` or ``predict`` evaluates: ``last`` or ``best`` of the newest run
    of this model class on this dataset under the logger's folder. Without ``--ckpt_path`` (an untrained model) or
    without such a run, one error: these commands never report an untrained model."""
    parent = logger_parent(logger) if logger is not None else Path("lightning_logs")
    fix = (f"pass --ckpt_path <run>/checkpoints/last.ckpt, or --ckpt_path last (or best) for the newest run of this "
           f"config under {parent}")
    if ckpt is None:
        raise ConfigError(f"ssvae {subcommand} needs a trained model (without --ckpt_path it would use random "
                          f"weights); {fix}.")
    if ckpt not in ("last", "best"):
        raise ConfigError(f"ssvae {subcommand}: --ckpt_path {ckpt} resumes a fit; {fix}.")
    wanted = _model_and_dataset(current)
    found = []
    for folder in parent.iterdir() if parent.is_dir() else []:
        try:
            saved = read_config(folder)
        except ConfigError:  # another run's unreadable config: not this run
            continue
        if saved is None or _model_and_dataset(saved) != wanted:
            continue
        pattern = LAST if ckpt == "last" else "best-*.ckpt"
        found += [f for f in (folder / "checkpoints").glob(pattern) if f.is_file()]
    if not found:
        raise ConfigError(f"--ckpt_path {ckpt}: no {wanted[0]} run on {wanted[1]} under "
                          f"{parent.resolve()} has a {'last.ckpt' if ckpt == 'last' else 'best-*.ckpt'}; train one "
                          "with `ssvae fit` and the same config first, or pass the checkpoint's path.")
    chosen = max(found, key=lambda f: f.stat().st_mtime)
    check_checkpoint_file(chosen, f"--ckpt_path {ckpt}", _other_checkpoints_fix(chosen))
    from pytorch_lightning.utilities.rank_zero import rank_zero_info

    rank_zero_info(f"ssvae {subcommand}: --ckpt_path {ckpt} is {chosen} (the newest {wanted[0]} "
                   f"run on {wanted[1]})")
    return chosen


def _model_and_dataset(config: dict) -> tuple[str, str]:
    """What ``--ckpt_path last``/``best`` of an evaluation looks for: the model's class and the dataset (the
    checkpoint's own hyperparameters give the rest)."""
    model, data = config.get("model") or {}, config.get("data") or {}
    model_class = model.get("class_path") if isinstance(model, dict) else str(model)
    return str(model_class).rsplit(".", 1)[-1], str(data.get("dataset"))


def _log_beside_checkpoint(config, logger, ckpt_file: Path | None, subcommand: str) -> None:
    """``test`` and ``validate`` write their metrics into the checkpoint's own run folder; without one, and for
    ``predict``, nothing is logged: these commands never create a run folder."""
    if logger is not None and subcommand in ("test", "validate") and ckpt_file is not None:
        parent = Path(logger.get("save_dir") or ".") / (logger.get("name") or "lightning_logs")
        folder = _run_of_checkpoint(ckpt_file, parent)
        if folder is not None:
            logger.version = folder.name
            return
    config.trainer.logger = False


def check_model_class(ckpt: Path, model_config) -> None:
    """A checkpoint of another model class than the config's is refused (one error naming both)."""
    from ssvae_pl.checkpoint_io import read_checkpoint

    wanted = model_config.get("class_path") if model_config is not None and hasattr(model_config, "get") else None
    if wanted is None or not ckpt.is_file():
        return  # a missing file is reported by the ckpt_path check, with its fix
    saved = read_checkpoint(ckpt, "--ckpt_path", "give a checkpoint of this config's model",
                            mmap=True).get("hyper_parameters", {}).get("_class_path")
    if saved is not None and saved.rsplit(".", 1)[-1] != str(wanted).rsplit(".", 1)[-1]:
        raise ConfigError(f"--ckpt_path: {ckpt} holds a {saved.rsplit('.', 1)[-1]} ({saved}), but the config's model "
                          f"is {wanted}; use the config the checkpoint was trained with.")
