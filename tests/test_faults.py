"""Fault injection through the ``ssvae`` command: signals at random moments (checkpoint writes included), a full
disk, a read-only folder, and DDP runs on 2 and 3 CPU processes that end at an epoch boundary, mid-epoch and by
SIGTERM. After each fault: every checkpoint on disk loads, ``--ckpt_path last`` resumes from the newest state in
the same run folder, and nothing written before was lost or replaced. A summary line is printed (``pytest -s``)."""

from __future__ import annotations

import random
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers.cli import ssvae_here
from test_cli import assert_one_line_user_error, cli_data, data_args, ok  # noqa: F401
from test_trust import M2_CONFIG, QUIET, TINY_M2, load, ssvae, start, wait_for

EPOCHS, STEPS = 3, 5  # 500 unlabelled images in batches of 100
SLOW = ["--model.class_path", "helpers.faulty_models.SlowM2", *TINY_M2, "--data.binarize", "dynamic",
        "--trainer.limit_val_batches", "1", *QUIET, "--trainer.max_epochs", str(EPOCHS),
        "--model.init_args.step_seconds", "0.15", "--trainer.plugins", "helpers.faulty_models.SlowCheckpointIO"]
SUMMARY = {"faults": 0, "resumed": 0, "checkpoints": 0}


def check_checkpoints(folder: Path) -> int:
    """Every checkpoint in the run folder loads; returns how many."""
    files = sorted((folder / "checkpoints").glob("*.ckpt"))
    for file in files:
        assert "state_dict" in load(file), file
    SUMMARY["checkpoints"] += len(files)
    return len(files)


def resume_and_finish(cwd: Path, folder: Path, command: list[str], before: dict[str, bytes]) -> None:
    ok(ssvae_here(cwd, *command))  # the resume needs no signal: in this process
    SUMMARY["resumed"] += 1
    finished = load(folder / "checkpoints" / "last.ckpt")
    assert (finished["epoch"], finished["global_step"]) == (EPOCHS - 1, EPOCHS * STEPS)
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # the same run folder
    for name, content in before.items():  # what defines the run is never rewritten
        assert (folder / name).read_bytes() == content, name
    check_checkpoints(folder)


@pytest.mark.parametrize("kill", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_signals_at_random_moments_lose_nothing(tmp_path: Path, cli_data, kill: str) -> None:
    """A run per signal, hit at a random moment after its first checkpoint (writes take 0.5 s, so some hits land
    inside one), resumed with ``--ckpt_path last``: it finishes where it would have."""
    rng = random.Random(f"faults-{kill}")
    for attempt in range(1):
        cwd = tmp_path / str(attempt)
        cwd.mkdir()
        run = ["fit", "-c", M2_CONFIG, *data_args(cli_data), *SLOW]
        process = start(cwd, *run)
        folder = cwd / "lightning_logs" / "m2" / "version_0"
        wait_for(folder / "checkpoints" / "last.ckpt", process)
        before = {name: (folder / name).read_bytes() for name in ("config.yaml", "labelled_indices.json")}
        time.sleep(rng.uniform(0.0, 2.5))
        process.send_signal(getattr(signal, kill))
        _, stderr = process.communicate(timeout=120)
        SUMMARY["faults"] += 1
        assert "Traceback" not in stderr, stderr[-3000:]
        check_checkpoints(folder)
        command = [*run, "--ckpt_path", "last"]
        if process.returncode in (130, 143):  # the message names the command that continues the run
            line = next(line for line in stderr.splitlines() if line.startswith("ssvae: stopped by"))
            command = shlex.split(line.split("resume with: ", 1)[1])[1:]
        else:
            assert process.returncode in (0, -signal.SIGKILL), stderr[-3000:]
        resume_and_finish(cwd, folder, command, before)
    print(f"\nfault injection ({kill}): {SUMMARY}")


def mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path):
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "size=4m"):
        pytest.skip("mounting a tmpfs needs root (or CAP_SYS_ADMIN) here")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path: Path, cli_data, small_disk: Path) -> None:
    """A run whose disk fills up stops with one line naming the file it was writing; its last.ckpt still loads and
    the run resumes once there is room."""
    run = ["fit", "-c", M2_CONFIG, *data_args(cli_data), *TINY_M2, *QUIET, "--trainer.limit_val_batches", "1",
           "--trainer.logger.init_args.save_dir", str(small_disk)]
    ok(ssvae_here(tmp_path, *run, "--trainer.max_epochs", "1"))
    folder = small_disk / "m2" / "version_0"
    kept = load(folder / "checkpoints" / "last.ckpt")
    filler = small_disk / "filler"
    with open(filler, "wb") as file:  # fill the disk
        try:
            while True:
                file.write(b"\0" * 65536)
                file.flush()
        except OSError:
            pass
    full = ssvae_here(tmp_path, *run, "--trainer.max_epochs", "3", "--ckpt_path", "last")
    SUMMARY["faults"] += 1
    assert_one_line_user_error(full, "No space left on device")
    assert check_checkpoints(folder) >= 1
    assert load(folder / "checkpoints" / "last.ckpt")["global_step"] == kept["global_step"]
    filler.unlink()
    ok(ssvae_here(tmp_path, *run, "--trainer.max_epochs", "2", "--ckpt_path", "last"))
    SUMMARY["resumed"] += 1
    assert load(folder / "checkpoints" / "last.ckpt")["epoch"] == 1


