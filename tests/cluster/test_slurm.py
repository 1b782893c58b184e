"""The DDP job and SLURM's pre-emption on a real one-node cluster (scripts/cluster/local_cluster.sh): the shipped
``slurm_ddp.sbatch`` with CPU settings, 2 tasks through ``srun``, Lightning reading SLURM's variables."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from helpers.synthetic import write_synthetic_mnist

REPO = Path(__file__).resolve().parents[2]
SBATCH = str(REPO / "scripts" / "cluster" / "slurm_ddp.sbatch")
TINY = ["--model.init_args.hidden_dims", "[32]", "--model.init_args.classifier_hidden_dims", "[32]",
        "--model.init_args.latent_dim", "3"]
CPU_TASKS = ["--nodes", "1", "--ntasks-per-node", "2", "--cpus-per-task", "1", "--gres", "none"]


def data(root: Path) -> list[str]:
    return ["--data.data_dir", str(root), "--data.download", "false", "--data.check_md5", "false",
            "--data.val_size", "100", "--data.batch_size", "50", "--data.labelled_batch_size", "20",
            "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "1"]


def submit(tmp_path: Path, extra: list[str], *sbatch: str, test: bool = False) -> str:
    """``sbatch`` of the shipped script with CPU settings; the job id."""
    env = {**os.environ, "CONFIG": "configs/mnist/m2.yaml", "LOGS": str(tmp_path / "logs"), "ACCELERATOR": "cpu",
           "SSVAE": str(Path(sys.executable).parent / "ssvae"), "TEST": "1" if test else "0",
           "EXTRA": " ".join(extra), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(["sbatch", "--parsable", *CPU_TASKS, "--time", "15", "--output",
                           str(tmp_path / "slurm-%j.out"), *sbatch, SBATCH], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def wait_until_gone(job: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, f"job {job} still queued or running"
        time.sleep(1)


def job_field(job: str, field: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    match = re.search(rf"\b{field}=(\S+)", shown)
    return match.group(1) if match else ""


def accuracy_in(text: str) -> float:
    return float(re.search(r"test/acc\s+([0-9.]+)", text).group(1))


def test_the_ddp_job_ends_at_max_epochs_in_one_run_folder_and_tests_as_one_process(tmp_path: Path) -> None:
    write_synthetic_mnist(tmp_path / "data")
    extra = [*data(tmp_path / "data"), *TINY, "--trainer.max_epochs", "3"]
    job = submit(tmp_path, extra, test=True)
    wait_until_gone(job)
    assert job_field(job, "ExitCode") == "0:0" and job_field(job, "JobState") == "COMPLETED"
    output = (tmp_path / f"slurm-{job}.out").read_text()
    assert "Starting with 2 processes" in output and "Traceback" not in output
    runs = sorted(p.name for p in (tmp_path / "logs" / "m2").iterdir())
    assert runs == [f"slurm-{job}"]
    ckpt = tmp_path / "logs" / "m2" / f"slurm-{job}" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"] == 2
    alone = subprocess.run([str(Path(sys.executable).parent / "ssvae"), "test", "-c", "configs/mnist/m2.yaml",
                            *extra, "--trainer.logger", "false", "--ckpt_path", str(ckpt)], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert accuracy_in(output) == accuracy_in(alone.stdout)  # two ranks reduce to the one process's accuracy


def saved_step(run: Path) -> int:
    path = run / "checkpoints" / "last.ckpt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["global_step"]
    except (OSError, RuntimeError, EOFError):
        return -1


def wait_for(condition, job: str, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not after {timeout} s (job {job_field(job, 'JobState')})"
        time.sleep(0.5)


def test_preemption_saves_requeues_and_continues_the_same_run_twice(tmp_path: Path) -> None:
    """USR1 to the batch shell mid-epoch (as SLURM's --signal does before a time limit): the job saves, is requeued
    and continues in the same run folder and TensorBoard curve to the final step; a second signal during the resumed
    run works the same."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_synthetic_mnist(tmp_path / "data")
    extra = [*data(tmp_path / "data"), *TINY, "--trainer.max_epochs", "4", "--model.class_path",
             "helpers.faulty_models.SlowM2", "--model.init_args.step_seconds", "0.4"]
    job = submit(tmp_path, extra)
    run = tmp_path / "logs" / "m2" / f"slurm-{job}"
    step = 0
    for restarts in (1, 2):  # each time: the (resumed) run has saved a step past the last signal's
        wait_for(lambda: job_field(job, "JobState") == "RUNNING" and saved_step(run) > step, job, "a new epoch")
        time.sleep(1.0)  # mid-epoch
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
        wait_for(lambda: job_field(job, "Restarts") == str(restarts), job, "requeued")
        wait_for(lambda: job_field(job, "JobState") == "PENDING", job, "the old run gone")
        step = saved_step(run)
        # SLURM holds a requeued job for two minutes; here it may start at once
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
        assert step > 0
    wait_until_gone(job)
    assert job_field(job, "JobState") == "COMPLETED" and job_field(job, "ExitCode") == "0:0"
    assert sorted(p.name for p in (tmp_path / "logs" / "m2").iterdir()) == [run.name]
    final = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    steps_per_epoch = 500 // 2 // 50
    assert (final["epoch"], final["global_step"]) == (3, 4 * steps_per_epoch)
    curve = {}  # one TensorBoard curve: every epoch's training loss, from the events of all three starts
    for events in run.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events)).Reload()
        for scalar in accumulator.Scalars("epoch") if "epoch" in accumulator.Tags()["scalars"] else []:
            curve[scalar.step] = scalar.value
    assert len(list(run.glob("events.out.tfevents.*"))) == 3
    # every epoch once, in order; each resumption from a mid-epoch hpc checkpoint shifts the logged step by one
    # (Lightning's restored step counter), so the last epoch ends at step 19 + 2
    epochs = [curve[step] for step in sorted(curve)]
    assert epochs == [0, 1, 2, 3] and 4 * steps_per_epoch - 1 <= max(curve) <= 4 * steps_per_epoch + 1
