"""Issue 6, "Trust it": numerical faults (NonFiniteGuard), checkpoints that survive a kill (AtomicCheckpointIO,
SaveOnInterrupt), exact resumes (EpochShuffle, the data module's state, SeedEachEpoch) and determinism, through
the objects themselves and through the ``ssvae`` command (subprocesses on the synthetic MNIST, tiny models)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers.cli import ssvae_here
from helpers.trainers import quiet_trainer
from ssvae_pl.callbacks import NonFiniteGuard
from ssvae_pl.checkpoint_io import AtomicCheckpointIO
from ssvae_pl.errors import ConfigError, NumericalError
from test_cli import COMMAND, REPO, VAE_CONFIG, assert_one_line_user_error, cli_data, data_args, ok  # noqa: F401

TESTS = Path(__file__).resolve().parent
M2_CONFIG = str(REPO / "configs" / "mnist" / "m2.yaml")
TINY_M2 = ["--model.init_args.hidden_dims", "[16]", "--model.init_args.classifier_hidden_dims", "[16]",
           "--model.init_args.latent_dim", "3"]
QUIET = ["--trainer.enable_model_summary", "false"]


def run_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}


def ssvae(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``ssvae`` with this folder on PYTHONPATH, so that configs may name ``helpers.faulty_models.*``."""
    return subprocess.run([*COMMAND, *args], cwd=cwd, env=run_env(), capture_output=True, text=True, timeout=timeout)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


# ---- 1. numerical faults -------------------------------------------------------------------------------------------


def nan_vae(**kwargs):
    from helpers.faulty_models import NaNVAE

    torch.manual_seed(0)
    return NaNVAE(hidden_dims=[16], latent_dim=3, **kwargs)


def test_skip_drops_exactly_the_non_finite_steps(make_dm) -> None:
    """action=skip: a NaN loss (steps 1, 2) and an infinite gradient (step 4) are skipped, counted and logged; the
    optimiser never sees them (Adam took 6 - 3 steps), and the weights stay finite."""
    from helpers.faulty_models import NaNVAE

    for nan_in, steps in (("loss", [1, 2]), ("grad", [4])):
        torch.manual_seed(0)
        model = NaNVAE(hidden_dims=[16], latent_dim=3, nan_steps=steps, nan_in=nan_in)
        guard = NonFiniteGuard(action="skip")
        trainer = quiet_trainer(max_steps=6, limit_val_batches=0, callbacks=[guard])
        with pytest.warns(UserWarning, match="NonFiniteGuard: skipped global step"):
            trainer.fit(model, datamodule=make_dm())
        assert trainer.global_step == 6 and guard.skipped == len(steps)
        assert float(trainer.logged_metrics["train/skipped_steps"]) == len(steps)
        assert finite(model.state_dict())
        adam = trainer.optimizers[0].state_dict()["state"]
        assert {float(s["step"]) for s in adam.values()} == {6.0 - len(steps)}


def test_skip_stops_after_max_skips_in_a_row(make_dm) -> None:
    torch.manual_seed(0)
    model = nan_vae(nan_steps=range(2, 100))
    trainer = quiet_trainer(max_steps=10, limit_val_batches=0, callbacks=[NonFiniteGuard(action="skip", max_skips=2)])
    with pytest.warns(UserWarning), pytest.raises(NumericalError, match=r"global step 4 .*after 2 skipped in a row"):
        trainer.fit(model, datamodule=make_dm())
    assert finite(model.state_dict())


def test_stop_names_the_parameter_of_a_non_finite_gradient(make_dm) -> None:
    model = nan_vae(nan_steps=[2], nan_in="grad")
    trainer = quiet_trainer(max_steps=5, limit_val_batches=0, callbacks=[NonFiniteGuard()])
    with pytest.raises(NumericalError, match=r"gradient of decoder\.net\.0\.weight \(inf\) at global step 2 \(epoch 0"):
        trainer.fit(model, datamodule=make_dm())
    assert finite(model.state_dict())  # the step was never taken


@pytest.mark.parametrize("nan_in, step, what", [("grad", 2, r"gradient of decoder\.net\.0\.weight \(inf\)"),
                                                ("loss", 3, r"training loss \(nan\)")])
