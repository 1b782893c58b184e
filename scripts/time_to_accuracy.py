"""Time to accuracy of one `ssvae fit`: when validation accuracy first reached a target, and the test accuracy of the
run's last checkpoint.

It runs the fit as given (a fresh process, its TensorBoard run in a folder of its own), reads the run's ``val/acc``
and ``time/elapsed_seconds`` (the fit's clock at the end of each epoch, validation included), tests ``last.ckpt``
with ``ssvae test`` (the fit's arguments; it logs into the fit's run), and prints and writes one JSON record: the
target, the first epoch whose validation accuracy reached it and the seconds until then, the epochs and seconds of
the whole fit (the process, start-up included), the best and last validation accuracy, and the test accuracy.

    python scripts/time_to_accuracy.py --target 0.95 --json out/m2-gpu.json -- \\
        -c configs/mnist/m2.yaml -c configs/presets/gpu.yaml --trainer.max_time 00:00:02:00
    python scripts/time_to_accuracy.py --target 0.967 -- -c configs/mnist/m1m2.yaml -c configs/presets/gpu.yaml \\
        --model.init_args.vae_checkpoint <M1's run>/checkpoints/last.ckpt --trainer.max_time 00:00:05:00

The arguments after ``--`` are `ssvae fit`'s. ``--render`` puts records (their JSON files) into a marked section of a
Markdown file as one table, each with its command, and the machine:

    python scripts/time_to_accuracy.py --render out/m2-gpu.json out/m1m2-gpu.json --docs docs/results.md --key gpu
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssvae_pl.files import atomic_output  # noqa: E402
from ssvae_pl.precision import describe_machine  # noqa: E402
from ssvae_pl.results import read_scalars, read_series, replace_marked_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def ssvae(arguments: list[str]) -> float:
    """Run ``ssvae ARGUMENTS`` from the repository; its wall-clock seconds. A failure ends the script with its tail."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ssvae_pl.cli", *arguments], cwd=REPO, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"time_to_accuracy: `ssvae {' '.join(arguments)}` failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def first_reaching(accuracies: list[float], seconds: list[float], target: float) -> tuple[int | None, float | None]:
    """The first epoch (1-based) whose validation accuracy is at least ``target``, and the fit's seconds at its end."""
    for epoch, (accuracy, elapsed) in enumerate(zip(accuracies, seconds), start=1):
        if accuracy >= target:
            return epoch, elapsed
    return None, None


def summarise_run(run: Path, fit_arguments: list[str], target: float) -> dict:
    """The record of a fit's run folder (its TensorBoard events): when val/acc reached ``target``, and the test
    accuracy when ``ssvae test`` has logged one into the run (else None)."""
    accuracies, elapsed = read_series(run, "val/acc"), read_series(run, "time/elapsed_seconds")
    epoch, seconds = first_reaching(accuracies, elapsed, target)
    return {"fit": fit_arguments, "target": target, "epoch_reached": epoch, "seconds_to_target": seconds,
            "epochs": len(accuracies), "fit_seconds_in_all": None,
            "fit_seconds_at_last_epoch": elapsed[-1] if elapsed else None,
            "val_acc_last": accuracies[-1] if accuracies else None,
            "val_acc_best": max(accuracies) if accuracies else None,
            "test_acc_last_ckpt": read_scalars(run).get("test/acc"), "run": str(run)}


def measure(fit_arguments: list[str], target: float, save_dir: Path) -> dict:
    fit_seconds = ssvae(["fit", *fit_arguments, "--trainer.logger.init_args.save_dir", str(save_dir),
                         "--trainer.enable_progress_bar", "false"])
    (run,) = sorted(save_dir.glob("*/version_*"))
    ssvae(["test", *fit_arguments, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
           "--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.enable_progress_bar", "false"])
    return {**summarise_run(run, fit_arguments, target), "fit_seconds_in_all": fit_seconds}


