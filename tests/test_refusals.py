"""No run is ever replaced, no untrained model is ever reported, and bad input is one ``ssvae: error:`` line (exit 2,
nothing written): the cases of the third reliability pass, numbered as in its issue. Most run ``ssvae`` in this
process (``cli.main``: no interpreter start-up); the ones that need a fresh process (a C++ abort, console noise) run
it as a subprocess."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers.synthetic import write_synthetic_mnist
from helpers.cli import ssvae_here
from helpers.image_folders import write_image_folders
from ssvae_pl import cli
from ssvae_pl.data.sources import idx as sources
from test_cli import COMMAND, REPO, TINY_VAE

VAE_CONFIG = str(REPO / "configs" / "mnist" / "m1_vae.yaml")
M2_CONFIG = str(REPO / "configs" / "mnist" / "m2.yaml")
FOLDER_DATA = str(REPO / "configs" / "image_folder" / "data.yaml")
TINY_M2 = ["--model.init_args.hidden_dims", "[8]", "--model.init_args.classifier_hidden_dims", "[8]",
           "--model.init_args.latent_dim", "2"]
ONE_STEP = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
            "--trainer.enable_model_summary", "false", "--trainer.enable_progress_bar", "false"]


def data(root: Path) -> list[str]:
    return ["--data.data_dir", str(root), "--data.download", "false", "--data.check_md5", "false",
            "--data.val_size", "100", "--data.batch_size", "100"]


def run(cwd: Path, *args: str) -> int:
    """``ssvae <args>`` in this process, in ``cwd`` (``helpers.cli.ssvae_here``): its exit status; what it printed
    goes on to this test's own output (``capsys``)."""
    result = ssvae_here(cwd, *args)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


def one_error(capsys, *fragments: str) -> str:
    """The one ``ssvae: error:`` line printed, which names every fragment; no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ssvae: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert all(fragment in errors[0] for fragment in fragments), errors[0]
    return errors[0]


def refused(capsys, cwd: Path, *args: str, names: tuple[str, ...] = ()) -> str:
    """``ssvae <args>`` exits 2 with one error line naming ``names``, and writes nothing under ``cwd``."""
    before = {p: p.stat().st_mtime_ns for p in cwd.rglob("*") if p.is_file()}
    assert run(cwd, *args) == 2
    line = one_error(capsys, *names)
    assert {p: p.stat().st_mtime_ns for p in cwd.rglob("*") if p.is_file()} == before
    return line


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working folder with the synthetic MNIST under data/, one finished VAE run (m1_vae/version_0) and one
    finished M2 run (m2/version_0)."""
    root = tmp_path_factory.mktemp("home")
    write_synthetic_mnist(root / "data")
    assert run(root, "fit", "-c", VAE_CONFIG, *data(root / "data"), *TINY_VAE, *ONE_STEP) == 0
    assert run(root, "fit", "-c", M2_CONFIG, *data(root / "data"), *TINY_M2, *ONE_STEP) == 0
    return root


def vae_fit(home: Path, *extra: str) -> list[str]:
    return ["fit", "-c", VAE_CONFIG, *data(home / "data"), *TINY_VAE, *ONE_STEP, *extra]


def m2(home: Path, subcommand: str, *extra: str) -> list[str]:
    return [subcommand, "-c", M2_CONFIG, *data(home / "data"), *TINY_M2, *extra]


# ---- runs never replaced -------------------------------------------------------------------------------------------


def test_01_a_version_with_a_slash_is_refused(home: Path, capsys) -> None:
    """``version x/y`` wrote into ``y``, another run's folder, and a later fit without --ckpt_path replaced it."""
    refused(capsys, home, *vae_fit(home, "--trainer.logger.init_args.version", "x/version_0"),
            names=("trainer.logger.init_args.version", "'x-version_0'"))
    refused(capsys, home, *vae_fit(home, "--trainer.logger.init_args.version", "x/version_0", "--ckpt_path", "last"),
            names=("trainer.logger.init_args.version",))


