"""The Table 1 sweep on a real one-node SLURM (scripts/cluster/local_cluster.sh): ``--profile tiny --cluster slurm``
submits every stage at once, each held until the fits it reads have ended well; the jobs write the records; a failed
stage's readers are cancelled, named, and submitted again by the next run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from helpers.synthetic import write_synthetic_mnist

REPO = Path(__file__).resolve().parents[2]
SCRIPT = str(REPO / "scripts" / "reproduce_table1.py")
SYNTHETIC = ("--data.download false --data.check_md5 false --data.val_size 100 --data.batch_size 100 "
             "--data.eval_batch_size 200")  # the synthetic MNIST's 600 training images


def sweep(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, "--profile", "tiny", "--out", str(tmp_path / "out"),
                           "--data-dir", str(tmp_path / "data"), "--trainer-args", SYNTHETIC, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def queued() -> list[tuple[str, str, str]]:
    """(job id, state, reason) of every job SLURM holds."""
    shown = subprocess.run(["squeue", "-h", "-o", "%i %T %r"], capture_output=True, text=True).stdout
    return [tuple(line.split(maxsplit=2)) for line in shown.splitlines()]


def wait_until_empty(timeout: float = 480) -> None:
    deadline = time.monotonic() + timeout
    while queued():
        assert time.monotonic() < deadline, f"jobs still queued: {queued()}"
        time.sleep(1)


def test_the_tiny_sweep_runs_as_dependent_jobs_and_a_failed_stage_is_named_and_submitted_again(
        tmp_path: Path) -> None:
    write_synthetic_mnist(tmp_path / "data")
    broken = "m2=--model.init_args.no_such_setting 1"  # M2's fit stops at its config, so its test never runs
    first = sweep(tmp_path, "--cluster", "slurm", "--stage-args", broken)
    assert first.returncode == 0, first.stdout + first.stderr
    submitted = {line.split()[1]: line.split()[3] for line in first.stdout.splitlines() if " job " in line}
    assert list(submitted) == ["vae-seed0-fit", "m1-seed0-n100-fit", "m1-seed0-n100-test", "m2-seed0-n100-fit",
                               "m2-seed0-n100-test", "m1m2-seed0-n100-fit", "m1m2-seed0-n100-test"]
    held = {job: reason for job, state, reason in queued() if state == "PENDING"}
    assert held.get(submitted["m1-seed0-n100-test"]) == "Dependency"  # behind its fit, itself behind the VAE
    wait_until_empty()

    out = tmp_path / "out"
    records = json.loads((out / "results.json").read_text())
    assert sorted(records) == ["m1-seed0-n100-fit", "m1-seed0-n100-test", "m1m2-seed0-n100-fit",
                               "m1m2-seed0-n100-test", "vae-seed0-fit"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert {record["commit"] for record in records.values()} == {commit}
    assert all(isinstance(record["clean"], bool) for record in records.values())
    report = sweep(tmp_path, "--stage-args", broken, "--report")
    assert report.returncode == 0, report.stderr
    assert f"m2-seed0-n100-fit: job {submitted['m2-seed0-n100-fit']} ended without a record" in report.stdout
    assert f"m2-seed0-n100-test: job {submitted['m2-seed0-n100-test']} ended without a record" in report.stdout
    table = (out / "table1.md").read_text()
    assert "| M1 + classifier (paper: M1+TSVM) | " in table and "| M1+M2 | " in table and "| M2 |" not in table
    assert f"Code: {commit[:10]}" in table

    again = sweep(tmp_path, "--cluster", "slurm")  # M2 mended: only its two stages go out again
    assert again.returncode == 0, again.stdout + again.stderr
    assert "m2-seed0-n100-fit: job" in again.stdout and "submitted again" in again.stdout
    assert [line.split()[1] for line in again.stdout.splitlines() if " job " in line and line.startswith("[")] == \
        ["m2-seed0-n100-fit", "m2-seed0-n100-test"]
    wait_until_empty()
    assert sorted(json.loads((out / "results.json").read_text())) == sorted([*records, "m2-seed0-n100-fit",
                                                                             "m2-seed0-n100-test"])
