"""Reproduce Table 1 of Kingma et al. 2014 (MNIST test error with 100, 600, 1000 and 3000 labels) through `ssvae`,
and run the same sweep on SVHN and CIFAR-10.

Runs the sweep {m1, m2, m1m2} x label counts x seeds, each stage an `ssvae` subprocess, and writes into the output
folder (default lightning_logs/table1/<profile> for MNIST, lightning_logs/table1/<dataset>-<profile> for the others):

    table1.md     one row per model, one column per label count: our test error % (mean ± std over seeds) beside
                  the paper's ("—" where the paper has no figure), and the command that produced it (also printed at
                  the end)
    table1.png    test error % against the number of labels (log x axis): ours with error bars, the paper's points
    table1.json   the dataset, every run's numbers, the summary and the paper's figures
    results.json  with --out: the record of finished stages (see Resuming)
    logs/         each stage's stdout and stderr, <model>-seed<s>-n<N>-<fit|test>.log (the VAE: vae-seed<s>-fit.log)
    <logger name>/<version>/   the runs (m1_vae/seed0, m1_classifier/seed0-n100 with its test beside it, m2/..., m1m2/...;
                  the colour datasets' logger names carry the dataset: svhn_m1_vae/seed0, cifar10_m2/...)

Datasets (--dataset, default mnist). Every stage runs configs/<dataset>/{m1_vae,m1_classifier,m2,m1m2}.yaml and gets
--data.data_dir (--data-dir, default data/ in the repository):

    mnist     the paper's Table 1: 100, 600, 1000, 3000 labels (full), 100 (quick); the paper's figures for every
              model and label count (our M1 row beside the paper's M1+TSVM)
    svhn      SVHN (<data_dir>/SVHN/{train,test}_32x32.mat), 1000 labels by default; the paper's SVHN table gives
              M1+M2 at 1000 labels, 36.02 % (std 0.10), the only paper figure shown
    cifar10   CIFAR-10 (<data_dir>/cifar-10-batches-py/), 4000 labels by default; not in the paper: no paper figures

The plan. M1's VAE trains on every training image, whatever the label budget (`data.seed` fixes only the validation
split and the labelled subset), so ONE VAE is trained per seed and reused by every M1 classifier and every M1+M2 run
of that seed. Each fit is followed by `ssvae test --ckpt_path <run>/checkpoints/last.ckpt` (the last checkpoint, not
the best on validation: choosing on 10,000 validation labels would flatter a 100-label method) with its own logger
version; error = 100 * (1 - test/acc). Every stage gets `--seed_everything <seed> --data.seed <seed>`, the classifier
stages `--data.num_labelled <N>`.

Resuming. Each finished stage is recorded (its command, its configs' digests, duration and, for tests, test/acc) in
docs/runs/table1-<profile>.json (table1-<dataset>-<profile>.json for the colour datasets; --record names another
file; with --out, results.json there), which is kept in git. A recorded stage is skipped, so rerunning the same
command resumes an interrupted sweep, in a later sitting or a fresh clone (the unfinished stage restarts from
scratch). A recorded fit whose checkpoint is gone (a fresh clone has the record, not the runs) runs again when a
stage still to run needs it: a seed's VAE, for its classifiers still to train; the recorded stages that read it run
again too, so that every figure of a seed comes from the one VAE its record describes. A sitting in a fresh clone
should therefore finish a seed's VAE and all its classifiers. Adding seeds or label counts to a
finished sweep runs only the new stages. A recorded stage whose command differs from the planned one (e.g. after
changing EPOCHS), or whose config files, or those of the fits it reads (the VAE's), have changed since it ran,
stops the script: use a new --out folder or --record file, or delete the records of the stages the change touches.
Two sweeps of one record may run at once, on different stages (e.g. `--models m2` on the core a seed's VAE leaves
free): each writes only its own stages' records into the file, under a lock on its folder.

Side by side (--jobs N, default the profile's): N stages run at once, each `ssvae` with OMP_NUM_THREADS = the cores
/ N; a stage starts once the fits it reads are recorded, a test as soon as its fit is. After a failed stage none
starts, those running finish and are recorded, and the script stops with the failure. A sitting (--hours H) starts
only the stages that end within H hours (a fit's max_time plus 90 s), then writes the table of the runs finished.

Profiles (--models, --labels, --seeds, --epochs override a profile's lists and epochs):

    quick   m1, m2, m1m2, seed 0.
            mnist: 100 labels; epochs from EPOCHS["quick"] (VAE 10, M1 classifier 10, M2 25, M1+M2 25): 24 min 40 s
            measured on 2 CPU cores with the configs' current M2 recipe (VAE 169 s, M2 793 s, M1+M2 446 s); test
            error M1 15.90%, M2 10.88%, M1+M2 13.03%
                python scripts/reproduce_table1.py --profile quick
            svhn (1000 labels), cifar10 (4000 labels): a short CPU run, not a reproduction: every fit stacks
            -c configs/presets/quick_colour.yaml on its config (at most 100 training and 20 validation batches an
            epoch) with epochs from EPOCHS["quick_colour"] (VAE 5, M1 classifier 10, M2 5, M1+M2 10)
                python scripts/reproduce_table1.py --dataset svhn --profile quick
                python scripts/reproduce_table1.py --dataset cifar10 --profile quick
    hour    mnist: m1m2 at 100 labels, seeds 0 1 2, per seed 25 min of VAE then 35 of M1+M2 (HOUR_TIMES), the
            shipped configs and nothing but time limits; two stages at a time, one core each; rerun to resume
                python scripts/reproduce_table1.py --profile hour --docs docs/results.md
    cpu     mnist: m1, m2, m1m2 at 100, 600, 1000 and 3000 labels, seeds 0 1 2, each fit stopped by time
            (CPU_TIMES: VAE 50 min, M1 classifier 3, M2 28, M1+M2 25; M2 and M1+M2 compiled, COMPILED; M1+M2
            above 100 labels in labelled batches of 100, M1M2_LABELLED_BATCH), two stages at a time, one core
            each: under 8 hours of 2 CPU cores; rerun the same command to resume it in a later sitting
                python scripts/reproduce_table1.py --profile cpu --docs docs/results.md
    full    m1, m2, m1m2, seeds 0 1 2; epochs from EPOCHS["full"] (VAE 100, the config's own; M1 classifier 50;
            M2 300; M1+M2 300, in labelled batches of 100 above 100 labels), meant for a GPU.
            mnist: 100, 600, 1000 and 3000 labels: 3 VAEs and 36 classifier runs
                python scripts/reproduce_table1.py --profile full \\
                    --trainer-args "--trainer.accelerator gpu --trainer.devices 1"
            svhn: 1000 labels; cifar10: 4000 labels (3 VAEs and 9 classifier runs each)
                python scripts/reproduce_table1.py --dataset svhn --profile full \\
                    --trainer-args "--trainer.accelerator gpu --trainer.devices 1"
                python scripts/reproduce_table1.py --dataset cifar10 --profile full \\
                    --trainer-args "--trainer.accelerator gpu --trainer.devices 1"

Other examples:
    python scripts/reproduce_table1.py --profile quick --dry-run             # print every command, run nothing
    python scripts/reproduce_table1.py --profile cpu --report --docs docs/results.md   # the finished runs' table
    python scripts/reproduce_table1.py --profile full --models m2 --labels 100 600 --seeds 0
    python scripts/reproduce_table1.py --profile quick --epochs m2=50 --out lightning_logs/table1/m2-50
    python scripts/reproduce_table1.py --dataset svhn --profile quick --data-dir /data --dry-run
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# ---- what to run -----------------------------------------------------------------------------------------------

# max_epochs of each fit, by profile. quick: 16 min 50 s in all on 2 CPU cores (measured; docs/results.md).
EPOCHS: dict[str, dict[str, int]] = {
    #          M1's VAE   M1 classifier   M2         M1+M2
    "quick": {"vae": 10,  "m1": 10,       "m2": 25,  "m1m2": 25},
    "full":  {"vae": 100, "m1": 50,       "m2": 300, "m1m2": 300},
    # the quick profile of the colour datasets (svhn, cifar10), each epoch cut short by QUICK_COLOUR
    "quick_colour": {"vae": 5, "m1": 10,  "m2": 5,   "m1m2": 10},
    "cpu":   {"vae": -1,  "m1": -1,       "m2": -1,  "m1m2": -1},  # stopped by CPU_TIMES
}
# trainer.max_time of each fit in the cpu profile (days:hours:minutes:seconds), two stages at a time on one core each
# (a core does more on its own than half of two: docs/results.md): the whole MNIST table, 3 seeds x 4 label budgets,
# 3 x 50 min of VAE (twice the hour profile's: at 1000 labels M1+M2 tested 2.41% on it against 2.52%) and 12 x (3 +
# 28 + 25) min of classifiers, 14 core-hours, and about 10 s per test: under 8 hours of 2 CPU cores
CPU_TIMES = {"vae": "00:00:50:00", "m1": "00:00:03:00", "m2": "00:00:28:00", "m1m2": "00:00:25:00"}
# the hour profile: M1+M2 at 100 labels, per seed 25 min of M1's VAE then 35 of M2, two stages at a time on one core
# each: one hour of one core per seed
HOUR_TIMES = {"vae": "00:00:25:00", "m1m2": "00:00:35:00"}
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
}


def config_path(dataset: str, stage: str) -> str:
    """The config of a stage of a dataset, relative to the repository, e.g. configs/mnist/m1_vae.yaml."""
    return f"configs/{dataset}/{CONFIGS[stage]}"

MODELS = ("m1", "m2", "m1m2")
RECORDS = ROOT / "docs" / "runs"  # the sweeps' records of finished stages, kept in git (--record)
SSVAE = [sys.executable, "-m", "ssvae_pl.cli"]  # how a stage runs `ssvae`, in the repository root
NEEDS_VAE = ("m1", "m1m2")

# Kingma, Rezende, Mohamed and Welling, "Semi-supervised Learning with Deep Generative Models", NeurIPS 2014,
# Table 1: MNIST test error (%), mean ± std over runs, by number of labels. Our "m1" row (M1 + our latent
# classifier) stands beside the paper's M1+TSVM.
PAPER_TABLE1: dict[str, dict[int, tuple[float, float]]] = {
    "m1": {100: (11.82, 0.25), 600: (5.72, 0.049), 1000: (4.24, 0.07), 3000: (3.49, 0.04)},  # M1+TSVM
    "m2": {100: (11.97, 1.71), 600: (4.94, 0.13), 1000: (3.60, 0.56), 3000: (3.92, 0.63)},
    "m1m2": {100: (3.33, 0.14), 600: (2.59, 0.05), 1000: (2.40, 0.02), 3000: (2.18, 0.04)},
}
# The paper's figures by dataset: {dataset: {model: {num_labelled: (mean, std)}}}, "—" in the table and no point in
# the plot where missing. SVHN: the paper's SVHN table, of which we quote only M1+M2 at 1000 labels (its other rows
# are not checked here); CIFAR-10 is not in the paper.
PAPER: dict[str, dict[str, dict[int, tuple[float, float]]]] = {
    "mnist": PAPER_TABLE1,
    "svhn": {"m1m2": {1000: (36.02, 0.10)}},
    "cifar10": {},
}
# where the figures come from, in titles; None: the paper has none for the dataset
PAPER_SOURCES: dict[str, str | None] = {"mnist": "Table 1", "svhn": "their SVHN table", "cifar10": None}
OUR_NAMES = {"m1": "M1 + classifier", "m2": "M2", "m1m2": "M1+M2"}
PAPER_NAMES = {"m1": "M1+TSVM", "m2": "M2", "m1m2": "M1+M2"}


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


class StageFailed(RuntimeError):
    pass


def load_cache(path: Path) -> dict[str, dict]:
    return json.loads(path.read_text()) if path.is_file() else {}


@contextmanager
def locked(folder: Path):
    """Hold an exclusive lock on ``folder`` (flock on the folder itself: no lock file is left behind)."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