def test_02_a_stale_slurm_checkpoint_never_resumes_another_run(home: Path, capsys, monkeypatch) -> None:
    """Off SLURM, Lightning ignores ``hpc_ckpt_1.ckpt``, so the run folder's rule holds (it holds a run: refused);
    inside a SLURM job, a pre-emption checkpoint of another run is refused by name."""
    last = home / "lightning_logs" / "m1_vae" / "version_0" / "checkpoints" / "last.ckpt"
    stale = home / "hpc_ckpt_1.ckpt"
    stale.write_bytes(last.read_bytes())
    try:
        refused(capsys, home, *vae_fit(home, "--trainer.logger.init_args.version", "version_0"),
                names=("already holds this run", "--ckpt_path last"))
        monkeypatch.setenv("SLURM_NTASKS", "1")
        monkeypatch.setenv("SLURM_JOB_NAME", "train")
        refused(capsys, home, *vae_fit(home, "--trainer.logger.init_args.version", "other"),
                names=(str(stale), "SLURM pre-emption checkpoint", "version_0"))
    finally:
        stale.unlink()


def test_02_a_fit_never_replaces_another_fits_checkpoints(tmp_path: Path, home: Path, capsys) -> None:
    """Whatever picked the folder (here no logger: ``<cwd>/checkpoints``), a fit not resumed from that folder's run
    refuses to write into a checkpoint folder that holds checkpoints."""
    fit = m2(home, "fit", *ONE_STEP, "--trainer.logger", "false")
    assert run(tmp_path, *fit) == 0
    last = tmp_path / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    assert run(tmp_path, *fit) == 2
    one_error(capsys, str(last), "belongs to another fit", f"--ckpt_path {last}")
    assert last.read_bytes() == before
    assert run(tmp_path, *fit, "--ckpt_path", str(last), "--trainer.max_epochs", "2") == 0  # its own run: resumed


# ---- no untrained model reported ----------------------------------------------------------------------------------


def test_03_predict_last_without_a_run_is_refused(tmp_path: Path, home: Path, capsys) -> None:
    refused(capsys, tmp_path, *m2(home, "predict", "--ckpt_path", "last"), names=("--ckpt_path last", "no M2 run"))


def test_04_test_and_predict_without_a_checkpoint_are_refused(tmp_path: Path, home: Path, capsys) -> None:
    for subcommand in ("test", "predict", "validate"):
        refused(capsys, tmp_path, *m2(home, subcommand), names=(f"ssvae {subcommand} needs a trained model",
                                                                "--ckpt_path"))


def test_08_test_best_and_last_use_the_newest_runs_checkpoints(home: Path, monkeypatch) -> None:
    """``--ckpt_path best`` was Lightning's traceback; ``last`` and ``best`` now name the newest run's files."""
    from ssvae_pl import runs

    chosen = []
    find = runs.trained_checkpoint
    monkeypatch.setattr(runs, "trained_checkpoint", lambda *args: chosen.append(find(*args)) or chosen[-1])
    for which in ("best", "last"):
        assert run(home, *m2(home, "test", "--ckpt_path", which, "--trainer.enable_progress_bar", "false")) == 0
    assert [p.relative_to("lightning_logs").as_posix() for p in chosen] == [
        "m2/version_0/checkpoints/best-epoch000.ckpt", "m2/version_0/checkpoints/last.ckpt"]


# ---- one line, not a traceback -------------------------------------------------------------------------------------


def tiny_checkpoint(home: Path) -> Path:
    return home / "lightning_logs" / "m2" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("options, fails", [("ro,size=1m", "Read-only file system"), ("size=4k", "No space left")])