def test_a_deferred_verdict_names_the_bad_step_one_step_later(make_dm, nan_in: str, step: int, what: str) -> None:
    """deferred (a GPU's default with stop): the host never waits for a step's verdict; it reads it at the next
    step and stops there, naming the bad step and what was not finite."""
    model = nan_vae(nan_steps=[step], nan_in=nan_in)
    guard = NonFiniteGuard(deferred=True)
    trainer = quiet_trainer(max_steps=8, limit_val_batches=0, callbacks=[guard])
    with pytest.raises(NumericalError, match=rf"{what} at global step {step} \(epoch 0, batch {step}\); the run "
                                             "stopped before writing anything"):
        trainer.fit(model, datamodule=make_dm())
    assert trainer.global_step == step + 1  # the bad step was taken, the next one found it


def test_a_deferred_verdict_is_read_before_a_checkpoint_and_at_the_end(make_dm, tmp_path: Path) -> None:
    model = nan_vae(nan_steps=[1], nan_in="grad")
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[NonFiniteGuard(deferred=True)])
    with pytest.raises(NumericalError, match="global step 1"):  # the last step: read when fitting ends
        trainer.fit(model, datamodule=make_dm())
    model, guard = nan_vae(), NonFiniteGuard(deferred=True)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[guard])
    trainer.fit(model, datamodule=make_dm())  # finite throughout: nothing to say
    guard._defer(trainer, model, torch.tensor([float("nan")]), 1, [])  # a bad step not read yet
    with pytest.raises(NumericalError, match=r"training loss \(nan\) at global step 2"):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()


def test_a_signal_after_the_last_epoch_writes_nothing_and_marks_the_run_finished(make_dm, monkeypatch) -> None:
    """SaveOnInterrupt: a SIGTERM or Ctrl-C that stops the fit after its last epoch (in the moments before ``fit``
    returns) writes no checkpoint of that after-training state (last.ckpt keeps the run as its last epoch saved it,
    as without the signal) and marks the stop finished, which ``ssvae`` reports as a complete run (exit 0)."""
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from ssvae_pl.callbacks import SaveOnInterrupt

    model, callback = nan_vae(), SaveOnInterrupt()
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[callback])
    trainer.fit(model, datamodule=make_dm())
    saved: list = []
    monkeypatch.setattr(trainer, "save_checkpoint", lambda path, *args, **kwargs: saved.append(path))
    stop = SIGTERMException()
    callback.on_exception(trainer, model, stop)
    assert getattr(stop, "finished", False) and stop.signal_name == "SIGTERM" and saved == []


def test_deferred_skip_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="deferred needs action stop"):
        NonFiniteGuard(action="skip", deferred=True)


def test_no_checkpoint_is_written_with_non_finite_weights(make_dm, tmp_path: Path) -> None:
    model = nan_vae()
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[NonFiniteGuard()])
    trainer.fit(model, datamodule=make_dm())
    with torch.no_grad():
        model.encoder.net[0].bias[0] = float("nan")
    with pytest.raises(NumericalError, match="refusing to write a checkpoint with non-finite weights"):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()


def test_a_nan_stops_ssvae_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path: Path, cli_data: Path) -> None:
    """Through the command: a NaN loss at global step 3 (epoch 1, batch 1) stops the run with one ``ssvae: error:``
    line naming the step, the epoch and the loss; last.ckpt still holds epoch 0's finite weights and loads."""
    result = ssvae_here(tmp_path, "fit", "-c", VAE_CONFIG, *data_args(cli_data), *QUIET,
                   "--model.class_path", "helpers.faulty_models.NaNVAE", "--model.init_args.nan_steps", "[3]",
                   "--model.init_args.hidden_dims", "[16]", "--model.init_args.latent_dim", "3",
                   "--trainer.max_epochs", "3", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches",
                   "1")
    assert_one_line_user_error(result, "non-finite training loss (nan) at global step 3 (epoch 1, batch 1)")
    assert result.returncode == 2
    checkpoints = tmp_path / "lightning_logs" / "m1_vae" / "version_0" / "checkpoints"
    assert "last.ckpt keeps the last good state" in result.stderr and "--ckpt_path last" in result.stderr
    last = load(checkpoints / "last.ckpt")
    assert (last["global_step"], last["epoch"]) == (2, 0) and finite(last["state_dict"])
    assert not list(checkpoints.glob(".*.tmp"))


