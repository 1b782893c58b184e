"""Run folders and files the product writes, through the ``ssvae`` command: ``--ckpt_path last`` continues the
newest run of a config in its own folder, ``last.ckpt`` is always the latest state, nothing is replaced or touched
without being asked, and every refusal is one ``ssvae: error:`` line (ssvae_pl/runs.py, files.py, cli.py)."""

from __future__ import annotations

import os
import shlex
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml

from test_cli import CLASSIFIER_CONFIG, TINY_VAE, VAE_CONFIG, assert_one_line_user_error, cli_data, data_args, ok  # noqa: F401
from helpers.cli import ssvae_here
from test_trust import M2_CONFIG, QUIET, TINY_M2, load, start, wait_for

SLOW_M2 = ["--model.class_path", "helpers.faulty_models.SlowM2", *TINY_M2, "--data.binarize", "dynamic",
           "--trainer.limit_val_batches", "1", *QUIET]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_ctrl_c_prints_the_command_that_continues_the_run_in_its_own_folder(tmp_path: Path, cli_data) -> None:
    """SIGINT mid-epoch: the message's command, run as printed, continues in the same version folder (one
    TensorBoard curve), and ``last.ckpt`` ends at the final step with no ``last-v1.ckpt`` beside it."""
    run = ["fit", "-c", M2_CONFIG, *data_args(cli_data), *SLOW_M2, "--trainer.max_epochs", "2",
           "--model.init_args.step_seconds", "0.3"]
    process = start(tmp_path, *run)
    folder = tmp_path / "lightning_logs" / "m2" / "version_0"
    wait_for(folder / "checkpoints" / "last.ckpt", process)  # epoch 0 (5 steps) is done
    time.sleep(0.8)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    line = next(line for line in stderr.splitlines() if line.startswith("ssvae: stopped by SIGINT"))
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[0] == "ssvae" and command[-2:] == ["--ckpt_path", "last"]
    assert 5 < load(folder / "checkpoints" / "last.ckpt")["global_step"] < 10

    ok(ssvae_here(tmp_path, *command[1:]))  # the printed command, run in this process
    assert sorted(p.name for p in (tmp_path / "lightning_logs" / "m2").iterdir()) == ["version_0"]
    finished = load(folder / "checkpoints" / "last.ckpt")
    assert (finished["epoch"], finished["global_step"]) == (1, 10)
    assert sorted(p.name for p in (folder / "checkpoints").glob("last*")) == ["last.ckpt"]


