"""Two-process DDP on the CPU (gloo) through the ``ssvae`` entry point: disjoint unlabelled shards, the same labelled
subset on both ranks, and a test accuracy reduced over the ranks equal to the single-process one."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from test_cli import COMMAND, REPO, cli_data, data_args, ok  # noqa: F401 (cli_data is a fixture)

M2_CONFIG = str(REPO / "configs" / "mnist" / "m2.yaml")
TINY_M2 = ["--model.init_args.hidden_dims", "[16]", "--model.init_args.classifier_hidden_dims", "[16]",
           "--model.init_args.latent_dim", "4"]


def ssvae_probed(cwd: Path, probe_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SSVAE_PROBE_DIR": str(probe_dir),
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([*COMMAND, *args, "--trainer.callbacks+=helpers.ddp_probe.ShardProbe"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_two_process_ddp_shards_the_unlabelled_images_and_reduces_test_metrics(tmp_path: Path, cli_data) -> None:
    probe = tmp_path / "probe"
    probe.mkdir()
    common = [*data_args(cli_data), "--data.binarize", "none", "--data.batch_size", "50",
              "--data.labelled_batch_size", "20", "--trainer.accelerator", "cpu"]
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    ok(ssvae_probed(tmp_path, probe, "fit", "-c", M2_CONFIG, *TINY_M2, *common, *ddp, "--trainer.max_epochs", "1",
                    "--trainer.limit_val_batches", "1", "--trainer.logger.init_args.version", "ddp"))  # ends at max_epochs

    ranks = [json.loads((probe / f"train_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    shards = [set(r["unlabelled"]) for r in ranks]
    assert all(len(r["unlabelled"]) == len(s) == 250 for r, s in zip(ranks, shards))  # 500 images, 5 batches each
    assert not shards[0] & shards[1]  # disjoint, and together every unlabelled image once
    assert ranks[0]["labelled_indices"] == ranks[1]["labelled_indices"]
    labelled = [set(r["labelled"]) for r in ranks]
    assert len(labelled[0]) == len(labelled[1]) == 100 and labelled[0] == labelled[1]  # whole subset on each rank

    ckpt = tmp_path / "lightning_logs" / "m2" / "ddp" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    for devices in (["--trainer.devices", "1"], ddp):
        ok(ssvae_probed(tmp_path, probe, "test", "-c", M2_CONFIG, *TINY_M2, *common, *devices,
                        "--trainer.logger", "false", "--ckpt_path", str(ckpt)))
    one, two = (json.loads((probe / f"test_world{w}.json").read_text()) for w in (1, 2))
    assert one["test/acc"] == pytest.approx(two["test/acc"], abs=1e-6)  # torchmetrics reduces over the ranks

    exits = exit_records(probe, 5)  # the DDP fit's two ranks, the one-process test, the DDP test's two ranks
    assert not [n for n, e in exits.items() if e["process_group_alive"]], exits  # destroyed: no gloo abort at exit


def exit_records(probe: Path, count: int, wait_s: float = 60) -> dict[str, dict]:
    """The probe's exit records, once there are ``count`` of them: rank 0 does not wait for its launched ranks."""
    deadline = time.monotonic() + wait_s
    while len(files := sorted(probe.glob("exit_*.json"))) < count and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(files) == count, [f.name for f in files]
    return {f.name: json.loads(f.read_text()) for f in files}