def test_a_nan_before_the_first_checkpoint_promises_no_checkpoint(tmp_path: Path, cli_data: Path) -> None:
    """A NaN at the very first step: the message says that nothing was saved yet, not that last.ckpt keeps a state
    that does not exist."""
    result = ssvae_here(tmp_path, "fit", "-c", VAE_CONFIG, *data_args(cli_data), *QUIET,
                   "--model.class_path", "helpers.faulty_models.NaNVAE", "--model.init_args.nan_steps", "[0]",
                   "--model.init_args.hidden_dims", "[16]", "--model.init_args.latent_dim", "3",
                   "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2")
    assert_one_line_user_error(result, "no checkpoint was written yet")
    assert "keeps the last good state" not in result.stderr
    assert not list((tmp_path / "lightning_logs" / "m1_vae" / "version_0").glob("checkpoints/*.ckpt"))


# ---- 2. checkpoints that survive a kill ------------------------------------------------------------------------------


def test_atomic_checkpoint_io_keeps_the_old_file_when_a_write_fails(tmp_path: Path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)
    before = path.read_bytes()

    def killed_half_way(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # as a kill during the write would

    monkeypatch.setattr(torch, "save", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    assert path.read_bytes() == before and int(io.load_checkpoint(path)["step"]) == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary left behind
    monkeypatch.undo()

    fsynced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsynced.append(fd), real_fsync(fd)))
    (path.parent / ".last.ckpt.99999.tmp").write_bytes(b"left by a killed process")
    io.save_checkpoint({"step": torch.tensor(3)}, path)
    assert int(io.load_checkpoint(path)["step"]) == 3
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    assert len(fsynced) == 2  # the file's data, then the folder's entry (the rename)


