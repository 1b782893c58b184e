"""scripts/time_to_accuracy.py: a fit's first epoch at a target validation accuracy and its seconds until then, the
test accuracy of last.ckpt, the JSON record and its rendered table (end to end on the synthetic MNIST)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from test_cli import cli_data, data_args  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def script_module():
    """scripts/time_to_accuracy.py as a module of this process."""
    if str(REPO / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO / "scripts"))
    import time_to_accuracy

    return time_to_accuracy
TINY_M2 = ["--model.init_args.hidden_dims", "[16]", "--model.init_args.classifier_hidden_dims", "[16]",
           "--model.init_args.latent_dim", "3"]


def test_time_to_accuracy_finds_the_first_epoch_at_the_target_and_tests_last_ckpt(tmp_path: Path,
                                                                                   cli_data: Path) -> None:
    record_file, docs = tmp_path / "m2.json", tmp_path / "results.md"
    docs.write_text("# Results\n")
    fit = ["-c", "configs/mnist/m2.yaml", *data_args(cli_data), *TINY_M2, "--trainer.max_epochs", "3",
           "--trainer.limit_train_batches", "3"]
    done = subprocess.run([sys.executable, "scripts/time_to_accuracy.py", "--target", "0.01", "--save-dir",
                           str(tmp_path / "runs"), "--json", str(record_file), "--", *fit],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(record_file.read_text())
    assert record["epochs"] == 3 and record["epoch_reached"] == 1  # any accuracy reaches 1%
    assert 0 < record["seconds_to_target"] <= record["fit_seconds_at_last_epoch"] < record["fit_seconds_in_all"]
    assert 0 <= record["test_acc_last_ckpt"] <= 1 and record["name"] == "m2"
    assert record["command"].endswith(" -- " + shlex.join(fit))

    script = script_module()  # the rest in this process: the fit is done, and its own timing with it
    script.main(["--target", "1.0", "--from-run", record["run"], "--json", str(tmp_path / "never.json"), "--", *fit])
    never = json.loads((tmp_path / "never.json").read_text())
    assert never["epoch_reached"] is None and never["test_acc_last_ckpt"] == record["test_acc_last_ckpt"]

    script.main(["--render", str(record_file), str(tmp_path / "never.json"), "--docs", str(docs), "--key", "test"])
    text = docs.read_text()
    assert "<!-- time_to_accuracy test -->" in text and "| m2 | 0.010 | 1 |" in text and "not reached" in text
