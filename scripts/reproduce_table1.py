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

Resuming. Each finished stage is recorded (its command, its configs' digests, the code's commit and whether the code
and configs were committed, its duration and, for tests, test/acc) in
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

Side by side (--jobs N, default the profile's): the stages are jobs of submitit's local executor, N at a time, each
`ssvae` with OMP_NUM_THREADS = the cores / N; a stage starts once the fits it reads are recorded, a test as soon as
its fit is. After a failed stage none starts, those running finish and are recorded, and the script stops with the
failure. Ctrl-C stops the running stages (they restart on the next run). A sitting (--hours H) starts only the
stages that end within H hours (a fit's max_time plus 90 s), then writes the table of the runs finished.

On SLURM (--cluster slurm, from a login node; the repository, --out and the records on a filesystem the nodes
share): every stage not recorded is submitted at once through submitit, each job held until the jobs of the fits it
reads end well (afterok; cancelled if one fails), and the script returns; `squeue` shows the jobs, each writes its
record as it ends, and the same command with --report writes the table. --slurm KEY=VALUE sets submitit's SLURM
parameters (partition=gpu, gpus_per_node=1, cpus_per_task=8, time=MINUTES, account=...); a fit with a max_time gets
that plus 90 s, one without a day. Rerunning the command submits only the stages neither recorded nor still queued
(out/jobs.json holds the job ids), and names those whose jobs ended without a record. SLURM's own logs are in
out/jobs/.

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
    tiny    mnist: m1, m2, m1m2 at 100 labels, seed 0, one epoch of 2 batches each (configs/presets/tiny.yaml):
            seconds a stage, the whole path end to end (the cluster tests run it on a one-node SLURM)
                python scripts/reproduce_table1.py --profile tiny --cluster slurm
    adgm    mnist: ADGM and SDGM at 100 labels, seeds 0 1 2, each fit 3 hours of one core (ADGM_TIMES), two at a
            time (issue 39's budget; the paper's figures are Maaløe et al. 2016's)
                python scripts/reproduce_table1.py --profile adgm --docs docs/results.md
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
    python scripts/reproduce_table1.py --profile cpu --cluster slurm --slurm partition=cpu --slurm cpus_per_task=4
    python scripts/reproduce_table1.py --profile cpu --report --docs docs/results.md   # the finished runs' table
    python scripts/reproduce_table1.py --profile full --models m2 --labels 100 600 --seeds 0
    python scripts/reproduce_table1.py --profile quick --epochs m2=50 --out lightning_logs/table1/m2-50
    python scripts/reproduce_table1.py --dataset svhn --profile quick --data-dir /data --dry-run
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sweep's modules, scripts/sweep/
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # ssvae_pl, where it is not installed

from sweep.plan import (CONFIGS, DATASETS, MNIST_ONLY, MODELS, PROFILES, RECORDS, ROOT, Settings, command_line, plan_runs, shown,
                        stale_record, unique_stages)
from sweep.records import StageFailed, forget_lost_fits, load_cache, summarise_fits, update_records, write_json
from sweep.report import PAPER, plot, render_docs, run_records, summarise, write_table
from sweep.run import earlier_jobs, pending_stages, run_here, stage_threads, submit_to_slurm

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
    parser.add_argument("--cluster", choices=["slurm"],
                        help="submit every stage to SLURM through submitit, each after the fits it reads, and return "
                             "(default: run the stages on this machine)")
    parser.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                        help="a SLURM parameter of submitit for --cluster slurm, e.g. partition=gpu, gpus_per_node=1, "
                             "cpus_per_task=8, time=MINUTES; repeatable")
    parser.add_argument("--dry-run", action="store_true", help="print every command without running anything")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: write the table, plot and JSON (and --docs) of the stages finished so far, "
                             "for a sweep that resumes across sittings")
    args = parser.parse_args(argv)
    if args.hours is not None and args.hours <= 0:
        parser.error(f"--hours {args.hours}: give the hours this sitting has, a number above 0")
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: give 1 or more stages to run at once")
    if args.cluster and args.hours is not None:
        parser.error("--hours is for a sitting on this machine; on SLURM each fit's max_time limits its job")
    if args.slurm and not args.cluster:
        parser.error("--slurm sets parameters of --cluster slurm; add --cluster slurm")
    for value in args.slurm:
        if "=" not in value:
            parser.error(f"--slurm {value}: expected KEY=VALUE, e.g. partition=gpu")
    if args.dataset != "mnist" and set(args.models or ()) & set(MNIST_ONLY):
        parser.error(f"--models {' '.join(MNIST_ONLY)}: their configs are MNIST's (configs/mnist/); drop them for "
                     f"{args.dataset}")
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
    width = max(len(stage.key) for stage in stages)
    number = {stage.key: f"[{i:>{len(str(len(stages)))}}/{len(stages)}] {stage.key:<{width}}"
              for i, stage in enumerate(stages, 1)}
    try:
        if args.report:
            cache = load_cache(cache_file)
            if summarise_fits(stages, cache):  # records written before fits were summarised
                update_records(cache_file, {stage.key: cache[stage.key] for stage in stages if stage.key in cache})
        elif args.cluster:
            pending = pending_stages(stages, cache_file, number)
            ids = submit_to_slurm(pending, cache_file, out, number, dict(v.split("=", 1) for v in args.slurm))
            print(f"Submitted {len(ids)} job{'s' * (len(ids) != 1)} to SLURM; `squeue` shows them. When they have "
                  f"ended, the same command with --report writes the table ({shown(out)}/table1.md).")
            return 0
        else:
            deadline = None if args.hours is None else time.monotonic() + args.hours * 3600
            run_here(pending_stages(stages, cache_file, number), cache_file, out, number, jobs, deadline)
            cache = load_cache(cache_file)
    except StageFailed as err:
        print(f"reproduce_table1: {err}", file=sys.stderr)
        return 1
    if (out / "jobs.json").is_file() and shutil.which("squeue"):  # a sweep submitted to SLURM: what is still out there
        queued, lost = earlier_jobs(out / "jobs.json", cache)
        for key, job in queued.items():
            print(f"{key}: job {job} still queued or running")
        for key, job in lost.items():
            print(f"{key}: job {job} ended without a record (failed or cancelled): see {shown(out / 'logs' / key)}.log;"
                  " rerun the command without --report to submit it again")
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
    table = write_table(summary, labels, out / "table1.md", command, args.dataset, records)
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