def start(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([*COMMAND, *args], cwd=cwd, env=run_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


SLOW_M2 = ["--model.class_path", "helpers.faulty_models.SlowM2", *TINY_M2, "--data.binarize", "dynamic",
           "--trainer.limit_val_batches", "1", *QUIET]


def test_sigterm_mid_epoch_saves_a_checkpoint_that_resumes(tmp_path: Path, cli_data: Path) -> None:
    """``kill -TERM`` during epoch 1: the run stops at the end of the batch, writes that step to last.ckpt, says so
    in one line and exits 143; the same command with ``--ckpt_path last`` finishes the run."""
    run = ["fit", "-c", M2_CONFIG, *data_args(cli_data), *SLOW_M2, "--trainer.max_epochs", "2",
           "--trainer.logger.init_args.version", "term", "--model.init_args.step_seconds", "0.3"]
    process = start(tmp_path, *run)
    last = tmp_path / "lightning_logs" / "m2" / "term" / "checkpoints" / "last.ckpt"
    wait_for(last, process)  # epoch 0 (5 steps) is done
    time.sleep(0.8)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr and "ssvae: stopped by SIGTERM: global step" in stderr
    stopped = load(last)
    assert stopped["epoch"] == 1 and 5 < stopped["global_step"] < 10, (stopped["epoch"], stopped["global_step"])
    assert f"global step {stopped['global_step']} (epoch 1) saved to" in stderr

    ok(ssvae_here(tmp_path, *run, "--ckpt_path", "last"))
    finished = load(last)
    assert (finished["epoch"], finished["global_step"]) == (1, 10)


# ---- 3. and 4. exact resumes and determinism ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory: pytest.TempPathFactory, cli_data: Path):
    """Two identical uninterrupted runs of tiny M2 (2 epochs of 3 steps, dynamic binarisation): (cwd, run args)."""
    cwd = tmp_path_factory.mktemp("reference")
    run = ["fit", "-c", M2_CONFIG, *data_args(cli_data), *SLOW_M2, "--trainer.limit_train_batches", "3"]
    for version in ("a", "b"):
        ok(ssvae_here(cwd, *run, "--trainer.max_epochs", "2", "--trainer.logger.init_args.version", version))
    return cwd, run


def run_folder(cwd: Path, version: str) -> Path:
    return cwd / "lightning_logs" / "m2" / version


def assert_same_training_state(a: dict, b: dict) -> None:
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for (_, sa), (_, sb) in zip(sorted(a["optimizer_states"][0]["state"].items()),
                                sorted(b["optimizer_states"][0]["state"].items())):
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
    # the same best val/acc (current_score is not: Lightning does not restore it, and it is only set on an improvement)
    score = [[s.get("best_model_score") for k, s in c["callbacks"].items() if k == "BestCheckpoint"] for c in (a, b)]
    assert score[0] == score[1] and score[0][0] is not None


def test_identical_runs_are_identical_and_record_their_seeds(reference_runs, cli_data: Path) -> None:
    """Two runs of one config: the same labelled indices, the same weights, optimiser state and val metric; the
    seeds are in the run folder (labelled_indices.json: data.seed; config.yaml: seed_everything); another
    data.seed picks another labelled subset."""
    cwd, run = reference_runs
    a, b = run_folder(cwd, "a"), run_folder(cwd, "b")
    assert (a / "labelled_indices.json").read_text() == (b / "labelled_indices.json").read_text()
    assert_same_training_state(load(a / "checkpoints" / "last.ckpt"), load(b / "checkpoints" / "last.ckpt"))
    record = json.loads((a / "labelled_indices.json").read_text())
    assert record["seed"] == 0 and len(record["labelled_indices"]) == 100
    assert yaml.safe_load((a / "config.yaml").read_text())["seed_everything"] == 0

    ok(ssvae_here(cwd, *run, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
             "--data.seed", "1", "--trainer.logger.init_args.version", "seed1"))
    other = json.loads((run_folder(cwd, "seed1") / "labelled_indices.json").read_text())
    assert other["seed"] == 1 and other["labelled_indices"] != record["labelled_indices"]


def test_resuming_at_an_epoch_boundary_gives_the_uninterrupted_result(reference_runs) -> None:
    """One epoch, then ``--ckpt_path last`` to two: bit for bit the uninterrupted run (CPU)."""
    cwd, run = reference_runs
    ok(ssvae_here(cwd, *run, "--trainer.max_epochs", "1", "--trainer.logger.init_args.version", "resumed"))
    ok(ssvae_here(cwd, *run, "--trainer.max_epochs", "2", "--trainer.logger.init_args.version", "resumed",
             "--ckpt_path", "last"))
    assert_same_training_state(load(run_folder(cwd, "a") / "checkpoints" / "last.ckpt"),
                               load(run_folder(cwd, "resumed") / "checkpoints" / "last.ckpt"))


def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_result(reference_runs) -> None:
    """SIGKILL in the middle of epoch 1: last.ckpt is epoch 0's, whole; resuming replays epoch 1 from its start
    and ends bit for bit where the uninterrupted run ended."""
    cwd, run = reference_runs
    args = [*run, "--trainer.max_epochs", "2", "--trainer.logger.init_args.version", "killed",
            "--model.init_args.step_seconds", "0.5"]
    process = start(cwd, *args)
    last = run_folder(cwd, "killed") / "checkpoints" / "last.ckpt"
    wait_for(last, process)
    time.sleep(0.6)
    process.kill()
    process.communicate(timeout=60)
    killed = load(last)
    assert (killed["epoch"], killed["global_step"]) == (0, 3)
    ok(ssvae_here(cwd, *args, "--ckpt_path", "last"))
    assert_same_training_state(load(run_folder(cwd, "a") / "checkpoints" / "last.ckpt"), load(last))


# ---- 5. bad inputs: one line, not a traceback ----------------------------------------------------------------------


def test_ckpt_path_is_checked_before_anything_runs(tmp_path: Path) -> None:
    from ssvae_pl import faults
    from ssvae_pl.errors import CheckpointError

    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 0}, good)
    (tmp_path / "truncated.ckpt").write_bytes(good.read_bytes()[:100])
    torch.save({"w": torch.zeros(2)}, tmp_path / "plain.pt")
    for value in ("last", "best", None):
        faults.check_ckpt_path(["fit"] + ([] if value is None else ["--ckpt_path", value]))
    faults.check_ckpt_path(["test", f"--ckpt_path={good}"])
    for name, message in (("missing.ckpt", "does not exist"), ("truncated.ckpt", "is truncated or not a checkpoint"),
                          ("plain.pt", "is not a Lightning checkpoint")):
        with pytest.raises(CheckpointError, match=message):
            faults.check_ckpt_path(["test", "--ckpt_path", str(tmp_path / name)])


def test_library_failures_are_described_in_one_line() -> None:
    from ssvae_pl import faults

    try:
        torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=-1.0)
    except ValueError as err:
        assert faults.describe(err) == ("the optimizer rejects its settings: Invalid learning rate: -1.0; check "
                                        "--optimizer.init_args.")
    mismatch = RuntimeError("Error(s) in loading state_dict for VAE:\n\tsize mismatch for encoder.net.0.weight")
    wrapped = ValueError("while fitting")
    wrapped.__cause__ = mismatch
    assert faults.describe(wrapped).startswith("the checkpoint's weights do not fit the configured model")
    assert "/a/file/logs" in faults.describe(NotADirectoryError(20, "Not a directory", "/a/file/logs"))
    assert faults.describe(RuntimeError("a bug")) is None  # everything else keeps its traceback
