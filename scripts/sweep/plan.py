"""The plan of a Table 1 sweep: its profiles, and the `ssvae` commands (stages) of every run, each fit before the
stages that read its checkpoint. One VAE per seed is shared by that seed's M1 and M1+M2 runs."""

from __future__ import annotations

import functools
import hashlib
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]

# ---- what to run -----------------------------------------------------------------------------------------------

# max_epochs of each fit, by profile. quick: 16 min 50 s in all on 2 CPU cores (measured; docs/results.md).
EPOCHS: dict[str, dict[str, int]] = {
    #          M1's VAE   M1 classifier   M2         M1+M2         ADGM and SDGM (MNIST only)
    "quick": {"vae": 10,  "m1": 10,       "m2": 25,  "m1m2": 25,   "adgm": 10,   "sdgm": 10},
    "full":  {"vae": 100, "m1": 50,       "m2": 300, "m1m2": 300,  "adgm": 1000, "sdgm": 1000},
    # the quick profile of the colour datasets (svhn, cifar10), each epoch cut short by QUICK_COLOUR
    "quick_colour": {"vae": 5, "m1": 10,  "m2": 5,   "m1m2": 10},
    "tiny":  {"vae": 1,   "m1": 1,        "m2": 1,   "m1m2": 1,    "adgm": 1,    "sdgm": 1},  # with TINY: 2 batches
    "cpu":   {"vae": -1,  "m1": -1,       "m2": -1,  "m1m2": -1,   "adgm": -1,   "sdgm": -1},  # stopped by time
}
# trainer.max_time of each fit in the cpu profile (days:hours:minutes:seconds), two stages at a time on one core each
# (a core does more on its own than half of two: docs/results.md): the whole MNIST table, 3 seeds x 4 label budgets,
# 3 x 50 min of VAE (twice the hour profile's: at 1000 labels M1+M2 tested 2.41% on it against 2.52%) and 12 x (3 +
# 28 + 25) min of classifiers, 14 core-hours, and about 10 s per test: under 8 hours of 2 CPU cores
CPU_TIMES = {"vae": "00:00:50:00", "m1": "00:00:03:00", "m2": "00:00:28:00", "m1m2": "00:00:25:00"}
# the hour profile: M1+M2 at 100 labels, per seed 25 min of M1's VAE then 35 of M2, two stages at a time on one core
# each: one hour of one core per seed
HOUR_TIMES = {"vae": "00:00:25:00", "m1m2": "00:00:35:00"}
# the adgm profile: ADGM and SDGM at 100 labels, each fit 3 hours of one core, two at a time (issue 39's budget)
ADGM_TIMES = {"adgm": "00:03:00:00", "sdgm": "00:03:00:00"}
# M1+M2 above 100 labels: labelled batches of 100, not m1m2.yaml's 20 (which suits 100 labels), so that each labelled
# image recurs about as often as at 100 labels (3000 labels, seed 0: 2.67% test error against 2.79% with 20)
M1M2_LABELLED_BATCH = {f"m1m2-n{n}": ("--data.labelled_batch_size", "100") for n in (600, 1000, 3000)}
# the cpu profile compiles M2's and M1+M2's training loss (torch.compile's inductor; it needs a C++ compiler): on one
# core M1+M2 trains an epoch in 3.2 s instead of 4.5, M2 in 15 s instead of 17 (docs/results.md)
COMPILED = {stage: ("--model.init_args.compile", "true") for stage in ("m2", "m1m2")}
# seconds a time-limited fit takes beyond its max_time (start-up, the last validation and checkpoint), and at most a
# test: what --hours allows for
STAGE_MARGIN = 90.0
# stacked right after the stage's own config on every fit of the colour datasets' quick profile: at most 100 training
# and 20 validation batches an epoch (its max_epochs gives way to the script's --trainer.max_epochs)
QUICK_COLOUR = "configs/presets/quick_colour.yaml"
# stacked on every fit of the tiny profile: two batches of one epoch (a 2-step VAE has no active unit for M1+M2, so
# M1+M2 models every dimension of z1 there)
TINY = "configs/presets/tiny.yaml"


