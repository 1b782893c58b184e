"""The report of a Table 1 sweep: our test errors by model and label budget beside the paper's, as a Markdown table,
a plot and a section of docs/results.md."""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from sweep.plan import DATASET_NAMES, MODELS, NEEDS_VAE, Run

# Kingma, Rezende, Mohamed and Welling, "Semi-supervised Learning with Deep Generative Models", NeurIPS 2014,
# Table 1: MNIST test error (%), mean ± std over runs, by number of labels. Our "m1" row (M1 + our latent
# classifier) stands beside the paper's M1+TSVM.
PAPER_TABLE1: dict[str, dict[int, tuple[float, float]]] = {
    "m1": {100: (11.82, 0.25), 600: (5.72, 0.049), 1000: (4.24, 0.07), 3000: (3.49, 0.04)},  # M1+TSVM
    "m2": {100: (11.97, 1.71), 600: (4.94, 0.13), 1000: (3.60, 0.56), 3000: (3.92, 0.63)},
    "m1m2": {100: (3.33, 0.14), 600: (2.59, 0.05), 1000: (2.40, 0.02), 3000: (2.18, 0.04)},
    # not in Table 1: Maaløe, Sønderby, Sønderby and Winther, "Auxiliary Deep Generative Models", ICML 2016, Table 1
    "adgm": {100: (0.96, 0.02)},
    "sdgm": {100: (1.32, 0.07)},
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
OUR_NAMES = {"m1": "M1 + classifier", "m2": "M2", "m1m2": "M1+M2", "adgm": "ADGM", "sdgm": "SDGM"}
PAPER_NAMES = {"m1": "M1+TSVM", "m2": "M2", "m1m2": "M1+M2", "adgm": "ADGM, Maaløe et al. 2016",
               "sdgm": "SDGM, Maaløe et al. 2016"}




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
        test, fit = cache[run.test.key], cache[run.fit.key]
        vae = cache.get(run.stages[0].key, {}) if run.model in NEEDS_VAE else {}
        records.append({"model": run.model, "num_labelled": run.num_labelled, "seed": run.seed,
                        "test_acc": test["test_acc"], "test_error": test["test_error"],
                        "fit_seconds": fit["seconds"], "test_seconds": test["seconds"],
                        "fit": fit.get("summary", {}),
                        "vae": vae.get("summary", {}),
                        "checkpoint": str(run.fit.checkpoint), "test_dir": str(run.test.run_dir),
                        "code": sorted({code_words(record) for record in (vae, fit, test) if record})})
    return records


def code_words(record: dict) -> str:
    """The code a stage ran, from its record: the commit's first 10 digits and whether the tree was clean."""
    if record.get("commit") is None:
        return "unknown code (recorded before commits were, or outside git)"
    return f"{record['commit'][:10]}{'' if record['clean'] else ' with uncommitted changes'}"


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
                dataset: str = "mnist", records: list[dict] = ()) -> str:
    """Write the Markdown table of ``summary`` beside the paper's figures for ``dataset`` ("—" where it has none) to
    ``path``, with the command and the code its ``records`` ran; return its text."""
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
    code = sorted({words for record in records for words in record.get("code", ())})
    lines += ["", f"Command: `{command}`", ""] + ([f"Code: {'; '.join(code)}.", ""] if code else [])
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
    """Put ``table`` (table1.md's text, its title a level down, without its Code line: the docs name the command and
    the machine, not commits), the plot ``figure`` (linked relative to ``docs``), the machine and each run's fit time
    and summary (its epochs and last validation figures, ``fit_summary``; the VAEs' too) into ``docs`` between the
    markers ``<!-- reproduce_table1 KEY -->`` and ``<!-- /reproduce_table1 KEY -->``, replacing what they held;
    appended at the end when they are not there yet."""
    from ssvae_pl.results import replace_marked_section

    table = "\n".join(line for line in table.splitlines() if not line.startswith("Code: "))
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