def test_05_06_export_onto_a_read_only_or_full_disk(tmp_path: Path, home: Path, options: str, fails: str) -> None:
    """TorchScript's own writer raised a traceback (read-only) or aborted the process in C++ (full disk, exit
    134): the files are serialised in memory and written by a plain write that names the file."""
    from test_faults import mount_tmpfs

    target = tmp_path / "out"
    if not mount_tmpfs(target, options):
        pytest.skip("mounting a tmpfs needs root (or CAP_SYS_ADMIN) here")
    try:
        result = subprocess.run([*COMMAND, "export", "--ckpt_path", str(tiny_checkpoint(home)), "--output_dir",
                                 str(target)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr[-3000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("ssvae: error:")]
        assert len(errors) == 1 and fails in errors[0] and "last.torchscript.pt" in errors[0], result.stderr[-3000:]
        assert list(target.iterdir()) == []
    finally:
        subprocess.run(["umount", str(target)], check=False)


def test_07_a_truncated_last_checkpoint_is_named_with_the_run_s_other_one(tmp_path: Path, home: Path, capsys) -> None:
    run_folder = tmp_path / "lightning_logs" / "m2" / "version_0"
    (run_folder / "checkpoints").mkdir(parents=True)
    source = home / "lightning_logs" / "m2" / "version_0"
    (run_folder / "config.yaml").write_bytes((source / "config.yaml").read_bytes())
    good = (source / "checkpoints" / "last.ckpt").read_bytes()
    (run_folder / "checkpoints" / "best-epoch000.ckpt").write_bytes(good)
    (run_folder / "checkpoints" / "last.ckpt").write_bytes(good[: len(good) // 2])
    refused(capsys, tmp_path, *m2(home, "fit", *ONE_STEP, "--ckpt_path", "last"),
            names=("last.ckpt is truncated", "--ckpt_path", "best-epoch000.ckpt"))


def test_09_a_config_file_that_is_not_utf8(tmp_path: Path, home: Path, capsys) -> None:
    latin1 = tmp_path / "notes.yaml"
    latin1.write_bytes("trainer:\n  max_epochs: 1  # \xe9t\xe9\n".encode("latin-1"))
    refused(capsys, tmp_path, *m2(home, "fit", "-c", str(latin1)), names=(str(latin1), "not UTF-8", "save it"))


def test_10_a_corrupt_gz_file(tmp_path: Path, capsys) -> None:
    write_synthetic_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw" / sources.TRAIN_IMAGES
    packed = bytearray(gzip.compress(raw.read_bytes()))
    packed[2000:2010] = b"\xff" * 10  # an invalid deflate block: zlib.error, not EOFError
    raw.with_name(raw.name + ".gz").write_bytes(bytes(packed))
    raw.unlink()
    assert run(tmp_path, *m2(tmp_path.parent, "fit", *ONE_STEP, "--data.data_dir", str(tmp_path))) == 2
    one_error(capsys, f"{raw.name}.gz could not be decompressed", "Fix:")


def test_11_a_label_outside_the_classes(tmp_path: Path, capsys) -> None:
    write_synthetic_mnist(tmp_path)
    labels = tmp_path / "MNIST" / "raw" / sources.TRAIN_LABELS
    content = bytearray(labels.read_bytes())
    content[8 + 5] = 12
    labels.write_bytes(bytes(content))
    assert run(tmp_path, *m2(tmp_path.parent, "fit", *ONE_STEP, "--data.data_dir", str(tmp_path))) == 2
    one_error(capsys, str(labels), "label 12 of image 5", "0..9")


def test_12_an_image_folder_of_one_class(tmp_path: Path, home: Path, capsys) -> None:
    folders = write_image_folders(tmp_path / "photos", labelled_per_class=2, unlabelled=2, test_per_class=1)
    for extra in ("square", "triangle"):
        for image in (folders["labelled"] / extra).iterdir():
            image.unlink()
        (folders["labelled"] / extra).rmdir()
    line = refused(capsys, tmp_path, *m2(home, "fit", "-c", FOLDER_DATA, "--data.dataset.labelled_dir",
                                         str(folders["labelled"])), names=("data.dataset.labelled_dir", "one class"))
    assert "Union" not in line and len(line) < 300


@pytest.mark.parametrize("setting, value, names", [
    ("precision", "bf16-true", ("trainer.precision", "bf16-mixed")),
    ("precision", "64-true", ("trainer.precision", "32-true")),
    ("accumulate_grad_batches", "0", ("trainer.accumulate_grad_batches", ">= 1")),
    ("gradient_clip_val", "-1", ("trainer.gradient_clip_val", ">= 0")),
])
def test_13_14_trainer_settings_that_would_fail_inside_the_run(tmp_path: Path, home: Path, capsys, setting: str,
                                                                 value: str, names: tuple[str, ...]) -> None:
    refused(capsys, tmp_path, *m2(home, "fit", *ONE_STEP, f"--trainer.{setting}", value), names=names)


def test_15_a_ddp_fit_whose_other_process_died(home: Path, monkeypatch) -> None:
    """The surviving rank's gloo error becomes one line with the checkpoint and the command that resumes the run."""
    from ssvae_pl.callbacks import LastCheckpoint

    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:21415: "
                        "Connection reset by peer. This is typically caused by a remote worker hanging.")
    last = tiny_checkpoint(home)
    checkpoint = LastCheckpoint()
    checkpoint.dirpath = str(last.parent)
    trainer = SimpleNamespace(checkpoint_callbacks=[checkpoint], logger=SimpleNamespace(version="version_0"))
    monkeypatch.setattr(cli.SSVAECLI, "current", SimpleNamespace(trainer=trainer))
    line = cli.peer_lost(gloo, ["fit", "-c", "m2.yaml", "--trainer.devices", "2"])
    assert line.startswith("another process of this distributed run ended unexpectedly (Read error")
    assert line.endswith("with: ssvae fit -c m2.yaml --trainer.devices 2 --trainer.logger.init_args.version "
                         "version_0 --ckpt_path last") and str(last) in line
    assert cli.peer_lost(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), []) is None


def test_19_the_resume_command_of_a_fit_without_a_logger() -> None:
    """It named a run folder (``--trainer.logger.init_args.version``) that a fit without a logger cannot have."""
    saved = "/w/checkpoints/last.ckpt"
    command = cli.resume_command(["fit", "-c", "m2.yaml", "--trainer.logger", "false"], saved, False)
    assert command == "ssvae fit -c m2.yaml --trainer.logger false --ckpt_path /w/checkpoints/last.ckpt"


@pytest.mark.parametrize("content, names", [("", ("holds nothing",)), ("- a\n- b\n", ("holds a YAML list",))])
def test_20_a_config_file_that_holds_no_settings(tmp_path: Path, home: Path, capsys, content: str, names) -> None:
    config = tmp_path / "extra.yaml"
    config.write_text(content)
    refused(capsys, tmp_path, *m2(home, "fit", "-c", str(config)), names=(str(config), *names))


@pytest.mark.parametrize("args, names", [
    (["--model.class_path", "ssvae_pl.models.Nope"], ("model:", "has no attribute 'Nope'")),
    (["--model.init_args.latent_dim", "2.5"], ("model.init_args.latent_dim", "expected int, got 2.5")),
    (["--optimizer.init_args.lr", "abc"], ("optimizer.init_args.lr", "'abc'")),
])
def test_20_union_errors_name_the_key_and_the_one_error(tmp_path: Path, home: Path, capsys, args, names) -> None:
    line = refused(capsys, tmp_path, *m2(home, "fit", *args), names=names)
    assert "Union" not in line and "Subtypes" not in line and len(line) < 250, line


def test_21_a_checkpoint_used_with_other_data_settings(tmp_path: Path, home: Path, capsys) -> None:
    """The grey-digit run tested on colour folders: the shapes compared, and the run's own config named."""
    folders = write_image_folders(tmp_path / "photos", labelled_per_class=2, unlabelled=2, test_per_class=1)
    args = ["-c", FOLDER_DATA, "--data.dataset.labelled_dir", str(folders["labelled"]), "--data.dataset.test_dir",
            str(folders["test"]), "--data.val_size", "3", "--ckpt_path", str(tiny_checkpoint(home))]
    refused(capsys, tmp_path, *m2(home, "test", *args), names=(
        "1x28x28 images of 10 classes", "3x32x32 images of 3 classes", "data settings",
        f"-c {tiny_checkpoint(home).parent.parent / 'config.yaml'}"))


def test_predict_on_several_devices_is_one_line_before_any_launch(tmp_path: Path, home: Path, capsys) -> None:
    refused(capsys, tmp_path, *m2(home, "predict", "--ckpt_path", str(tiny_checkpoint(home)), "--trainer.devices",
                                  "2", "--trainer.accelerator", "cpu"), names=("trainer.devices", "one process"))


def test_export_options_are_one_line(home: Path, capsys) -> None:
    assert run(home, "export", "--ckpt_path", str(tiny_checkpoint(home)), "--atol", "-1") == 2
    one_error(capsys, "--atol", ">= 0")


# ---- console noise (23) ----------------------------------------------------------------------------------------------


def test_23_test_and_resume_print_none_of_lightnings_misleading_lines(tmp_path: Path, home: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tested = subprocess.run([*COMMAND, *m2(home, "test", "--ckpt_path", str(tiny_checkpoint(home)))], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert tested.returncode == 0, tested.stderr[-3000:]
    resumed = subprocess.run([*COMMAND, *m2(home, "fit", *ONE_STEP[2:], "--trainer.max_epochs", "2",
                                            "--trainer.logger.init_args.version", "version_0", "--ckpt_path", "last")],
                             cwd=home, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    printed = tested.stdout + tested.stderr + resumed.stdout + resumed.stderr
    for noise in ("The dirpath has changed", "exists and is not empty", "Found current_model_state",
                  "callbacks used to create the checkpoint", "Tip:"):
        assert noise not in printed, noise


def test_23_no_srun_hint_and_no_tips_in_python_use(tmp_path: Path) -> None:
    """Importing the models installs the filters: a script of the user's sees neither line."""
    srun = tmp_path / "srun"
    srun.write_text("#!/bin/sh\n")
    srun.chmod(0o755)
    script = ("import logging, warnings\n"
              "import ssvae_pl.models\n"
              "from lightning_fabric.plugins.environments import SLURMEnvironment\n"
              "with warnings.catch_warnings(record=True) as caught:\n"
              "    SLURMEnvironment._validate_srun_used()\n"
              "record = logging.LogRecord('pytorch_lightning', 20, '', 0, 'Tip: install litmodels', None, None)\n"
              "handlers = logging.getLogger('pytorch_lightning').handlers\n"
              "print(len(caught), all(not all(f.filter(record) for f in h.filters) for h in handlers))\n")
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["0", "True"], result.stderr[-2000:]


def test_23_no_v_num_in_the_progress_bar() -> None:
    from ssvae_pl.callbacks import RunProgressBar

    bar = RunProgressBar()
    trainer = SimpleNamespace(loggers=[SimpleNamespace(version="version_0")], progress_bar_metrics={})
    assert "v_num" not in bar.get_metrics(trainer, torch.nn.Module())


# ---- the fresh pass: the cases it found weak or failing -------------------------------------------------------------


def test_a_second_ctrl_c_is_one_line_with_the_last_checkpoint(tmp_path: Path, home: Path, capsys) -> None:
    """Lightning's own exit (status 1, "Detected KeyboardInterrupt") became one line naming the last checkpoint and
    the resume command, exit 130."""
    import signal

    previous = signal.getsignal(signal.SIGINT)
    args = vae_fit(home, "--model.class_path", "helpers.faulty_models.SecondCtrlC", "--model.init_args.at", "3",
                   "--trainer.max_epochs", "3", "--trainer.limit_train_batches", "2")
    try:
        assert run(tmp_path, *args) == 130
    finally:
        signal.signal(signal.SIGINT, previous)  # Lightning ignores SIGINT once it has seen one
    err = capsys.readouterr().err
    assert err.count("ssvae: stopped at once by a second Ctrl-C: the last checkpoint is ") == 1, err[-2000:]
    assert "--ckpt_path last" in err and "Traceback" not in err


def test_whole_number_batch_limits_are_batches(tmp_path: Path, home: Path) -> None:
    """``--trainer.limit_train_batches 1`` trained the whole epoch: the parser reads 1 as 1.0, every batch."""
    assert run(tmp_path, *vae_fit(home, "--trainer.limit_train_batches", "1", "--trainer.max_epochs", "2")) == 0
    last = tmp_path / "lightning_logs" / "m1_vae" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2


@pytest.mark.parametrize("args, names", [
    (["--trainer.max_epochs", "0"], ("trainer.max_epochs 0 trains nothing",)),
    (["--trainer.limit_train_batches", "0"], ("trainer.limit_train_batches 0",)),
    (["--optimizer.init_args.lr", "0"], ("optimizer.init_args.lr 0",)),
    (["--data.val_size", "1000"], ("data.val_size",)),
    (["--seed_everything", "abc"], ("seed_everything",)),
])
def test_fits_that_would_train_nothing_or_cannot_start_leave_no_run(tmp_path: Path, home: Path, capsys, args,
                                                                    names) -> None:
    """Each is one line, and no run folder is left behind (a refused fit's folder held an event file)."""
    line = refused(capsys, tmp_path, *vae_fit(home, *args), names=names)
    assert "Expected a bool" not in line
    assert not (tmp_path / "lightning_logs").exists() or not any((tmp_path / "lightning_logs").rglob("*.*"))


def test_a_folder_given_as_a_checkpoint_and_a_text_file(tmp_path: Path, home: Path, capsys) -> None:
    folder = tiny_checkpoint(home).parent
    refused(capsys, tmp_path, *m2(home, "test", "--ckpt_path", str(folder)), names=("is a folder", "last.ckpt"))
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    line = refused(capsys, tmp_path, *m2(home, "test", "--ckpt_path", str(text)), names=("truncated or not",))
    assert "resume" not in line and "KeyError" not in line


def test_predictions_into_a_folder_that_cannot_be_written_fail_before_predicting(tmp_path: Path, home: Path,
                                                                                 capsys, monkeypatch) -> None:
    from ssvae_pl.models import M2
    from test_faults import mount_tmpfs

    predicted = []
    predict_step = M2.predict_step
    monkeypatch.setattr(M2, "predict_step", lambda *args: predicted.append(1) or predict_step(*args))

    target = tmp_path / "ro"
    if not mount_tmpfs(target, "ro,size=1m"):
        pytest.skip("mounting a tmpfs needs root (or CAP_SYS_ADMIN) here")
    try:
        assert run(tmp_path, *m2(home, "predict", "--ckpt_path", str(tiny_checkpoint(home)),
                                 "--predictions.output", str(target / "p.csv"))) == 2
        err = capsys.readouterr().err
        assert "Read-only file system" in err and not predicted
    finally:
        subprocess.run(["umount", str(target)], check=False)


def test_export_into_a_file_is_named(tmp_path: Path, home: Path, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert run(tmp_path, "export", "--ckpt_path", str(tiny_checkpoint(home)), "--output_dir", str(afile)) == 2
    one_error(capsys, f"--output_dir {afile} is a file")
    assert afile.read_text() == "mine"


def test_an_unreadable_labelled_indices_record_is_named_not_called_another_subset(tmp_path: Path, home: Path,
                                                                                   capsys) -> None:
    assert run(tmp_path, *vae_fit(home)) == 0
    record = tmp_path / "lightning_logs" / "m1_vae" / "version_0" / "labelled_indices.json"
    record.write_text(record.read_text()[:200])
    args = vae_fit(home, "--trainer.max_epochs", "2", "--trainer.logger.init_args.version", "version_0",
                   "--ckpt_path", "last")
    assert run(tmp_path, *args) == 2
    line = one_error(capsys, "labelled_indices.json cannot be read")
    assert "another labelled subset" not in line