def save_records(cache_file: Path, cache: dict[str, dict], keys: set[str]) -> None:
    """Write this sweep's records of ``keys`` into ``cache_file``, each as ``cache`` holds it or, where ``cache`` has
    none (a stage to run again), absent; keep the file's other records as they are now. Two sweeps of one profile
    may so run side by side (say M2's stages on a spare core), neither undoing what the other recorded."""
    with locked(cache_file.parent):
        records = load_cache(cache_file)
        for key in sorted(keys):
            if key in cache:
                records[key] = cache[key]  # in its place if the file has it, else at the end
            else:
                records.pop(key, None)
        write_json(cache_file, records)


def write_json(path: Path, data) -> None:
    """Write ``data`` as JSON atomically: an interrupted write never leaves a broken file."""
    write_text_atomically(path, json.dumps(data, indent=2) + "\n")


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


def check_same_command(stage: Stage, record: dict, cache_file: Path) -> None:
    """Refuse to reuse a record made by another command, or by the same command with other config files."""
    fix = "Use a new --out folder, or another --record file, to run the sweep with the new settings."
    why = stale_record(stage, record)
    if why == "command":
        raise StageFailed(
            f"{stage.key} in {cache_file} was run with a different command:\n  recorded: "
            f"{shlex.join(['ssvae', *record['args']])}\n  planned:  {command_line(stage)}\n{fix}"
        )
    if why == "config":
        raise StageFailed(f"{stage.key} in {cache_file} was run with other contents of "
                          f"{', '.join(changed_configs(stage, record))} (the config has changed since, or the record "
                          f"does not say what it held). {fix}")


