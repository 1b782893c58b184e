"""Does `ssvae suggest` pick better labels than chance? Rounds of labelling on MNIST and Fashion-MNIST, each label
revealed from the dataset, with M1+M2 (configs/mnist/m1m2.yaml on a VAE trained once per dataset, no label seen).

For each dataset and seed: a class-balanced random 20 labels (2 per class) train round 0; then each strategy (and
`random`, the baseline) asks `ssvae suggest` for 30 more from round 0's model (50 labels), trains again from scratch
on them, asks for 50 more from that model (100 labels) and trains again. Every fit runs the same number of epochs
and is tested on the test set once, at its end (last.ckpt). Then the table (test error at 50 and 100 labels, mean ±
std over the seeds) and a plot go into --docs between markers.

    python scripts/active_learning.py --datasets mnist fashion_mnist --seeds 0 1 2 --docs docs/results.md
    python scripts/active_learning.py --seeds 0 --epochs 2 --vae-epochs 2 --out /tmp/al   # a smoke run

Each finished command is recorded in <out>/records.json (with the code's commit), so that the same command resumes
where it stopped; several processes may share the records (different --seeds, say, one per core).
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sweep/: the records
from sweep.plan import Stage  # noqa: E402
from sweep.records import StageFailed, code_version, load_cache, read_test_accuracy, update_records  # noqa: E402
from sweep.run import run_stage  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("random", "margin", "entropy", "spread", "bound")
ROUNDS = (20, 50, 100)  # labels after each round
NAMES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}


def run(records: Path, key: str, args: list[str], log: Path, run_dir: Path) -> dict:
    """One `ssvae` command (``sweep.run.run_stage``: a fit's half-written ``run_dir`` of an interrupted attempt is
    cleared first), skipped when ``records`` has it with the same arguments; its record: args, the code, seconds,
    and for a test its test/acc (logged in ``run_dir``, the checkpoint's run folder)."""
    done = load_cache(records).get(key)
    if done is not None and done["args"] == args:
        return done
    stage, code = Stage(key, tuple(args), run_dir), code_version()
    try:
        record = {"args": args, **code, "seconds": round(run_stage(stage, log), 1)}
        if args[0] == "test":
            record["test_acc"] = read_test_accuracy(stage)
    except StageFailed as err:
        raise SystemExit(f"active_learning: {err}") from None
    update_records(records, {key: record})
    print(f"{key}: {record['seconds']:.0f} s" + (f", test error {100 * (1 - record['test_acc']):.2f} %"
                                                  if "test_acc" in record else ""), flush=True)
    return record


def chain(dataset: str, seed: int, strategies: list[str], settings: argparse.Namespace) -> None:
    """Round 0, then every strategy's two rounds, for one dataset and seed."""
    out, records = settings.out, settings.out / "records.json"
    data = ["--data.dataset", dataset, "--data.data_dir", str(settings.data_dir), "--trainer.enable_progress_bar",
            "false", "--trainer.logger.init_args.save_dir", str(out), *shlex.split(settings.ssvae_args)]
    vae_version = f"{dataset}-vae"
    run(records, vae_version, ["fit", "-c", "configs/mnist/m1_vae.yaml", *data, "--trainer.max_epochs",
                               str(settings.vae_epochs), "--trainer.logger.init_args.version", vae_version],
        out / "logs" / f"{vae_version}.log", out / "m1_vae" / vae_version)
    vae = out / "m1_vae" / vae_version / "checkpoints" / "last.ckpt"
    m1m2 = ["-c", "configs/mnist/m1m2.yaml", "--model.init_args.vae_checkpoint", str(vae), *data,
            "--seed_everything", str(seed), "--data.seed", str(seed), "--data.labelled_batch_size", "20",
            *shlex.split(settings.m1m2_args)]

    def fit_and_test(version: str, labelled: list[str]) -> Path:
        run(records, f"{version}-fit", ["fit", *m1m2, *labelled, "--trainer.max_epochs", str(settings.epochs),
                                        "--trainer.logger.init_args.version", version],
            out / "logs" / f"{version}-fit.log", out / "m1m2" / version)
        ckpt = out / "m1m2" / version / "checkpoints" / "last.ckpt"
        run(records, f"{version}-test", ["test", *m1m2, *labelled, "--ckpt_path", str(ckpt)],
            out / "logs" / f"{version}-test.log", ckpt.parent.parent)
        return ckpt

    start = f"{dataset}-s{seed}-n{ROUNDS[0]}"
    first = fit_and_test(start, ["--data.num_labelled", str(ROUNDS[0])])
    for strategy in strategies:
        ckpt, labelled_args = first, ["--data.num_labelled", str(ROUNDS[0])]
        for before, after in zip(ROUNDS, ROUNDS[1:]):
            version = f"{dataset}-s{seed}-{strategy}-n{after}"
            asked = out / "suggested" / f"{version}.csv"
            run(records, f"{version}-suggest", ["suggest", *m1m2, *labelled_args, "--ckpt_path", str(ckpt),
                                                "--suggest.count", str(after - before), "--suggest.strategy",
                                                strategy, "--suggest.seed", str(seed), "--suggest.output",
                                                str(asked), "--suggest.overwrite", "true"],
                out / "logs" / f"{version}-suggest.log", ckpt.parent.parent)
            labelled = json.loads((ckpt.parent.parent / "labelled_indices.json").read_text())["labelled_indices"]
            with asked.open() as rows:
                chosen = labelled + [int(row["index"]) for row in csv.DictReader(rows)]
            indices = out / "suggested" / f"{version}.json"
            indices.write_text(json.dumps(sorted(chosen)))
            labelled_args = ["--data.num_labelled", str(after), "--data.labelled_indices", str(indices)]
            ckpt = fit_and_test(version, labelled_args)


def test_errors(records: dict, dataset: str, strategy: str, n: int, seeds: list[int]) -> dict[int, float]:
    """Test error (%) of each seed's fit at ``n`` labels by ``strategy`` that is recorded, by seed."""
    key = (lambda s: f"{dataset}-s{s}-n{n}-test") if n == ROUNDS[0] else \
        (lambda s: f"{dataset}-s{s}-{strategy}-n{n}-test")
    return {s: 100 * (1 - records[key(s)]["test_acc"]) for s in seeds if key(s) in records}


def verdict(records: dict, datasets: list[str], seeds: list[int], strategies: list[str]) -> str:
    """For each dataset and label count past round 0: the strategies whose mean test error is below random's, by how
    much and in how many seeds (paired by seed), or else none, and which came closest. Only seeds that both ran."""
    lines = []
    for dataset in datasets:
        for n in ROUNDS[1:]:
            random = test_errors(records, dataset, "random", n, seeds)
            rows = []
            for strategy in (s for s in strategies if s != "random"):
                mine = test_errors(records, dataset, strategy, n, seeds)
                both = sorted(set(mine) & set(random))
                if both:
                    gain = statistics.fmean(mine[s] - random[s] for s in both)
                    wins = sum(mine[s] < random[s] for s in both)
                    rows.append((gain, f"{strategy} {gain:+.2f} (lower in {wins} of {len(both)} seeds)"))
            if not rows:
                continue
            below = [text for gain, text in sorted(rows) if gain < 0]
            closest = min(rows)[1]
            lines.append(f"- {NAMES.get(dataset, dataset)}, {n} labels: "
                         + (f"below random: {'; '.join(below)}." if below
                            else f"no strategy below random; closest: {closest}."))
    return "\n".join(lines)


def table(records: dict, datasets: list[str], seeds: list[int], strategies: list[str]) -> str:
    """Test error (%) at 50 and 100 labels, mean ± std over seeds, each strategy beside random."""
    def errors(dataset: str, strategy: str, n: int) -> list[float]:
        return list(test_errors(records, dataset, strategy, n, seeds).values())

    def cell(values: list[float]) -> str:
        if not values:
            return "—"
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.2f} ± {std:.2f} ({len(values)})"

    lines = ["| dataset | strategy | 20 labels | 50 labels | 100 labels |", "|---|---|---|---|---|"]
    for dataset in datasets:
        for strategy in strategies:
            lines.append(f"| {NAMES.get(dataset, dataset)} | {strategy} | {cell(errors(dataset, strategy, 20))} | "
                         f"{cell(errors(dataset, strategy, 50))} | {cell(errors(dataset, strategy, 100))} |")
    return "\n".join(lines)