@dataclass(frozen=True)
class Profile:
    """A named sweep: the models, label counts and seeds, the epochs of each stage, and extra `ssvae` arguments for
    each stage's fit (keyed like EPOCHS)."""

    models: tuple[str, ...]
    labels: tuple[int, ...]
    seeds: tuple[int, ...]
    epochs: dict[str, int]
    extra_args: dict[str, tuple[str, ...]] = field(default_factory=dict)  # by stage, or stage-nN for one budget
    fit_configs: tuple[str, ...] = ()  # more `-c` files for every fit, right after the stage's own config
    times: dict[str, str] = field(default_factory=dict)  # trainer.max_time of each stage's fit
    jobs: int = 1  # stages run at once, the cores shared out among them (--jobs)


# the datasets, each with the configs configs/<dataset>/<CONFIGS[stage]>
DATASETS = ("mnist", "svhn", "cifar10")
DATASET_NAMES = {"mnist": "MNIST", "svhn": "SVHN", "cifar10": "CIFAR-10"}  # as titles show them

# the sweeps, by dataset and profile name: the same models and seeds, each dataset its own label counts; the colour
# datasets' quick profile is a short CPU run (QUICK_COLOUR), their full profile MNIST's apart from the labels
PROFILES: dict[str, dict[str, Profile]] = {
    "mnist": {
        "quick": Profile(models=("m1", "m2", "m1m2"), labels=(100,), seeds=(0,), epochs=EPOCHS["quick"]),
        "full": Profile(models=("m1", "m2", "m1m2"), labels=(100, 600, 1000, 3000), seeds=(0, 1, 2),
                        epochs=EPOCHS["full"], extra_args=M1M2_LABELLED_BATCH),
        "cpu": Profile(models=("m1", "m2", "m1m2"), labels=(100, 600, 1000, 3000), seeds=(0, 1, 2),
                       epochs=EPOCHS["cpu"], times=CPU_TIMES, extra_args={**M1M2_LABELLED_BATCH, **COMPILED},
                       jobs=2),
        "adgm": Profile(models=("adgm", "sdgm"), labels=(100,), seeds=(0, 1, 2), epochs=EPOCHS["cpu"],
                        times=ADGM_TIMES, jobs=2),
        "tiny": Profile(models=("m1", "m2", "m1m2"), labels=(100,), seeds=(0,), epochs=EPOCHS["tiny"],
                        fit_configs=(TINY,), extra_args={"m1m2": ("--model.init_args.m1_active_threshold", "0")}),
        "hour": Profile(models=("m1m2",), labels=(100,), seeds=(0, 1, 2), epochs=EPOCHS["cpu"], times=HOUR_TIMES,
                        jobs=2),
    },
    **{dataset: {
        "quick": Profile(models=("m1", "m2", "m1m2"), labels=(labels,), seeds=(0,), epochs=EPOCHS["quick_colour"],
                         fit_configs=(QUICK_COLOUR,)),
        "full": Profile(models=("m1", "m2", "m1m2"), labels=(labels,), seeds=(0, 1, 2), epochs=EPOCHS["full"]),
    } for dataset, labels in (("svhn", 1000), ("cifar10", 4000))},
}

# the config file of each stage, in configs/<dataset>/: "vae" is M1's stage one; "m1" is M1's stage two, the
# classifier on the frozen encoder
CONFIGS: dict[str, str] = {
    "vae": "m1_vae.yaml",
    "m1": "m1_classifier.yaml",
    "m2": "m2.yaml",
    "m1m2": "m1m2.yaml",
    "adgm": "adgm.yaml",
    "sdgm": "sdgm.yaml",
}


def config_path(dataset: str, stage: str) -> str:
    """The config of a stage of a dataset, relative to the repository, e.g. configs/mnist/m1_vae.yaml."""
    return f"configs/{dataset}/{CONFIGS[stage]}"

MODELS = ("m1", "m2", "m1m2", "adgm", "sdgm")
RECORDS = ROOT / "docs" / "runs"  # the sweeps' records of finished stages, kept in git (--record)
SSVAE = [sys.executable, "-m", "ssvae_pl.cli"]  # how a stage runs `ssvae`, in the repository root
NEEDS_VAE = ("m1", "m1m2")
MNIST_ONLY = ("adgm", "sdgm")  # configs/mnist/ alone has their configs