def run_stage(stage: Stage, log_file: Path, threads: int | None = None) -> float:
    """Run one `ssvae` command with its output in ``log_file``; return its duration in seconds. ``threads``: its
    OMP_NUM_THREADS when stages run side by side (None: the environment's). A fit's run folder left by an interrupted
    attempt is removed first (a fit refuses a folder that holds a run); a test logs into its fit's folder."""
    if stage.args[0] == "fit" and stage.run_dir.exists():
        shutil.rmtree(stage.run_dir)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    with log_file.open("w") as log:
        log.write(f"$ {command_line(stage)}\n\n")
        log.flush()
        result = subprocess.run([*SSVAE, *stage.args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    if result.returncode:
        tail = "\n".join(log_file.read_text().splitlines()[-15:])
        raise StageFailed(f"{stage.key} failed (exit {result.returncode}):\n  {command_line(stage)}\n"
                          f"(run from {ROOT})\nlog: {log_file}\n--- last lines of the log ---\n{tail}")
    return time.perf_counter() - started


def read_test_accuracy(stage: Stage) -> float:
    from ssvae_pl.results import read_scalars  # tensorboard: imported only when needed

    scalars = read_scalars(stage.run_dir)
    if "test/acc" not in scalars:
        raise StageFailed(f"{stage.key}: no test/acc logged in {stage.run_dir}")
    return scalars["test/acc"]


def forget_lost_fits(stages: list[Stage], cache: dict[str, dict]) -> tuple[list[str], list[str]]:
    """Drop from ``cache`` the fits recorded as done whose checkpoint is gone (a fresh clone holds the record, not
    the runs) but which a stage still to run reads, so that they run again, and with them the records of every
    stage that read them, directly or through another: a seed's figures all come from one VAE. Return the keys of
    the lost fits and those of their readers."""
    by_key = {stage.key: stage for stage in stages}
    lost: list[str] = []
    readers: list[str] = []
    while True:
        needed = {key for stage in stages if stage.key not in cache for key in stage.needs}
        gone = [key for key in needed if key in cache and not by_key[key].checkpoint.is_file()]
        if not gone:
            return lost, readers
        for key in gone:
            del cache[key]
        lost += gone
        rerun = set(gone)
        for stage in stages:  # in plan order: a stage comes after the fits it reads
            if stage.key in cache and rerun.intersection(stage.needs):
                del cache[stage.key]
                rerun.add(stage.key)
                readers.append(stage.key)


def fit_summary(stage: Stage) -> dict[str, float]:
    """What a finished fit's TensorBoard events say of it: its epochs, the median seconds of an epoch's training, and
    the last val/acc (with the best), val/elbo and val/active_units it logged; empty without events."""
    from ssvae_pl.results import read_series  # tensorboard: imported only when needed

    try:
        seconds = read_series(stage.run_dir, "time/epoch_seconds")
    except FileNotFoundError:
        return {}
    summary: dict[str, float] = {"epochs": len(seconds)}
    if seconds:
        summary["median_epoch_seconds"] = round(statistics.median(seconds), 2)
    for tag in ("val/acc", "val/elbo", "val/active_units"):
        values = read_series(stage.run_dir, tag)
        if values:
            summary[tag] = round(values[-1], 4)
            if tag == "val/acc":
                summary["best val/acc"] = round(max(values), 4)
    return summary


def summarise_fits(stages: list[Stage], cache: dict[str, dict]) -> bool:
    """Add ``fit_summary`` to the recorded fits that lack one and whose run folder is here; whether any was added."""
    added = False
    for stage in stages:
        record = cache.get(stage.key)
        if stage.args[0] == "fit" and record is not None and "summary" not in record and stage.run_dir.is_dir():
            record["summary"] = fit_summary(stage)
            added = True
    return added


def stage_threads(jobs: int) -> int | None:
    """The threads of each stage when ``jobs`` stages run at once: this process's cores shared out evenly (None for
    one job at a time, which leaves the environment's OMP_NUM_THREADS alone)."""
    if jobs == 1:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // jobs)


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


def ready_stages(pending: list[Stage], cache: dict[str, dict]) -> list[Stage]:
    """The stages whose inputs are recorded, tests first (each runs as soon as its fit is done), then in plan order."""
    ready = [stage for stage in pending if all(key in cache for key in stage.needs)]
    return sorted(ready, key=lambda stage: stage.args[0] != "test")


def finish_record(stage: Stage, seconds: float, log_file: Path, threads: int | None) -> dict:
    """The record of a stage that has run: its command, configs' digests, duration, log and, for a test, test/acc;
    for a fit, what its events say of it."""
    record: dict = {"args": list(stage.args), "configs": stage.configs, "seconds": round(seconds, 1),
                    "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "log": shown(log_file)}
    if threads is not None:
        record["threads"] = threads
    if stage.key.endswith("-test"):
        record["test_acc"] = read_test_accuracy(stage)
        record["test_error"] = 100 * (1 - record["test_acc"])
    else:
        record["summary"] = fit_summary(stage)
    return record


def execute(stages: list[Stage], cache_file: Path, out: Path, jobs: int = 1,
            deadline: float | None = None) -> dict[str, dict]:
    """Run every stage not yet recorded in ``cache_file``, up to ``jobs`` at once (a stage starts once the fits it
    reads are recorded), recording each as it finishes; return the cache. With a ``deadline`` (time.monotonic()),
    a stage starts only if ``stage_seconds`` says it ends by then (one that has no known length starts anyway).
    After a failure no stage starts; those running finish and are recorded, then the first failure is raised."""
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache = load_cache(cache_file)
    lost, readers = forget_lost_fits(stages, cache)
    for key in lost:
        print(f"{key}: recorded as done, but its checkpoint is gone and a stage still to run needs it: runs again",
              flush=True)
    for key in readers:
        print(f"{key}: recorded as done on a fit that runs again: runs again", flush=True)
    keys = {stage.key for stage in stages}
    if lost:
        save_records(cache_file, cache, keys)
    width = max(len(stage.key) for stage in stages)
    number = {stage.key: f"[{i:>{len(str(len(stages)))}}/{len(stages)}] {stage.key:<{width}}"
              for i, stage in enumerate(stages, 1)}
    pending: list[Stage] = []
    for stage in stages:
        if stage.key in cache:
            check_same_command(stage, cache[stage.key], cache_file)
            print(f"{number[stage.key]}  skip (done in {cache[stage.key]['seconds']:.0f} s, recorded in "
                  f"{shown(cache_file)})", flush=True)
        else:
            pending.append(stage)
    threads = stage_threads(jobs)
    if threads is not None and pending:
        print(f"{jobs} stages at a time, {threads} thread{'s' * (threads > 1)} each (OMP_NUM_THREADS)", flush=True)
    failures: list[StageFailed] = []
    running: dict[Future, tuple[Stage, Path]] = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while True:
            startable = [] if failures else [
                stage for stage in ready_stages(pending, cache) if deadline is None
                or (seconds := stage_seconds(stage)) is None or time.monotonic() + seconds <= deadline
            ][:jobs - len(running)]
            for stage in startable:
                pending.remove(stage)
                log_file = out / "logs" / f"{stage.key}.log"
                print(f"{number[stage.key]}  ..." if jobs == 1 else f"{number[stage.key]}  started",
                      end="" if jobs == 1 else "\n", flush=True)
                running[pool.submit(run_stage, stage, log_file, threads)] = stage, log_file
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                stage, log_file = running.pop(future)
                end = "" if jobs == 1 else f"{number[stage.key]}  "
                try:
                    record = finish_record(stage, future.result(), log_file, threads)
                except StageFailed as err:
                    print(f"{' ' if jobs == 1 else end}FAILED", flush=True)
                    failures.append(err)
                    continue
                cache[stage.key] = record
                save_records(cache_file, cache, keys)
                error = f", test error {record['test_error']:.2f} %" if "test_error" in record else ""
                print(f"{end} {record['seconds']:.0f} s{error}   log: {shown(log_file)}", flush=True)
    if failures:
        raise failures[0]
    if pending:
        print(f"{len(pending)} stage{'s' * (len(pending) > 1)} would not end within --hours: rerun the same command "
              f"to go on in a later sitting", flush=True)
    return cache


# ---- results -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """Our test errors (%) of one model at one label budget, over seeds."""

    errors: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.errors)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.errors)

    @property
    def std(self) -> float:
        """The sample standard deviation (n - 1); 0 for a single seed."""
        return statistics.stdev(self.errors) if self.n > 1 else 0.0


def run_records(runs: list[Run], cache: dict[str, dict]) -> list[dict]:
    """The numbers of every planned run whose test is in the cache."""
    records = []
    for run in runs:
        if run.test.key not in cache:
            continue
        test = cache[run.test.key]
        fit = cache[run.fit.key]
        records.append({"model": run.model, "num_labelled": run.num_labelled, "seed": run.seed,
                        "test_acc": test["test_acc"], "test_error": test["test_error"],
                        "fit_seconds": fit["seconds"], "test_seconds": test["seconds"],
                        "fit": fit.get("summary", {}),
                        "vae": cache.get(run.stages[0].key, {}).get("summary", {}) if run.model in NEEDS_VAE else {},
                        "checkpoint": str(run.fit.checkpoint), "test_dir": str(run.test.run_dir)})
    return records


def summarise(records: list[dict]) -> dict[str, dict[int, Cell]]:
    """Test errors by model and label count: {model: {num_labelled: Cell}}, in the order of ``records``."""
    errors: dict[str, dict[int, list[float]]] = {}
    for record in records:
        errors.setdefault(record["model"], {}).setdefault(record["num_labelled"], []).append(record["test_error"])
    return {model: {n: Cell(tuple(values)) for n, values in by_n.items()} for model, by_n in errors.items()}


def format_cell(cell: Cell | None, paper: tuple[float, float] | None) -> str:
    ours = "—" if cell is None else f"{cell.mean:.2f} ± {cell.std:.2f} ({cell.n} seed{'s' if cell.n > 1 else ''})"
    theirs = "—" if paper is None else f"{paper[0]:.2f} ± {paper[1]:.2f}"
    return f"{ours} \\| {theirs}"  # an escaped "|": one table cell


def titles(dataset: str) -> tuple[str, str]:
    """The Markdown table's title and the plot's, naming the dataset and where the paper's figures come from."""
    name, source = DATASET_NAMES[dataset], PAPER_SOURCES[dataset]
    versus = "ssvae-pl (not in Kingma et al. 2014)" if source is None else \
        f"ssvae-pl vs Kingma et al. 2014, {source}"
    return f"{name} test error (%): {versus}", f"{name}: {versus}"


def table_note(dataset: str) -> str:
    """The sentence under the table's title: what a cell holds."""
    ours = "Each cell: ssvae-pl's mean ± std over seeds (sample std, n − 1; 0 for one seed) \\| "
    if dataset == "mnist":
        return (ours + "the paper's mean ± std. ssvae-pl: test error of the last checkpoint; its M1 row is M1 + the "
                "latent classifier, beside the paper's M1+TSVM.")
    if not PAPER[dataset]:
        return ours + f"— ({DATASET_NAMES[dataset]} is not in the paper). ssvae-pl: test error of the last checkpoint."
    return (ours + f"the paper's mean ± std ({PAPER_SOURCES[dataset]}: only the figures quoted here; — elsewhere). "
            "ssvae-pl: test error of the last checkpoint.")


def write_table(summary: dict[str, dict[int, Cell]], labels: list[int], path: Path, command: str,
                dataset: str = "mnist") -> str:
    """Write the Markdown table of ``summary`` beside the paper's figures for ``dataset`` ("—" where it has none) to
    ``path``; return its text."""
    header = ["model"] + [f"{n} labels" for n in labels]
    paper = PAPER[dataset]
    lines = [
        f"# {titles(dataset)[0]}",
        "",
        table_note(dataset),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for model in [m for m in MODELS if m in summary]:
        name = OUR_NAMES[model] if OUR_NAMES[model] == PAPER_NAMES[model] or model not in paper else \
            f"{OUR_NAMES[model]} (paper: {PAPER_NAMES[model]})"
        cells = [format_cell(summary[model].get(n), paper.get(model, {}).get(n)) for n in labels]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    lines += ["", f"Command: `{command}`", ""]
    text = "\n".join(lines)
    path.write_text(text)
    return text


def plot(summary: dict[str, dict[int, Cell]], path: Path, dataset: str = "mnist") -> None:
    """Test error (%) against the number of labels (log x): ours as lines with error bars, the paper's figures for
    ``dataset`` (where it has any) as hollow markers (with their error bars) of the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ticks: set[int] = set()
    for i, model in enumerate([m for m in MODELS if m in summary]):
        colour = f"C{i}"
        ns = sorted(summary[model])
        cells = [summary[model][n] for n in ns]
        ax.errorbar(ns, [c.mean for c in cells], yerr=[c.std for c in cells], color=colour, marker="o",
                    capsize=3, label=f"{OUR_NAMES[model]} (ours)")
        paper = PAPER[dataset].get(model, {})
        if paper:
            ax.errorbar(sorted(paper), [paper[n][0] for n in sorted(paper)],
                        yerr=[paper[n][1] for n in sorted(paper)], color=colour, marker="s", markerfacecolor="none",
                        linestyle="none", capsize=3, label=f"{PAPER_NAMES[model]} (paper)")
        ticks.update(ns, paper)
    ax.set_xscale("log")
    ax.set_xticks(sorted(ticks), [str(n) for n in sorted(ticks)])
    ax.minorticks_off()
    ax.set_xlabel("number of labels")
    ax.set_ylabel("test error (%)")
    ax.set_title(titles(dataset)[1])
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_docs(docs: Path, key: str, table: str, machine: str, records: list[dict],
                figure: Path | None = None) -> None:
    """Put ``table`` (table1.md's text, its title a level down), the plot ``figure`` (linked relative to ``docs``),
    the machine and each run's fit time and summary (its epochs and last validation figures, ``fit_summary``; the
    VAEs' too) into ``docs`` between the markers ``<!-- reproduce_table1 KEY -->`` and ``<!-- /reproduce_table1 KEY
    -->``, replacing what they held; appended at the end when they are not there yet."""
    from ssvae_pl.results import replace_marked_section

    vaes = {r["seed"]: r["vae"] for r in records if r["vae"]}
    lines = [f"- M1's VAE, seed {seed}: {describe_fit(summary)}" for seed, summary in sorted(vaes.items())]
    lines += [f"- {OUR_NAMES[r['model']]}, seed {r['seed']}, {r['num_labelled']} labels: fit "
              f"{r['fit_seconds'] / 60:.0f} min{', ' + describe_fit(r['fit']) if r['fit'] else ''}; test error "
              f"{r['test_error']:.2f} %" for r in records]
    picture = [f"![test error against the number of labels]({os.path.relpath(figure, docs.parent)})", ""] \
        if figure is not None else []
    replace_marked_section(docs, f"reproduce_table1 {key}",
                           "\n".join(["##" + table.strip(), "", *picture, f"Machine: {machine}. Runs (from their "
                                       "TensorBoard events):", "", *lines]))


def describe_fit(summary: dict[str, float]) -> str:
    """A fit's summary (``fit_summary``) in words."""
    words = []
    if "epochs" in summary:
        words.append(f"{summary['epochs']} epochs" + (f" (median {summary['median_epoch_seconds']:.2f} s of training)"
                                                     if "median_epoch_seconds" in summary else ""))
    if "val/acc" in summary:
        words.append(f"val/acc {summary['val/acc']:.4f} at the end (best {summary['best val/acc']:.4f})")
    if "val/elbo" in summary:
        words.append(f"val/elbo {summary['val/elbo']:.2f}")
    if "val/active_units" in summary:
        words.append(f"{summary['val/active_units']:.0f} active units")
    return ", ".join(words)


def write_text_atomically(path: Path, text: str) -> None:
    """``path`` replaced in one step by ``text`` (ssvae_pl.files.atomic_output)."""
    from ssvae_pl.files import atomic_output

    with atomic_output(path, overwrite=True) as temporary:
        temporary.write_text(text)


# ---- the command line ------------------------------------------------------------------------------------------


def parse_epochs(values: list[str], epochs: dict[str, int]) -> dict[str, int]:
    """--epochs N (every stage) or STAGE=N, applied in order over the profile's epochs."""
    epochs = dict(epochs)
    for value in values:
        stage, _, number = value.rpartition("=")
        if stage and stage not in CONFIGS:
            raise SystemExit(f"--epochs {value}: unknown stage {stage!r}; choose from {', '.join(CONFIGS)}")
        if not number.isdigit() or int(number) < 1:
            raise SystemExit(f"--epochs {value}: the number of epochs must be a positive integer")
        for name in [stage] if stage else list(CONFIGS):
            epochs[name] = int(number)
    return epochs


def parse_stage_args(values: list[str], extra: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """--stage-args STAGE=ARGS (or STAGE-nN=ARGS), appended to the profile's extra arguments of that stage's fit."""
    extra = dict(extra)
    for value in values:
        stage, sep, args = value.partition("=")
        name, _, budget = stage.partition("-n")
        if not sep or name not in CONFIGS or (budget and not budget.isdigit()):
            raise SystemExit(f"--stage-args {value!r}: expected STAGE=ARGS or STAGE-nN=ARGS (at N labels only) with "
                             f"STAGE one of {', '.join(CONFIGS)}")
        extra[stage] = (*extra.get(stage, ()), *shlex.split(args))
    return extra


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Reproduce Kingma et al. 2014, Table 1 (MNIST test error vs number of labels) through `ssvae`; "
                    "the same sweep on SVHN and CIFAR-10.",
        epilog="Profiles: " + "; ".join(
            f"{dataset} {name}: models {' '.join(p.models)}, labels {' '.join(map(str, p.labels))}, seeds "
            f"{' '.join(map(str, p.seeds))}, epochs {', '.join(f'{k} {v}' for k, v in p.epochs.items())}"
            + "".join(f", -c {c}" for c in p.fit_configs)
            for dataset, profiles in PROFILES.items() for name, p in profiles.items())
        + ". See the docstring of scripts/reproduce_table1.py.",
    )
    parser.add_argument("--dataset", choices=DATASETS, default="mnist",
                        help="the dataset: its stages run configs/<dataset>/*.yaml (default: mnist)")
    parser.add_argument("--profile", choices=sorted(PROFILES["mnist"]), default="quick",
                        help="the named sweep to run (default: quick); its label counts depend on the dataset")
    parser.add_argument("--models", nargs="+", choices=MODELS, help="models to run (overrides the profile's)")
    parser.add_argument("--labels", nargs="+", type=int, metavar="N",
                        help="label counts, data.num_labelled (overrides the profile's)")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="S",
                        help="seeds: data.seed and seed_everything of every stage (overrides the profile's)")
    parser.add_argument("--epochs", action="append", default=[], metavar="[STAGE=]N",
                        help="max_epochs of every fit (N) or of one stage (STAGE=N, STAGE one of "
                             f"{', '.join(CONFIGS)}; vae is M1's VAE, m1 its classifier); repeatable")
    parser.add_argument("--out", type=Path,
                        help="output folder for runs, logs, tables and the cache (default lightning_logs/table1/"
                             "<profile> in the repository for mnist, lightning_logs/table1/<dataset>-<profile> for "
                             "the others)")
    parser.add_argument("--record", type=Path, metavar="JSON",
                        help="the record of finished stages, which a rerun skips (default: docs/runs/table1-<profile>"
                             ".json, or table1-<dataset>-<profile>.json, kept in git so that a sweep resumes in a "
                             "fresh clone; with --out: results.json there)")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data",
                        help="data.data_dir of every stage (default: data/ in the repository)")
    parser.add_argument("--trainer-args", default="",
                        help='extra `ssvae` arguments for every fit and test, e.g. "--trainer.accelerator gpu '
                             '--trainer.devices 1" (a single flag without a space: --trainer-args=--flag)')
    parser.add_argument("--stage-args", action="append", default=[], metavar="STAGE=ARGS",
                        help='extra `ssvae` arguments for one stage\'s fit, e.g. "m2=--model.init_args.alpha 5000"; '
                             "repeatable")
    parser.add_argument("--docs", type=Path, metavar="MARKDOWN",
                        help="also render the table, the plot (copied to runs/table1-<profile>.png beside the file), "
                             "the machine and the runs' times into this file (e.g. docs/results.md), between markers "
                             "named after the sweep")
    parser.add_argument("--jobs", type=int, metavar="N",
                        help="stages run at once, each with OMP_NUM_THREADS = the cores / N; a stage waits for the "
                             "fits it reads (default: the profile's, 2 for cpu and hour, else 1)")
    parser.add_argument("--hours", type=float, metavar="H",
                        help="start only the stages that end within H hours (a fit's max_time plus 90 s; a fit "
                             "stopped by epochs alone starts anyway), then stop: a sitting's share of a long sweep")
    parser.add_argument("--dry-run", action="store_true", help="print every command without running anything")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: write the table, plot and JSON (and --docs) of the stages finished so far, "
                             "for a sweep that resumes across sittings")
    args = parser.parse_args(argv)
    if args.hours is not None and args.hours <= 0:
        parser.error(f"--hours {args.hours}: give the hours this sitting has, a number above 0")
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: give 1 or more stages to run at once")
    if args.profile not in PROFILES[args.dataset]:
        parser.error(f"--profile {args.profile} is for mnist only; {args.dataset} has "
                     f"{', '.join(sorted(PROFILES[args.dataset]))}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    profile = PROFILES[args.dataset][args.profile]
    models = [m for m in MODELS if m in (args.models or profile.models)]
    labels = sorted(set(args.labels or profile.labels))
    seeds = list(dict.fromkeys(args.seeds if args.seeds is not None else profile.seeds))
    folder = args.profile if args.dataset == "mnist" else f"{args.dataset}-{args.profile}"
    out = (args.out or ROOT / "lightning_logs" / "table1" / folder).resolve()
    cache_file = (args.record or (out / "results.json" if args.out else RECORDS / f"table1-{folder}.json")).resolve()
    settings = Settings(out=out, data_dir=args.data_dir.resolve(), epochs=parse_epochs(args.epochs, profile.epochs),
                        extra_args=parse_stage_args(args.stage_args, profile.extra_args),
                        trainer_args=tuple(shlex.split(args.trainer_args)), dataset=args.dataset,
                        fit_configs=profile.fit_configs, times=profile.times)
    runs = plan_runs(models, labels, seeds, settings)
    stages = unique_stages(runs)
    command = shlex.join(["python", "scripts/reproduce_table1.py", *(a for a in argv if a != "--report")])
    jobs = args.jobs or profile.jobs

    sweep = args.profile if args.dataset == "mnist" else f"{args.dataset}, {args.profile}"
    print(f"Table 1 sweep ({sweep}): models {' '.join(models)}, labels {' '.join(map(str, labels))}, "
          f"seeds {' '.join(map(str, seeds))}; epochs {', '.join(f'{k} {v}' for k, v in settings.epochs.items())}")
    print(f"{len(runs)} runs, {len(stages)} stages, under {shown(out)} (commands run from {ROOT})", flush=True)
    if args.dry_run:
        if threads := stage_threads(jobs):
            print(f"# {jobs} stages at a time, each with OMP_NUM_THREADS={threads}")
        cache = load_cache(cache_file)
        forget_lost_fits(stages, cache)
        for i, stage in enumerate(stages, 1):
            if stage.key not in cache:
                done = ""
            elif why := stale_record(stage, cache[stage.key]):
                done = f"  (recorded with another {why}: would stop)"
            else:
                done = "  (done: would skip)"
            print(f"# [{i}/{len(stages)}] {stage.key}{done}\n{command_line(stage)}")
        return 0

    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        cache = load_cache(cache_file)
        if summarise_fits(stages, cache):  # records written before fits were summarised
            save_records(cache_file, cache, {stage.key for stage in stages})
    else:
        try:
            deadline = None if args.hours is None else time.monotonic() + args.hours * 3600
            cache = execute(stages, cache_file, out, jobs, deadline)
        except StageFailed as err:
            print(f"\nreproduce_table1: {err}", file=sys.stderr)
            return 1
    records = run_records(runs, cache)
    if not records and args.report:
        print("reproduce_table1: no run of this sweep has finished yet; run it without --report.", file=sys.stderr)
        return 1
    if not records:  # --hours ended the sitting before a test
        print("No run of this sweep has finished yet: no table.")
        return 0
    if len(records) < len(runs):
        print(f"{len(records)} of {len(runs)} runs finished; the table holds those.")
    summary = summarise(records)
    table = write_table(summary, labels, out / "table1.md", command, args.dataset)
    plot(summary, out / "table1.png", args.dataset)
    write_json(out / "table1.json", {
        "command": command, "dataset": args.dataset, "profile": args.profile, "models": models, "labels": labels,
        "seeds": seeds, "epochs": settings.epochs, "runs": records,
        "summary": {m: {str(n): {"mean": c.mean, "std": c.std, "n": c.n, "errors": list(c.errors)}
                        for n, c in by_n.items()} for m, by_n in summary.items()},
        "paper": {m: {str(n): {"mean": v[0], "std": v[1]} for n, v in by_n.items()}
                  for m, by_n in PAPER[args.dataset].items()},
    })
    if args.docs is not None:
        from ssvae_pl.precision import describe_machine

        figure = args.docs.resolve().parent / "runs" / f"table1-{folder}.png"
        figure.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "table1.png", figure)
        render_docs(args.docs, folder, table, describe_machine(), records, figure)
        print(f"Rendered the table into {shown(args.docs)}, its plot into {shown(figure)}")
    print(f"\n{table}")
    print(f"Wrote {shown(out / 'table1.md')}, {shown(out / 'table1.png')}, {shown(out / 'table1.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