def plot(records: dict, datasets: list[str], seeds: list[int], strategies: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.6), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for strategy in strategies:
            means, stds, ns = [], [], []
            for n in ROUNDS:
                values = list(test_errors(records, dataset, strategy, n, seeds).values())
                if values:
                    ns.append(n), means.append(statistics.fmean(values))
                    stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
            ax.errorbar(ns, means, yerr=stds, marker="o", capsize=3, label=strategy,
                        linestyle="--" if strategy == "random" else "-")
        ax.set_xscale("log")
        ax.set_xticks(list(ROUNDS), [str(n) for n in ROUNDS])
        ax.minorticks_off()
        ax.set_xlabel("labels")
        ax.set_ylabel("test error (%)")
        ax.set_title(NAMES.get(dataset, dataset))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"], choices=sorted(NAMES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--epochs", type=int, default=30, help="max_epochs of every M1+M2 fit (default 30)")
    parser.add_argument("--vae-epochs", type=int, default=100, help="max_epochs of each dataset's VAE (default 100)")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "lightning_logs" / "active_learning")
    parser.add_argument("--ssvae-args", default="", help="more `ssvae` arguments for every command (e.g. smaller "
                        "networks for a smoke run)")
    parser.add_argument("--m1m2-args", default="", help="more `ssvae` arguments for the M1+M2 commands")
    parser.add_argument("--docs", type=Path, help="render the table and plot into this Markdown file")
    parser.add_argument("--report", action="store_true", help="run nothing: the table of what is recorded")
    settings = parser.parse_args(argv)
    settings.out, settings.data_dir = settings.out.resolve(), settings.data_dir.resolve()
    strategies = ["random", *[s for s in settings.strategies if s != "random"]]
    if not settings.report:
        for dataset in settings.datasets:
            for seed in settings.seeds:
                chain(dataset, seed, strategies, settings)
    records = load_cache(settings.out / "records.json")
    text = table(records, settings.datasets, settings.seeds, strategies)
    summary = verdict(records, settings.datasets, settings.seeds, strategies)
    print(text, summary, sep="\n\n")
    if settings.docs is not None:
        from ssvae_pl.precision import describe_machine
        from ssvae_pl.results import replace_marked_section

        figure = settings.docs.resolve().parent / "runs" / "active_learning.png"
        figure.parent.mkdir(parents=True, exist_ok=True)
        plot(records, settings.datasets, settings.seeds, strategies, figure)
        command = shlex.join(["python", "scripts/active_learning.py", *(a for a in (argv or sys.argv[1:])
                                                                        if a != "--report")])
        replace_marked_section(settings.docs, "active_learning", "\n".join([
            "## Labels chosen by `ssvae suggest` against random labels", "",
            f"M1+M2, {settings.epochs} epochs a fit, VAE of {settings.vae_epochs} epochs per dataset; test error (%) "
            "of last.ckpt, mean ± std (seeds).", "", text, "",
            "Each strategy against random, seed by seed (the mean difference in test error, points):", "", summary, "",
            f"![test error against labels, by strategy]({figure.relative_to(settings.docs.resolve().parent)})", "",
            f"Command: `{command}`. Machine: {describe_machine()}."]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