# ---- the plan ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One `ssvae` command: a fit or a test, logging to <out>/<logger name>/<version>."""

    key: str  # also the log file's name and the cache's key, e.g. "m1-seed0-n100-fit", "vae-seed0-fit"
    args: tuple[str, ...]  # the arguments after `ssvae`
    run_dir: Path  # the run's version folder
    needs: tuple[str, ...] = ()  # the keys of the fits whose checkpoints it reads
    upstream: tuple[tuple[str, ...], ...] = ()  # the arguments of every fit it reads, directly or through another

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoints" / "last.ckpt"

    @property
    def configs(self) -> dict[str, str]:
        """The digests of the config files that it and the fits it reads read (``config_digests``)."""
        return config_digests(self.args, *self.upstream)


@dataclass(frozen=True)
class Run:
    """One cell's sample: a model at a label budget and a seed. Its stages: the shared VAE (M1, M1+M2), fit, test."""

    model: str
    num_labelled: int
    seed: int
    stages: tuple[Stage, ...]

    @property
    def key(self) -> str:
        return f"{self.model}-seed{self.seed}-n{self.num_labelled}"

    @property
    def fit(self) -> Stage:
        return self.stages[-2]

    @property
    def test(self) -> Stage:
        return self.stages[-1]


@dataclass(frozen=True)
class Settings:
    """Everything besides the sweep's lists that goes into the commands."""

    out: Path
    data_dir: Path
    epochs: dict[str, int]
    extra_args: dict[str, tuple[str, ...]]  # per stage (or stage-nN: at N labels only), for its fit
    trainer_args: tuple[str, ...]  # for every fit and test
    dataset: str = "mnist"  # the configs are configs/<dataset>/...
    fit_configs: tuple[str, ...] = ()  # more `-c` files for every fit, right after the stage's own config
    times: dict[str, str] = field(default_factory=dict)  # trainer.max_time of each stage's fit