def test_a_read_only_folder_is_one_line(tmp_path: Path, cli_data) -> None:
    """A fit, an export and a prediction aimed at a read-only filesystem: one line each, naming the path."""
    read_only = tmp_path / "read_only"
    if not mount_tmpfs(read_only, "ro,size=1m"):
        pytest.skip("mounting a tmpfs needs root (or CAP_SYS_ADMIN) here")
    try:
        data = data_args(cli_data)
        fit = ["fit", "-c", M2_CONFIG, *data, *TINY_M2, *QUIET, "--trainer.max_epochs", "1",
               "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
        assert_one_line_user_error(ssvae_here(tmp_path, *fit, "--trainer.logger.init_args.save_dir", str(read_only)),
                                   str(read_only))
        ok(ssvae_here(tmp_path, *fit))
        ckpt = tmp_path / "lightning_logs" / "m2" / "version_0" / "checkpoints" / "last.ckpt"
        export = ssvae_here(tmp_path, "export", "--ckpt_path", str(ckpt), "--output_dir", str(read_only / "out"))
        assert_one_line_user_error(export, str(read_only))
        predict = ssvae_here(tmp_path, "predict", "-c", M2_CONFIG, *data, "--ckpt_path", str(ckpt),
                        "--predictions.output", str(read_only / "p.csv"))
        assert_one_line_user_error(predict, str(read_only))
        SUMMARY["faults"] += 3
    finally:
        subprocess.run(["umount", "-l", str(read_only)], capture_output=True)


@pytest.mark.parametrize("processes", [2, 3])
def test_ddp_runs_end_cleanly_at_an_epoch_boundary_mid_epoch_and_by_sigterm(tmp_path: Path, cli_data,
                                                                            processes: int) -> None:
    """CPU DDP (gloo) with 2 and 3 processes: a fit stopped by SIGTERM exits 143 with checkpoints that load, and
    its resumption in the same folder ends cleanly mid-epoch (max_steps, 2 processes) or at max_epochs (3)."""
    common = ["fit", "-c", M2_CONFIG, *data_args(cli_data), *TINY_M2, *QUIET, "--data.batch_size", "50",
              "--data.labelled_batch_size", "20", "--trainer.accelerator", "cpu", "--trainer.devices",
              str(processes), "--trainer.strategy", "ddp", "--trainer.limit_val_batches", "1"]
    parent = tmp_path / "lightning_logs" / "m2"
    slow = [*common, "--model.class_path", "helpers.faulty_models.SlowM2", "--model.init_args.step_seconds", "0.3",
            "--trainer.max_epochs", "3", "--trainer.logger.init_args.version", "term"]
    process = start(tmp_path, *slow)
    wait_for(parent / "term" / "checkpoints" / "last.ckpt", process)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=180)
    SUMMARY["faults"] += 1
    assert process.returncode == 143 and "Traceback" not in stderr, stderr[-3000:]
    check_checkpoints(parent / "term")
    steps = 500 // processes // 50  # unlabelled batches per rank and epoch
    # 2 processes: to a step mid-way through the third epoch; 3: to max_epochs (the 2-process one is
    # tests/test_distributed.py's)
    ends = {2: ["--trainer.max_steps", str(2 * steps + 2)], 3: []}[processes]
    ok(ssvae(tmp_path, *slow, *ends, "--ckpt_path", "last"))
    SUMMARY["resumed"] += 1
    expected = 2 * steps + 2 if processes == 2 else 3 * steps
    assert load(parent / "term" / "checkpoints" / "last.ckpt")["global_step"] == expected
    check_checkpoints(parent / "term")
    print(f"\nfault injection (DDP x{processes}): {SUMMARY}")