def test_ckpt_path_last_finds_the_newest_run_of_the_config_and_refuses_what_it_cannot_continue(
        tmp_path: Path, cli_data) -> None:
    """``--ckpt_path last`` without a version continues the newest run of the same config (another config's runs
    are not candidates); a fit into a folder that holds a run without ``--ckpt_path``, a resume whose last.ckpt
    is gone, and another config aimed at the folder are each one error, and the folder stays as it was."""
    data = data_args(cli_data)
    run = ["fit", "-c", VAE_CONFIG, *data, *TINY_VAE, *QUIET, "--trainer.max_epochs", "1",
           "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
    ok(ssvae_here(tmp_path, *run))  # version_0
    ok(ssvae_here(tmp_path, *run))  # version_1, the newest run of this config
    ok(ssvae_here(tmp_path, *run, "--model.init_args.latent_dim", "3"))  # version_2: another config
    parent = tmp_path / "lightning_logs" / "m1_vae"
    ok(ssvae_here(tmp_path, *run, "--trainer.max_epochs", "2", "--ckpt_path", "last"))
    assert load(parent / "version_1" / "checkpoints" / "last.ckpt")["epoch"] == 1
    assert load(parent / "version_0" / "checkpoints" / "last.ckpt")["epoch"] == 0
    assert load(parent / "version_2" / "checkpoints" / "last.ckpt")["epoch"] == 0
    assert sorted(p.name for p in parent.iterdir()) == ["version_0", "version_1", "version_2"]

    kept = snapshot(parent / "version_0")
    into_v0 = [*run, "--trainer.logger.init_args.version", "version_0"]
    assert_one_line_user_error(ssvae_here(tmp_path, *into_v0),
                               "already holds this run; continue it with --ckpt_path last")
    assert_one_line_user_error(ssvae_here(tmp_path, *into_v0, "--data.seed", "5", "--ckpt_path", "last"),
                               "another labelled subset (data.seed: 0 there, 5 here)")
    assert_one_line_user_error(ssvae_here(tmp_path, *into_v0, "--model.init_args.latent_dim", "5"),
                               "another config (model.init_args.latent_dim: 4 there, 5 here)")
    assert snapshot(parent / "version_0") == kept  # not even an events file
    (parent / "version_0" / "checkpoints" / "last.ckpt").unlink()
    assert_one_line_user_error(ssvae_here(tmp_path, *into_v0, "--ckpt_path", "last"), "last.ckpt does not exist")
    (parent / "version_0" / "config.yaml").write_text("model: [unclosed\n")
    assert_one_line_user_error(ssvae_here(tmp_path, *into_v0, "--ckpt_path", "last"), "config.yaml cannot be read")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert_one_line_user_error(ssvae_here(elsewhere, *run, "--ckpt_path", "last"), "no run of this config")


def test_a_lower_learning_rate_on_resume_is_used_and_recorded(tmp_path: Path, cli_data) -> None:
    """Changing the optimiser's arguments on resume is allowed: the resumed run trains with the new rate (not the
    one restored from the checkpoint), and the change is recorded in the run folder."""
    run = ["fit", "-c", VAE_CONFIG, *data_args(cli_data), *TINY_VAE, *QUIET, "--trainer.limit_train_batches", "2",
           "--trainer.limit_val_batches", "1"]
    ok(ssvae_here(tmp_path, *run, "--trainer.max_epochs", "1"))
    folder = tmp_path / "lightning_logs" / "m1_vae" / "version_0"
    lr = load(folder / "checkpoints" / "last.ckpt")["optimizer_states"][0]["param_groups"][0]["lr"]
    ok(ssvae_here(tmp_path, *run, "--trainer.max_epochs", "2", "--ckpt_path", "last", "--optimizer.init_args.lr",
             str(lr / 10)))
    resumed = load(folder / "checkpoints" / "last.ckpt")
    assert resumed["epoch"] == 1 and resumed["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(lr / 10)
    record = yaml.safe_load((folder / "config.resume-1.yaml").read_text())
    assert record["optimizer"]["init_args"]["lr"] == pytest.approx(lr / 10) and record["trainer"]["max_epochs"] == 2
    assert yaml.safe_load((folder / "config.yaml").read_text())["optimizer"]["init_args"]["lr"] == lr


def test_test_and_predict_create_no_run_folder_and_predict_replaces_nothing(tmp_path: Path, cli_data) -> None:
    """``test`` logs into the checkpoint's own run folder, ``predict`` nowhere; a checkpoint of another model class
    than the config's is refused; ``predict`` does not replace an existing CSV unless asked to."""
    data = data_args(cli_data)
    ok(ssvae_here(tmp_path, "fit", "-c", M2_CONFIG, *data, *TINY_M2, *QUIET, "--trainer.max_epochs", "1",
             "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"))
    logs = tmp_path / "lightning_logs"
    m2_ckpt = logs / "m2" / "version_0" / "checkpoints" / "last.ckpt"
    record = (logs / "m2" / "version_0" / "labelled_indices.json").read_bytes()
    ok(ssvae_here(tmp_path, "test", "-c", M2_CONFIG, *data, "--ckpt_path", str(m2_ckpt), "--data.seed", "3"))
    assert (logs / "m2" / "version_0" / "labelled_indices.json").read_bytes() == record  # the fit's, untouched
    csv = tmp_path / "out.csv"
    csv.write_text("earlier\n")
    predict = ["predict", "-c", M2_CONFIG, *data, "--ckpt_path", str(m2_ckpt), "--predictions.output", str(csv)]
    assert_one_line_user_error(ssvae_here(tmp_path, *predict), "--predictions.overwrite true")
    assert csv.read_text() == "earlier\n"
    ok(ssvae_here(tmp_path, *predict, "--predictions.overwrite", "true"))
    assert csv.read_text().startswith("file,label,predicted")
    assert sorted(str(p.relative_to(logs)) for p in logs.glob("*/*")) == ["m2/version_0"]

    for command, config in (("fit", VAE_CONFIG), ("test", VAE_CONFIG), ("predict", CLASSIFIER_CONFIG)):
        result = ssvae_here(tmp_path, command, "-c", config, *data, "--ckpt_path", str(m2_ckpt))
        assert_one_line_user_error(result, "holds a M2 (ssvae_pl.models.M2), but the config's model is")
    assert sorted(str(p.relative_to(logs)) for p in logs.glob("*/*")) == ["m2/version_0"]


def test_two_fits_into_one_folder_the_second_is_refused(tmp_path: Path, cli_data) -> None:
    """A fit holds a lock on its run folder: a second one aimed at it stops with one line, and the first ends
    normally with its checkpoints whole."""
    run = ["fit", "-c", M2_CONFIG, *data_args(cli_data), *SLOW_M2, "--trainer.max_epochs", "1",
           "--model.init_args.step_seconds", "1.5", "--trainer.limit_train_batches", "3",
           "--trainer.logger.init_args.version", "shared"]
    first = start(tmp_path, *run)
    wait_for(tmp_path / "lightning_logs" / "m2" / "shared" / "config.yaml", first)
    second = ssvae_here(tmp_path, *run, "--ckpt_path", "last")  # beside the other process
    assert_one_line_user_error(second, "is in use by another ssvae fit")
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr[-3000:]
    assert load(tmp_path / "lightning_logs" / "m2" / "shared" / "checkpoints" / "last.ckpt")["global_step"] == 3


def test_bad_settings_are_one_line_each(tmp_path: Path, cli_data) -> None:
    """Parser errors (an unknown key, a YAML syntax error), a Trainer setting Lightning rejects, and a labelled
    batch larger than the labelled subset: one ``ssvae: error:`` line each, no usage dump, no traceback."""
    data = data_args(cli_data)
    assert_one_line_user_error(ssvae_here(tmp_path, "fit", "-c", VAE_CONFIG, *data, "--trainer.max_stepz", "5"),
                               "--trainer.max_stepz")
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer:\n  max_epochs: [1\n")
    assert_one_line_user_error(ssvae_here(tmp_path, "fit", "-c", VAE_CONFIG, "-c", str(broken)), str(broken))
    assert_one_line_user_error(ssvae_here(tmp_path, "fit", "-c", VAE_CONFIG, *data, "--trainer.max_steps", "-5"),
                               "max_steps")
    result = ssvae_here(tmp_path, "fit", "-c", M2_CONFIG, *data, *TINY_M2, "--data.labelled_batch_size", "500")
    assert_one_line_user_error(result, "data.labelled_batch_size=500 exceeds the 100 labelled")


def test_a_live_process_keeps_its_temporary_checkpoint(tmp_path: Path) -> None:
    """Stale temporary files of killed writers are removed; a running process's file is not."""
    from ssvae_pl.checkpoint_io import AtomicCheckpointIO

    path = tmp_path / "last.ckpt"
    live = tmp_path / f".last.ckpt.{os.getppid()}.abcd.tmp"
    dead = tmp_path / ".last.ckpt.2147483646.abcd.tmp"
    for file in (live, dead):
        file.write_bytes(b"partial")
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(1)}}, path)
    assert live.exists() and not dead.exists() and load(path)["state_dict"]["w"].shape == (1,)