def render(records: list[dict], docs: Path, key: str) -> None:
    """The records as one Markdown table between ``<!-- time_to_accuracy KEY -->`` markers in ``docs``."""
    lines = ["| fit | target (val/acc) | reached at epoch | seconds to it | epochs in all | seconds of the fit "
             "| val/acc best / last | test/acc of last.ckpt |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        reached = "not reached" if r["epoch_reached"] is None else str(r["epoch_reached"])
        seconds = "" if r["seconds_to_target"] is None else f"{r['seconds_to_target']:.0f}"
        whole = "—" if r["fit_seconds_in_all"] is None else f"{r['fit_seconds_in_all']:.0f}"
        test = "not measured" if r["test_acc_last_ckpt"] is None else f"{r['test_acc_last_ckpt']:.4f}"
        lines.append(f"| {r['name']} | {r['target']:.3f} | {reached} | {seconds} | {r['epochs']} | {whole} | "
                     f"{r['val_acc_best']:.4f} / {r['val_acc_last']:.4f} | {test} |")
    machines = sorted({f"{r['machine']}; torch {r['torch']}, pytorch-lightning {r['lightning']}" for r in records})
    body = ["Commands:", "", *[f"- {r['name']}: `{r['command']}`" for r in records], "",
            f"Machine: {'; '.join(machines)}. Seconds to the target: the fit's clock at the end of that epoch "
            "(from the start of fitting: validation and compilation included, the process's start-up not); seconds "
            "of the fit: the whole `ssvae fit` process.", "",
            *lines]
    replace_marked_section(docs, f"time_to_accuracy {key}", "\n".join(body))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=float, default=None, help="the validation accuracy to reach, e.g. 0.95")
    parser.add_argument("--save-dir", default="lightning_logs/time_to_accuracy", help="where the runs go")
    parser.add_argument("--json", default=None, help="also write the record here")
    parser.add_argument("--name", default=None, help="the record's name in the rendered table (default: the first "
                        "config's name)")
    parser.add_argument("--render", nargs="+", default=None, metavar="JSON", help="render these records instead "
                        "of measuring (with --docs and --key)")
    parser.add_argument("--docs", default=None, metavar="MARKDOWN", help="the file --render writes into")
    parser.add_argument("--from-run", default=None, metavar="RUN", help="make the record from this run folder of an "
                        "earlier fit of the same arguments (one stopped before its test) instead of fitting; "
                        "--machine, --torch and --lightning then name where that fit ran")
    parser.add_argument("--machine", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--torch", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--lightning", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--key", default="gpu", help="the marked section's key (default: gpu)")
    parser.add_argument("fit", nargs=argparse.REMAINDER, help="-- then `ssvae fit`'s arguments")
    args = parser.parse_args(argv)
    if args.render:
        if not args.docs:
            parser.error("--render needs --docs MARKDOWN")
        render([json.loads(Path(name).read_text()) for name in args.render], Path(args.docs), args.key)
        print(f"rendered {len(args.render)} records into {args.docs}")
        return
    fit = args.fit[1:] if args.fit[:1] == ["--"] else args.fit
    if not fit:
        parser.error("give `ssvae fit`'s arguments after --, e.g. -- -c configs/mnist/m2.yaml")
    if args.target is None or not 0 < args.target <= 1:
        parser.error(f"--target: an accuracy in (0, 1] is needed, got {args.target}")
    if args.from_run:
        record = summarise_run(Path(args.from_run), fit, args.target)
    else:
        record = measure(fit, args.target, Path(args.save_dir) / time.strftime("%Y%m%d-%H%M%S"))
    configs = [fit[i + 1] for i, arg in enumerate(fit[:-1]) if arg in ("-c", "--config")]
    name = args.name or (Path(configs[0]).stem if configs else "fit")
    command = ["--target", str(args.target), "--name", name, "--", *fit]  # what measures it (--from-run: measured)
    record.update(name=name, machine=args.machine or describe_machine(), torch=args.torch or torch.__version__,
                  lightning=args.lightning or pl.__version__,
                  command="python scripts/time_to_accuracy.py " + shlex.join(command))
    text = json.dumps(record, indent=1)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(Path(args.json), overwrite=True) as temporary:
            temporary.write_text(text)


if __name__ == "__main__":
    main()
