"""scripts/active_learning.py end to end on the synthetic MNIST, tiny networks and one-batch epochs: round 0 on 20
random labels, then `ssvae suggest --suggest.strategy random`'s picks for 50 and 100 labels (the other strategies
are the same commands: tests/test_suggest.py); each round's labelled subset holds the last one's and the suggested
images; the table and plot; a rerun runs nothing."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from helpers.synthetic import write_synthetic_mnist

REPO = Path(__file__).resolve().parents[1]
TINY = ("--data.download false --data.check_md5 false --data.val_size 100 --data.batch_size 100 "
        "--trainer.limit_train_batches 1 --trainer.limit_val_batches 1 --trainer.num_sanity_val_steps 0 "
        "--trainer.enable_model_summary false --model.init_args.hidden_dims [16] --model.init_args.latent_dim 4")


def script(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "scripts" / "active_learning.py"), "--datasets", "mnist",
                           "--seeds", "0", "--strategies", "random", "--epochs", "1", "--vae-epochs", "1",
                           "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
                           "--ssvae-args", TINY, "--m1m2-args", "--model.init_args.m1_active_threshold 0", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_rounds_of_suggested_and_random_labels_then_the_table(tmp_path: Path) -> None:
    write_synthetic_mnist(tmp_path / "data")
    docs = tmp_path / "results.md"
    first = script(tmp_path, "--docs", str(docs))
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    out = tmp_path / "out"
    records = json.loads((out / "records.json").read_text())
    for strategy in ("random",):
        before = json.loads((out / "m1m2" / "mnist-s0-n20" / "labelled_indices.json").read_text())["labelled_indices"]
        for n in (50, 100):
            version = f"mnist-s0-{strategy}-n{n}"
            now = json.loads((out / "m1m2" / version / "labelled_indices.json").read_text())["labelled_indices"]
            asked = [int(row["index"]) for row in csv.DictReader((out / "suggested" / f"{version}.csv").open())]
            assert len(now) == n and set(before) < set(now) and set(now) - set(before) == set(asked)
            assert 0 <= records[f"{version}-test"]["test_acc"] <= 1
            before = now
    assert "| MNIST | random |" in first.stdout
    assert "<!-- active_learning -->" in docs.read_text() and (tmp_path / "runs" / "active_learning.png").is_file()
    again = script(tmp_path)
    assert again.returncode == 0 and " s" not in "".join(line for line in again.stdout.splitlines()
                                                         if line.startswith("mnist-"))  # all recorded: nothing ran


def test_the_verdict_pairs_each_strategy_with_random_seed_by_seed() -> None:
    """Below random means a lower mean test error than random's over the seeds both ran, counted seed by seed; where
    none is below, the verdict says so and names the closest."""
    spec = importlib.util.spec_from_file_location("active_learning", REPO / "scripts" / "active_learning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    errors = {("random", 0): 10.0, ("random", 1): 8.0, ("margin", 0): 9.0, ("margin", 1): 8.5, ("bound", 0): 12.0,
              ("bound", 1): 11.0, ("bound", 2): 1.0}  # bound's seed 2 has no random to pair with: left out
    records = {f"mnist-s{seed}-{strategy}-n{n}-test": {"test_acc": 1 - (err + (n == 100)) / 100}
               for (strategy, seed), err in errors.items() for n in (50, 100)}
    records["mnist-s0-margin-n100-test"] = {"test_acc": 1 - 12 / 100}
    text = module.verdict(records, ["mnist"], [0, 1, 2], ["random", "margin", "bound"])
    assert text.splitlines() == [
        "- MNIST, 50 labels: below random: margin -0.25 (lower in 1 of 2 seeds).",
        "- MNIST, 100 labels: no strategy below random; closest: margin +0.75 (lower in 0 of 2 seeds)."]