def shown(path: Path) -> str:
    """A path as the commands show it: relative to the repository (their working folder) when inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


@functools.cache
def logger_name(stage: str, dataset: str = "mnist") -> str:
    """The TensorBoardLogger name in the dataset's config of the stage: the folder its runs go to under the output
    folder."""
    config = yaml.safe_load((ROOT / config_path(dataset, stage)).read_text())
    return config["trainer"]["logger"]["init_args"]["name"]


def make_stage(stage: str, subcommand: str, key: str, version: str, seed: int, num_labelled: int | None,
               settings: Settings, checkpoint_args: tuple[str, ...] = (), reads: tuple[Stage, ...] = ()) -> Stage:
    """The `ssvae fit` or `ssvae test` of one stage; a fit trains from scratch in the run folder ``version``, a test
    reads ``checkpoint_args`` and logs into that checkpoint's run folder (``version``, the fit's). ``reads``: the
    fits whose checkpoints it reads."""
    labels = ("--data.num_labelled", str(num_labelled)) if num_labelled is not None else ()
    configs = settings.fit_configs if subcommand == "fit" else ()
    where = ("--trainer.logger.init_args.version", version) if subcommand == "fit" else ()
    args = [subcommand, "-c", config_path(settings.dataset, stage), *[a for c in configs for a in ("-c", c)],
            *checkpoint_args,
            "--seed_everything", str(seed), "--data.seed", str(seed), *labels,
            "--data.data_dir", shown(settings.data_dir),
            "--trainer.logger.init_args.save_dir", shown(settings.out), *where,
            "--trainer.enable_progress_bar", "false"]
    if subcommand == "fit":
        args += ["--trainer.max_epochs", str(settings.epochs[stage])]
        if stage in settings.times:
            args += ["--trainer.max_time", settings.times[stage]]
    args += settings.trainer_args
    if subcommand == "fit":
        args += settings.extra_args.get(stage, ()) + settings.extra_args.get(f"{stage}-n{num_labelled}", ())
    return Stage(key=key, args=tuple(args), run_dir=settings.out / logger_name(stage, settings.dataset) / version,
                 needs=tuple(fit.key for fit in reads),
                 upstream=tuple(a for fit in reads for a in (fit.args, *fit.upstream)))


def plan_runs(models: list[str], labels: list[int], seeds: list[int], settings: Settings) -> list[Run]:
    """Every run of the sweep, by seed, then label count, then model; one VAE per seed, shared by its M1 and M1+M2
    runs (it comes first among the stages of the seed's first run that needs it)."""
    runs = []
    for seed in seeds:
        vae = make_stage("vae", "fit", f"vae-seed{seed}-fit", f"seed{seed}", seed, None, settings)
        for n in labels:
            for model in models:
                version = f"seed{seed}-n{n}"
                vae_args = ("--model.init_args.vae_checkpoint", shown(vae.checkpoint)) if model in NEEDS_VAE else ()
                fit = make_stage(model, "fit", f"{model}-{version}-fit", version, seed, n, settings, vae_args,
                                 (vae,) if model in NEEDS_VAE else ())
                test = make_stage(model, "test", f"{model}-{version}-test", version, seed, n, settings,
                                  ("--ckpt_path", shown(fit.checkpoint)), (fit,))
                stages = (vae, fit, test) if model in NEEDS_VAE else (fit, test)
                runs.append(Run(model, n, seed, stages))
    return runs


def unique_stages(runs: list[Run]) -> list[Stage]:
    """The stages to execute, in order, each once (the VAEs are shared)."""
    stages: dict[str, Stage] = {}
    for run in runs:
        for stage in run.stages:
            stages.setdefault(stage.key, stage)
    return list(stages.values())


# ---- running -------------------------------------------------------------------------------------------------------


def command_line(stage: Stage) -> str:
    return shlex.join(["ssvae", *stage.args])


def config_digests(*commands: tuple[str, ...] | list[str]) -> dict[str, str]:
    """The SHA-256 (16 hex digits) of each config file that ``commands`` (a stage's arguments, then those of the
    fits it reads) read, by path: their ``-c`` arguments and the files those include (``model:
    ../colour/conv_vae.yaml``), so that an edit to any of them after the stage ran is noticed, an edit to the VAE's
    config by the classifiers trained on that VAE too."""
    digests: dict[str, str] = {}
    pending = [ROOT / path for args in commands for flag, path in zip(args, args[1:]) if flag == "-c"]
    while pending:
        path = pending.pop(0)
        key = os.path.relpath(path, ROOT)
        if key not in digests:
            digests[key] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            pending += included_configs(path)
    return digests


def included_configs(config: Path) -> list[Path]:
    """The YAML files that a config names as values (jsonargparse reads a value that is a path to a file as that
    file's contents), resolved against the config's folder."""
    def strings(node):
        if isinstance(node, dict):
            for value in node.values():
                yield from strings(value)
        elif isinstance(node, list):
            for value in node:
                yield from strings(value)
        elif isinstance(node, str):
            yield node

    named = (os.path.normpath(config.parent / value) for value in strings(yaml.safe_load(config.read_text()))
             if value.endswith((".yaml", ".yml")))
    return [Path(path) for path in named if Path(path).is_file()]


def changed_configs(stage: Stage, record: dict) -> list[str]:
    """The config files a stage reads whose contents differ from its record's (or that the record does not name)."""
    recorded, now = record.get("configs", {}), stage.configs
    return [path for path in now if recorded.get(path) != now[path]]


def stale_record(stage: Stage, record: dict) -> str | None:
    """Why a stage's record cannot stand for the planned stage: ``command`` (it ran another command), ``config``
    (a config file it reads has other contents, or the record does not say what it held), or None when it can."""
    if record["args"] != list(stage.args):
        return "command"
    return "config" if changed_configs(stage, record) else None


def stage_seconds(stage: Stage) -> float | None:
    """How long a stage takes at most: a fit's --trainer.max_time plus STAGE_MARGIN (start-up, the last validation
    and checkpoint), a test's STAGE_MARGIN; None for a fit stopped by its epochs alone."""
    if stage.args[0] == "test":
        return STAGE_MARGIN
    limits = [value for flag, value in zip(stage.args, stage.args[1:]) if flag == "--trainer.max_time"]
    if not limits:
        return None
    days, hours, minutes, seconds = (int(part) for part in limits[-1].split(":"))
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds + STAGE_MARGIN
