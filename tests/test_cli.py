"""The ``ssvae`` command (ssvae_pl/cli.py) end to end, as a subprocess, on the synthetic MNIST and tiny models.

Each run costs several seconds of imports, so the runs are few and each checks several things.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers.synthetic import write_synthetic_mnist
from helpers.cli import ssvae_here
from ssvae_pl.data.datamodule import LABELLED_INDICES_FILE

REPO = Path(__file__).resolve().parents[1]
VAE_CONFIG = str(REPO / "configs" / "mnist" / "m1_vae.yaml")
CLASSIFIER_CONFIG = str(REPO / "configs" / "mnist" / "m1_classifier.yaml")
DEBUG = str(REPO / "configs" / "presets" / "debug.yaml")
SCRIPT = Path(sys.executable).with_name("ssvae")
COMMAND = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "ssvae_pl.cli"]

TINY_VAE = ["--model.init_args.hidden_dims", "[32]", "--model.init_args.latent_dim", "4"]
SHORT_FIT = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]


def data_args(data_dir: Path) -> list[str]:
    """Synthetic data: no download, no md5 check, a validation hold-out that fits 600 training images, and
    unlabelled batches small enough for the 500 training images (the classifier config asks for 1000)."""
    return ["--data.data_dir", str(data_dir), "--data.download", "false", "--data.check_md5", "false",
            "--data.val_size", "100", "--data.batch_size", "100", "--trainer.enable_progress_bar", "false"]


def ssvae(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([*COMMAND, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def cli_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli_data")
    write_synthetic_mnist(root)
    return root


@pytest.fixture(scope="module")
def debug_vae_run(tmp_path_factory: pytest.TempPathFactory, cli_data: Path):
    """``ssvae fit -c m1_vae.yaml -c debug.yaml`` once, in an empty folder: (result, folder)."""
    cwd = tmp_path_factory.mktemp("debug_run")
    return ssvae_here(cwd, "fit", "-c", VAE_CONFIG, "-c", DEBUG, *data_args(cli_data), *TINY_VAE), cwd


def test_debug_preset_fit_runs(debug_vae_run) -> None:
    """The VAE config with the debug preset runs one batch of each stage and exits 0, writing no logs."""
    result, cwd = debug_vae_run
    ok(result)
    assert "Traceback" not in result.stderr
    assert not (cwd / "lightning_logs").exists()


def test_debug_preset_writes_no_checkpoint(debug_vae_run) -> None:
    """"No logs or checkpoints written" (debug.yaml): nothing at all appears in the working folder."""
    result, cwd = debug_vae_run
    ok(result)
    assert files_under(cwd) == set()


def test_two_stage_m1_and_self_contained_classifier_checkpoint(tmp_path: Path, cli_data: Path) -> None:
    """Stage one writes a VAE checkpoint; stage two trains a classifier on it (debug preset, then a short real
    fit); ``ssvae test`` then works from the classifier's checkpoint alone, with the VAE checkpoint gone."""
    data = data_args(cli_data)
    ok(ssvae_here(tmp_path, "fit", "-c", VAE_CONFIG, *data, *TINY_VAE, *SHORT_FIT))
    vae_run = tmp_path / "lightning_logs" / "m1_vae" / "version_0"
    vae_ckpt = vae_run / "checkpoints" / "last.ckpt"
    assert vae_ckpt.is_file() and (vae_run / LABELLED_INDICES_FILE).is_file()
    assert torch.load(vae_ckpt, map_location="cpu", weights_only=True)["global_step"] == 2

    debug = ssvae_here(tmp_path, "fit", "-c", CLASSIFIER_CONFIG, "-c", DEBUG, *data, "--model.vae_checkpoint",
                       str(vae_ckpt))
    ok(debug)
    assert not (tmp_path / "lightning_logs" / "m1_classifier").exists()

    # hidden_dims differ from the config's []: `ssvae test` below must take them from the checkpoint
    fit = ssvae_here(tmp_path, "fit", "-c", CLASSIFIER_CONFIG, *data, *SHORT_FIT, "--model.vae_checkpoint",
                     str(vae_ckpt), "--model.init_args.hidden_dims", "[8]")
    ok(fit)
    clf_ckpt = tmp_path / "lightning_logs" / "m1_classifier" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(clf_ckpt, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    assert ckpt["hyper_parameters"]["vae_hparams"]["latent_dim"] == 4
    assert ckpt["hyper_parameters"]["hidden_dims"] == [8]
    vae_ckpt.rename(tmp_path / "vae_moved_away.ckpt")

    test = ssvae_here(tmp_path, "test", "-c", CLASSIFIER_CONFIG, *data, "--ckpt_path", str(clf_ckpt))
    ok(test)
    assert "test/acc" in test.stdout and "Traceback" not in test.stderr


def test_help_and_print_config(tmp_path: Path) -> None:
    """``ssvae --help`` (the installed command, in a process of its own) lists the subcommands; ``--print_config``
    prints the merged config as YAML."""
    helped = ssvae(tmp_path, "--help")
    ok(helped)
    for subcommand in ("fit", "validate", "test", "predict"):
        assert subcommand in helped.stdout

    printed = ssvae_here(tmp_path, "fit", "-c", VAE_CONFIG, "--print_config")
    ok(printed)
    assert "num_labelled" in printed.stdout
    config = yaml.safe_load(printed.stdout)
    assert config["data"]["num_labelled"] == 100
    assert config["model"]["class_path"] == "ssvae_pl.models.VAE"
    assert config["model"]["init_args"]["hidden_dims"] == [600, 600]
    assert files_under(tmp_path) == set()


def assert_one_line_user_error(result: subprocess.CompletedProcess, field: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("ssvae: error:")]
    assert len(errors) == 1 and field in errors[0], result.stderr[-3000:]


def test_bad_label_budget_is_one_line_error(tmp_path: Path, cli_data: Path) -> None:
    """A label budget that is not a multiple of the classes stops the command with one line naming the field."""
    result = ssvae_here(tmp_path, "fit", "-c", VAE_CONFIG, *data_args(cli_data), "--data.num_labelled", "105")
    assert_one_line_user_error(result, "data.num_labelled")


def test_compile_without_a_cpp_compiler_is_one_line_error(tmp_path: Path, cli_data: Path) -> None:
    """model.compile true on a CPU with no working C++ compiler: one line naming the field and the fix, not
    inductor's traceback from inside the first step."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CXX": str(tmp_path / "no-such-g++")}
    result = subprocess.run([*COMMAND, "fit", "-c", VAE_CONFIG, *data_args(cli_data), *TINY_VAE,
                             "--model.init_args.compile", "true", "--trainer.max_steps", "1"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert_one_line_user_error(result, "model.compile=true")
    assert "set model.compile false" in result.stderr


def test_missing_vae_checkpoint_is_one_line_error(tmp_path: Path, cli_data: Path) -> None:
    """A missing --model.vae_checkpoint stops the command with one line naming the field and the path."""
    result = ssvae_here(tmp_path, "fit", "-c", CLASSIFIER_CONFIG, *data_args(cli_data),
                   "--model.vae_checkpoint", "/nonexistent.ckpt")
    assert_one_line_user_error(result, "model.vae_checkpoint")
    assert "/nonexistent.ckpt" in result.stderr


def test_a_run_folder_is_resumed_by_its_own_config_and_never_mixed_with_another(tmp_path: Path, cli_data) -> None:
    """The same config (plus ``--ckpt_path last``) resumes in its folder; another config or another labelled subset
    aimed at that folder stops with one line naming it, and the first run's files stay as they were."""
    data = data_args(cli_data)
    run = ["fit", "-c", VAE_CONFIG, *data, *TINY_VAE, *SHORT_FIT, "--trainer.logger.init_args.version", "mine"]
    ok(ssvae_here(tmp_path, *run))
    folder = tmp_path / "lightning_logs" / "m1_vae" / "mine"
    kept = {name: (folder / name).read_bytes() for name in ("config.yaml", LABELLED_INDICES_FILE)}

    resumed = ssvae_here(tmp_path, *run, "--trainer.max_epochs", "2", "--ckpt_path", "last")
    for other, what in ((["--model.init_args.latent_dim", "3"], "another config"),
                        (["--data.seed", "7"], "another labelled subset")):
        clash = ssvae_here(tmp_path, *run, *other)
        assert clash.returncode == 2 and "Traceback" not in clash.stderr
        assert f"already holds a run with {what}" in clash.stderr and str(folder) in clash.stderr
        assert {name: (folder / name).read_bytes() for name in kept} == kept
    ok(resumed)
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
