"""scripts/reproduce_table1.py: the plan (one VAE per seed, shared), the table and plot, the cache, and one tiny
end-to-end sweep on the synthetic MNIST."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import shutil
import os
import shlex
import signal
import subprocess
import sys
import time
import types
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import cloudpickle
import pytest

from ssvae_pl.results import read_scalars

from helpers.synthetic import write_synthetic_mnist

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "reproduce_table1.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def load_script():
    spec = importlib.util.spec_from_file_location("reproduce_table1", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


table1 = load_script()
from sweep import plan, records, report, run  # noqa: E402 (the script puts scripts/ on the path)

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the fakes below run in the sweep's local jobs


def note(folder: Path, key: str, **values) -> None:
    """What a faked stage saw, noted from its job's process (one JSON line per stage, in the order they ran)."""
    with (folder / "ran.jsonl").open("a") as notes:
        notes.write(json.dumps({"key": key, **values}) + "\n")


def noted(folder: Path) -> list[dict]:
    file = folder / "ran.jsonl"
    return [json.loads(line) for line in file.read_text().splitlines()] if file.is_file() else []


def ran(folder: Path) -> list[str]:
    """The keys of the faked stages that ran, in order; read once, then forgotten."""
    keys = [entry["key"] for entry in noted(folder)]
    (folder / "ran.jsonl").unlink(missing_ok=True)
    return keys


def option(args: list[str], name: str) -> str | None:
    """The value after ``name`` in a command's arguments (the last one, as jsonargparse reads it)."""
    values = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == name]
    return values[-1] if values else None


def dry_run_commands(capsys, *argv: str) -> list[list[str]]:
    assert table1.main([*argv, "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    return [shlex.split(line)[1:] for line in lines if line.startswith("ssvae ")]


def test_dry_run_of_the_full_profile_trains_one_vae_per_seed_and_shares_it(tmp_path: Path, capsys) -> None:
    """--dry-run --profile full: one VAE fit per seed (not per label count); every M1 classifier and M1+M2 fit of
    a seed uses that seed's VAE, which comes first; every command carries its seed and label budget; each test
    reads its own fit's last.ckpt."""
    out = (tmp_path / "out").resolve()
    commands = dry_run_commands(capsys, "--profile", "full", "--out", str(out))
    assert not out.exists()  # a dry run writes nothing

    vaes = [c for c in commands if option(c, "-c") == "configs/mnist/m1_vae.yaml"]
    assert [option(c, "--data.seed") for c in vaes] == ["0", "1", "2"]
    for vae in vaes:
        seed = option(vae, "--data.seed")
        assert vae[0] == "fit" and option(vae, "--seed_everything") == seed
        assert option(vae, "--trainer.logger.init_args.version") == f"seed{seed}"
        assert option(vae, "--trainer.max_epochs") == "100"
        assert option(vae, "--data.num_labelled") is None  # the VAE does not depend on the label budget
    vae_ckpt = {option(c, "--data.seed"): str(out / "m1_vae" / f"seed{option(c, '--data.seed')}" / "checkpoints"
                                              / "last.ckpt") for c in vaes}

    configs = {"configs/mnist/m1_classifier.yaml": ("m1_classifier", "50"), "configs/mnist/m2.yaml": ("m2", "300"),
               "configs/mnist/m1m2.yaml": ("m1m2", "300")}
    fits, tests = {}, {}
    for position, command in enumerate(commands):
        config = option(command, "-c")
        if config not in configs:
            continue
        name, epochs = configs[config]
        seed, n = option(command, "--data.seed"), option(command, "--data.num_labelled")
        assert n in {"100", "600", "1000", "3000"} and seed in {"0", "1", "2"}
        assert option(command, "--seed_everything") == seed
        assert option(command, "--trainer.logger.init_args.save_dir") == str(out)
        version = option(command, "--trainer.logger.init_args.version")
        if command[0] == "fit":
            assert version == f"seed{seed}-n{n}"
            assert option(command, "--trainer.max_epochs") == epochs
            vae = option(command, "--model.init_args.vae_checkpoint")
            if name == "m2":
                assert vae is None
            else:
                assert vae == vae_ckpt[seed]
                assert position > commands.index(vaes[int(seed)])
            fits[(name, seed, n)] = position
        else:
            assert command[0] == "test" and version is None  # logged beside its checkpoint, in the fit's folder
            assert option(command, "--ckpt_path") == str(out / name / f"seed{seed}-n{n}" / "checkpoints" / "last.ckpt")
            assert option(command, "--trainer.max_epochs") is None
            tests[(name, seed, n)] = position
    assert len(fits) == len(tests) == 3 * 4 * 3
    assert all(tests[key] > fits[key] for key in fits)
    assert len(commands) == len(vaes) + 2 * len(fits)


def test_dry_run_overrides_and_quick_profile(tmp_path: Path, capsys) -> None:
    """--models/--labels/--seeds replace the profile's lists, --epochs and --trainer-args reach the commands, and
    --data-dir reaches every stage; quick's plan is the VAE, then m1, m2, m1m2 at 100 labels, seed 0."""
    quick = dry_run_commands(capsys, "--profile", "quick", "--out", str(tmp_path))
    assert [(c[0], option(c, "-c").split("/")[-1]) for c in quick] == [
        ("fit", "m1_vae.yaml"), ("fit", "m1_classifier.yaml"), ("test", "m1_classifier.yaml"),
        ("fit", "m2.yaml"), ("test", "m2.yaml"), ("fit", "m1m2.yaml"), ("test", "m1m2.yaml")]
    assert [option(c, "--trainer.max_epochs") for c in quick if c[0] == "fit"] == ["10", "10", "25", "25"]

    data = (tmp_path / "mydata").resolve()
    commands = dry_run_commands(capsys, "--profile", "full", "--models", "m2", "--labels", "600", "--seeds", "4",
                                "--epochs", "7", "--epochs", "m2=3", "--out", str(tmp_path), "--data-dir", str(data),
                                "--trainer-args", "--trainer.accelerator gpu --trainer.devices 1",
                                "--stage-args", "m2=--model.init_args.alpha 5")
    assert [c[0] for c in commands] == ["fit", "test"]  # m2 needs no VAE
    for command in commands:
        assert option(command, "--data.num_labelled") == "600" and option(command, "--data.seed") == "4"
        assert option(command, "--data.data_dir") == str(data)
        assert option(command, "--trainer.accelerator") == "gpu" and option(command, "--trainer.devices") == "1"
    assert option(commands[0], "--trainer.max_epochs") == "3"
    assert option(commands[0], "--model.init_args.alpha") == "5"
    assert option(commands[1], "--model.init_args.alpha") is None  # stage args go to the fit only


def test_m1m2_above_100_labels_takes_labelled_batches_of_100(tmp_path: Path, capsys) -> None:
    """The cpu profile's M1+M2 fits take m1m2.yaml's labelled batch of 20 at 100 labels and 100 above; STAGE-nN
    stage args reach that budget's fit only."""
    commands = dry_run_commands(capsys, "--profile", "cpu", "--models", "m1m2", "--seeds", "0", "--out", str(tmp_path),
                                "--stage-args", "m1m2-n600=--model.init_args.alpha_per_label 3")
    fits = {option(c, "--data.num_labelled"): c for c in commands if c[0] == "fit" and option(c, "-c").endswith("m1m2.yaml")}
    assert sorted(fits, key=int) == ["100", "600", "1000", "3000"]
    assert [option(fits[n], "--data.labelled_batch_size") for n in ("100", "600", "1000", "3000")] == [
        None, "100", "100", "100"]
    assert [option(fits[n], "--model.init_args.alpha_per_label") for n in ("100", "600", "1000")] == [None, "3", None]
    with pytest.raises(SystemExit, match="STAGE-nN"):
        table1.parse_stage_args(["m1m2-nx=--a 1"], {})


def test_cpu_profile_compiles_m2_and_m1m2_within_their_time_limits(tmp_path: Path, capsys) -> None:
    """--profile cpu: M2's and M1+M2's fits compile their loss, the VAE's and the classifier's do not (nor does any
    test); each fit has its CPU_TIMES limit and no epoch limit."""
    commands = dry_run_commands(capsys, "--profile", "cpu", "--seeds", "0", "--out", str(tmp_path))
    by_config = {}
    for command in commands:
        by_config.setdefault((command[0], Path(option(command, "-c")).stem), []).append(command)
    for (subcommand, config), group in by_config.items():
        compiled = {option(c, "--model.init_args.compile") for c in group}
        assert compiled == ({"true"} if subcommand == "fit" and config in ("m2", "m1m2") else {None}), config
    limits = {config: {option(c, "--trainer.max_time") for c in group} for (sub, config), group in by_config.items()
              if sub == "fit"}
    assert limits == {"m1_vae": {"00:00:50:00"}, "m1_classifier": {"00:00:03:00"}, "m2": {"00:00:28:00"},
                      "m1m2": {"00:00:25:00"}}


def test_hour_profile_is_the_one_hour_m1m2_recipe_per_seed(tmp_path: Path, capsys) -> None:
    """--profile hour: per seed, the VAE for 25 minutes and M1+M2 at 100 labels for 35, stopped by time alone
    (max_epochs -1), then the test of M1+M2's last checkpoint."""
    commands = dry_run_commands(capsys, "--profile", "hour", "--out", str(tmp_path))
    assert [(c[0], option(c, "-c").split("/")[-1], option(c, "--data.seed")) for c in commands] == [
        (kind, config, str(seed)) for seed in (0, 1, 2)
        for kind, config in (("fit", "m1_vae.yaml"), ("fit", "m1m2.yaml"), ("test", "m1m2.yaml"))]
    fits = [c for c in commands if c[0] == "fit"]
    assert [option(c, "--trainer.max_time") for c in fits] == ["00:00:25:00", "00:00:35:00"] * 3
    assert {option(c, "--trainer.max_epochs") for c in fits} == {"-1"}
    assert option(commands[1], "--model.init_args.vae_checkpoint") == str(tmp_path / "m1_vae/seed0/checkpoints/last.ckpt")


def test_render_docs_replaces_its_own_section_only(tmp_path: Path) -> None:
    """--docs: the table, the machine and the runs go between the sweep's markers; a second rendering replaces
    them and leaves the rest of the file as it was; a file without the markers gets the section at its end."""
    docs = tmp_path / "results.md"
    docs.write_text("# Results\n\nintro\n")
    vae = {"epochs": 359, "median_epoch_seconds": 3.33, "val/elbo": -91.85, "val/active_units": 13.0}
    fit = {"epochs": 460, "median_epoch_seconds": 3.85, "val/acc": 0.9675, "best val/acc": 0.9686}
    records = [{"model": "m1m2", "seed": 0, "num_labelled": 100, "fit_seconds": 2100.0, "test_error": 3.2,
                "fit": fit, "vae": vae}]
    report.render_docs(docs, "hour", "# MNIST test error\n\n| a |\n", "AMD EPYC, 2 cores", records)
    first = docs.read_text()
    assert first.startswith("# Results\n\nintro\n\n<!-- reproduce_table1 hour -->\n### MNIST test error")
    assert "Machine: AMD EPYC, 2 cores. Runs (from their TensorBoard events):" in first
    assert ("- M1's VAE, seed 0: 359 epochs (median 3.33 s of training), val/elbo -91.85, 13 active units\n"
            "- M1+M2, seed 0, 100 labels: fit 35 min, 460 epochs (median 3.85 s of training), val/acc 0.9675 at the "
            "end (best 0.9686); test error 3.20 %") in first
    docs.write_text(first + "\n## Later section\n")
    report.render_docs(docs, "hour", "# MNIST test error\n\n| b |\n", "AMD EPYC, 2 cores", records)
    second = docs.read_text()
    assert "| b |" in second and "| a |" not in second and second.endswith("\n## Later section\n")
    assert second.count("<!-- reproduce_table1 hour -->") == 1
    report.render_docs(docs, "hour", "# T\n\n| c |\n\nCommand: `x`\n\nCode: 0123456789.\n", "AMD EPYC", records)
    assert "| c |" in docs.read_text() and "Command: `x`" in docs.read_text() and "0123456789" not in docs.read_text()


FABRICATED = [  # (model, labels, seed, test error %)
    ("m2", 100, 0, 10.0), ("m2", 100, 1, 12.0), ("m2", 100, 2, 14.0),
    ("m1m2", 100, 0, 4.0), ("m1m2", 100, 1, 5.0),
    ("m1m2", 600, 0, 3.0),
    ("m1", 3000, 0, 4.0), ("m1", 3000, 1, 4.0),
]


def fabricated_records() -> list[dict]:
    return [{"model": m, "num_labelled": n, "seed": s, "test_error": e, "test_acc": 1 - e / 100}
            for m, n, s, e in FABRICATED]


def test_summarise_and_write_table(tmp_path: Path) -> None:
    """Means and sample standard deviations over seeds, one row per model beside the paper's figures."""
    summary = report.summarise(fabricated_records())
    assert summary["m2"][100].mean == pytest.approx(12.0) and summary["m2"][100].std == pytest.approx(2.0)
    assert summary["m2"][100].n == 3
    assert summary["m1m2"][100].mean == pytest.approx(4.5)
    assert summary["m1m2"][100].std == pytest.approx(0.7071, abs=1e-4)
    assert summary["m1m2"][600].n == 1 and summary["m1m2"][600].std == 0.0
    assert summary["m1"][3000].std == 0.0

    path = tmp_path / "table1.md"
    ran = [{**record, "code": ["0123456789"]} for record in fabricated_records()]
    ran[0]["code"] = ["0123456789", "abcdef0123 with uncommitted changes"]  # e.g. a VAE trained on an edited tree
    text = report.write_table(summary, [100, 600, 1000, 3000], path, "python scripts/reproduce_table1.py --x",
                              "mnist", ran)
    assert path.read_text() == text
    assert "Code: 0123456789; abcdef0123 with uncommitted changes." in text  # which code made the table
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert list(rows) == ["model", "M1 + classifier (paper: M1+TSVM)", "M2", "M1+M2"]
    assert rows["model"].count("|") == 6  # 5 columns: unescaped pipes only
    m2 = rows["M2"]
    assert "12.00 ± 2.00 (3 seeds) \\| 11.97 ± 1.71" in m2
    assert "— \\| 4.94 ± 0.13" in m2 and "— \\| 3.92 ± 0.63" in m2
    assert "4.50 ± 0.71 (2 seeds) \\| 3.33 ± 0.14" in rows["M1+M2"]
    assert "3.00 ± 0.00 (1 seed) \\| 2.59 ± 0.05" in rows["M1+M2"]
    assert "4.00 ± 0.00 (2 seeds) \\| 3.49 ± 0.04" in rows["M1 + classifier (paper: M1+TSVM)"]
    assert "11.82 ± 0.25" in rows["M1 + classifier (paper: M1+TSVM)"]
    for row in rows.values():
        assert row.replace("\\|", "").count("|") == 6
    assert "`python scripts/reproduce_table1.py --x`" in text


def test_plot_writes_a_png(tmp_path: Path) -> None:
    path = tmp_path / "table1.png"
    report.plot(report.summarise(fabricated_records()), path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_failed_stage_names_the_command_and_its_log(tmp_path: Path, monkeypatch, capsys) -> None:
    """A stage that fails stops the sweep with its command and log file; nothing is cached for it."""
    monkeypatch.setattr(run, "SSVAE", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])
    out = tmp_path / "out"
    assert table1.main(["--models", "m2", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    log = out / "logs" / "m2-seed0-n100-fit.log"
    assert "m2-seed0-n100-fit failed (exit 3)" in captured.err
    assert "ssvae fit -c configs/mnist/m2.yaml" in captured.err and str(log) in captured.err
    assert "boom" in log.read_text() and "boom" in captured.err
    assert "FAILED" in captured.out
    assert not (out / "results.json").exists() and not (out / "table1.md").exists()


# ---- a tiny real sweep -------------------------------------------------------------------------------------------

TINY = {  # the synthetic MNIST (600 training images), tiny models, two steps of one epoch
    "--trainer-args": "--data.download false --data.check_md5 false --data.val_size 100 --data.batch_size 100 "
                      "--data.eval_batch_size 200 --trainer.limit_train_batches 2 --trainer.limit_val_batches 1 "
                      "--trainer.num_sanity_val_steps 0 --trainer.enable_model_summary false",
    "vae": "--model.init_args.hidden_dims [32] --model.init_args.latent_dim 4",
    "m1": "--model.init_args.hidden_dims [8]",
    "m1m2": "--model.init_args.hidden_dims [32] --model.init_args.classifier_hidden_dims [16] "
            "--model.init_args.latent_dim 4 --model.init_args.m1_active_threshold 0",  # a 2-step VAE uses no dimension
}


def run_script(cwd: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_here(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """The script's ``main`` in this process (for the runs that start no fit), as ``run_script`` reports it."""
    out, err, before = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = table1.main(list(args))
    finally:
        os.chdir(before)
    return subprocess.CompletedProcess([str(SCRIPT), *args], code, out.getvalue(), err.getvalue())


def test_tiny_sweep_end_to_end_then_skips_and_refuses_changed_settings(tmp_path: Path) -> None:
    """m1 and m1m2 at 100 labels, seed 0, one tiny epoch each: one shared VAE, the table, plot and caches; the same
    command again skips every stage; changed epochs are refused rather than mixed into the cached results."""
    data, out = tmp_path / "data", tmp_path / "out"
    write_synthetic_mnist(data)
    args = ["--models", "m1", "m1m2", "--labels", "100", "--seeds", "0", "--epochs", "1", "--out", str(out),
            "--data-dir", str(data), "--trainer-args", TINY["--trainer-args"],
            *[arg for stage in ("vae", "m1", "m1m2") for arg in ("--stage-args", f"{stage}={TINY[stage]}")]]
    first = run_script(tmp_path, *args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    progress = [line for line in first.stdout.splitlines() if line.startswith("[") and "log:" in line]  # ended
    assert [line.split()[1] for line in progress] == [
        "vae-seed0-fit", "m1-seed0-n100-fit", "m1-seed0-n100-test", "m1m2-seed0-n100-fit", "m1m2-seed0-n100-test"]
    assert all(" s" in line and "log:" in line for line in progress)
    for name in ("table1.md", "table1.png", "table1.json", "results.json"):
        assert (out / name).is_file(), name
    assert (out / "table1.png").read_bytes()[:8] == PNG_SIGNATURE
    assert (out / "logs" / "vae-seed0-fit.log").is_file() and (out / "logs" / "m1m2-seed0-n100-test.log").is_file()
    assert (out / "m1_vae" / "seed0" / "checkpoints" / "last.ckpt").is_file()
    assert not (out / "m1m2" / "seed0-n100-test").exists()  # the test logs beside its checkpoint
    assert {"test/acc", "val/acc"} <= set(read_scalars(out / "m1m2" / "seed0-n100"))

    cache = json.loads((out / "results.json").read_text())
    assert sorted(cache) == sorted(line.split()[1] for line in progress)
    results = json.loads((out / "table1.json").read_text())
    assert [(r["model"], r["num_labelled"], r["seed"]) for r in results["runs"]] == [("m1", 100, 0), ("m1m2", 100, 0)]
    for run in results["runs"]:
        assert 0.0 <= run["test_acc"] <= 1.0
        assert run["test_error"] == pytest.approx(100 * (1 - run["test_acc"]))
        assert run["test_acc"] == cache[f"{run['model']}-seed0-n100-test"]["test_acc"]
    table = (out / "table1.md").read_text()
    assert "11.82 ± 0.25" in table and "3.33 ± 0.14" in table and "(1 seed)" in table
    assert table in first.stdout  # printed at the end

    started = time.perf_counter()
    second = run_here(tmp_path, *args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert time.perf_counter() - started < 30
    assert sum("skip" in line for line in second.stdout.splitlines() if line.startswith("[")) == 5
    assert json.loads((out / "results.json").read_text()) == cache

    more_epochs = ["2" if arg == "1" and args[i - 1] == "--epochs" else arg for i, arg in enumerate(args)]
    changed = run_here(tmp_path, *more_epochs)
    assert changed.returncode == 1
    assert "different command" in changed.stderr and "vae-seed0-fit" in changed.stderr


# ---- the datasets: MNIST unchanged, SVHN and CIFAR-10 -------------------------------------------------------------

# `--profile quick --out /OUT --data-dir /DATA --dry-run`, as the script printed it before --dataset existed
MNIST_QUICK = """\
ssvae fit -c configs/mnist/m1_vae.yaml --seed_everything 0 --data.seed 0 --data.data_dir /DATA --trainer.logger.init_args.save_dir /OUT --trainer.logger.init_args.version seed0 --trainer.enable_progress_bar false --trainer.max_epochs 10
ssvae fit -c configs/mnist/m1_classifier.yaml --model.init_args.vae_checkpoint /OUT/m1_vae/seed0/checkpoints/last.ckpt --seed_everything 0 --data.seed 0 --data.num_labelled 100 --data.data_dir /DATA --trainer.logger.init_args.save_dir /OUT --trainer.logger.init_args.version seed0-n100 --trainer.enable_progress_bar false --trainer.max_epochs 10
ssvae test -c configs/mnist/m1_classifier.yaml --ckpt_path /OUT/m1_classifier/seed0-n100/checkpoints/last.ckpt --seed_everything 0 --data.seed 0 --data.num_labelled 100 --data.data_dir /DATA --trainer.logger.init_args.save_dir /OUT --trainer.enable_progress_bar false
ssvae fit -c configs/mnist/m2.yaml --seed_everything 0 --data.seed 0 --data.num_labelled 100 --data.data_dir /DATA --trainer.logger.init_args.save_dir /OUT --trainer.logger.init_args.version seed0-n100 --trainer.enable_progress_bar false --trainer.max_epochs 25
ssvae test -c configs/mnist/m2.yaml --ckpt_path /OUT/m2/seed0-n100/checkpoints/last.ckpt --seed_everything 0 --data.seed 0 --data.num_labelled 100 --data.data_dir /DATA --trainer.logger.init_args.save_dir /OUT --trainer.enable_progress_bar false
ssvae fit -c configs/mnist/m1m2.yaml --model.init_args.vae_checkpoint /OUT/m1_vae/seed0/checkpoints/last.ckpt --seed_everything 0 --data.seed 0 --data.num_labelled 100 --data.data_dir /DATA --trainer.logger.init_args.save_dir /OUT --trainer.logger.init_args.version seed0-n100 --trainer.enable_progress_bar false --trainer.max_epochs 25
ssvae test -c configs/mnist/m1m2.yaml --ckpt_path /OUT/m1m2/seed0-n100/checkpoints/last.ckpt --seed_everything 0 --data.seed 0 --data.num_labelled 100 --data.data_dir /DATA --trainer.logger.init_args.save_dir /OUT --trainer.enable_progress_bar false
"""
# the sha256 of the 75 command lines (joined by newlines) of `--profile full --out /OUT --data-dir /DATA
# --trainer-args "--trainer.accelerator gpu --trainer.devices 1" --dry-run`, as printed before --dataset existed
MNIST_FULL_SHA256 = "31f2b1bdde8b715c4c4d56f7071e514f5618c0935828783f4d6b127554571c0e"


def dry_run_lines(capsys, *argv: str) -> list[str]:
    assert table1.main([*argv, "--dry-run"]) == 0
    return capsys.readouterr().out.splitlines()


def test_mnist_commands_are_byte_identical_to_before(capsys) -> None:
    """--dataset mnist (the default) prints the commands it printed before it knew other datasets (the tests now log
    beside their fits, without a version of their own);
    the default output folder is still lightning_logs/table1/<profile>."""
    fixed = ("--out", "/OUT", "--data-dir", "/DATA")  # absolute paths outside the repository: shown as they are
    quick = [line for line in dry_run_lines(capsys, "--profile", "quick", *fixed) if line.startswith("ssvae ")]
    assert "\n".join(quick) + "\n" == MNIST_QUICK
    assert [line for line in dry_run_lines(capsys, "--dataset", "mnist", "--profile", "quick", *fixed)
            if line.startswith("ssvae ")] == quick
    full = [line for line in dry_run_lines(capsys, "--profile", "full", *fixed, "--trainer-args",
                                           "--trainer.accelerator gpu --trainer.devices 1")
            if line.startswith("ssvae ")]
    assert len(full) == 75
    # the one change since: M1+M2's labelled batches of 100 above 100 labels (M1M2_LABELLED_BATCH), on 9 fits
    batch = " --data.labelled_batch_size 100"
    assert sum(batch in line for line in full) == 9
    before = [line.replace(batch, "") for line in full]
    assert hashlib.sha256("\n".join(before).encode()).hexdigest() == MNIST_FULL_SHA256

    lines = dry_run_lines(capsys, "--profile", "full")
    assert lines[0].startswith("Table 1 sweep (full): models m1 m2 m1m2, labels 100 600 1000 3000, seeds 0 1 2;")
    assert "under lightning_logs/table1/full " in lines[1]
    assert all(option(shlex.split(line), "--trainer.logger.init_args.save_dir") == "lightning_logs/table1/full"
               for line in lines if line.startswith("ssvae "))


def test_dry_run_of_svhn_quick_stacks_the_quick_colour_preset(tmp_path: Path, capsys) -> None:
    """--dataset svhn --profile quick: the svhn configs with quick_colour.yaml right after them on every fit (not on
    the tests), 1000 labels, the short epochs, --data-dir on every stage, runs under the configs' svhn logger names."""
    out, data = (tmp_path / "out").resolve(), (tmp_path / "data").resolve()
    lines = dry_run_lines(capsys, "--dataset", "svhn", "--profile", "quick", "--out", str(out), "--data-dir", str(data))
    assert not out.exists()
    text = "\n".join(lines)
    assert "ssvae fit -c configs/svhn/m1_vae.yaml -c configs/presets/quick_colour.yaml " in text
    assert lines[0].startswith("Table 1 sweep (svhn, quick): models m1 m2 m1m2, labels 1000, seeds 0;")
    commands = [shlex.split(line)[1:] for line in lines if line.startswith("ssvae ")]
    assert [(c[0], option(c, "-c")) for c in commands] == [
        ("fit", "configs/presets/quick_colour.yaml"),
        ("fit", "configs/presets/quick_colour.yaml"), ("test", "configs/svhn/m1_classifier.yaml"),
        ("fit", "configs/presets/quick_colour.yaml"), ("test", "configs/svhn/m2.yaml"),
        ("fit", "configs/presets/quick_colour.yaml"), ("test", "configs/svhn/m1m2.yaml")]
    stage_configs = ["m1_vae", "m1_classifier", "m1_classifier", "m2", "m2", "m1m2", "m1m2"]
    for command, name in zip(commands, stage_configs):
        assert command[1:3] == ["-c", f"configs/svhn/{name}.yaml"]
        if command[0] == "fit":
            assert command[3:5] == ["-c", "configs/presets/quick_colour.yaml"]
        else:
            assert command.count("-c") == 1
        assert option(command, "--data.data_dir") == str(data)
        assert option(command, "--data.num_labelled") == (None if name == "m1_vae" else "1000")
    assert [option(c, "--trainer.max_epochs") for c in commands if c[0] == "fit"] == ["5", "10", "5", "10"]

    vae_ckpt = str(out / "svhn_m1_vae" / "seed0" / "checkpoints" / "last.ckpt")
    assert [option(c, "--model.init_args.vae_checkpoint") for c in commands if c[0] == "fit"] == [
        None, vae_ckpt, None, vae_ckpt]
    assert [option(c, "--ckpt_path") for c in commands if c[0] == "test"] == [
        str(out / f"svhn_{name}" / "seed0-n1000" / "checkpoints" / "last.ckpt")
        for name in ("m1_classifier", "m2", "m1m2")]

    runs = plan.plan_runs(["m1", "m2", "m1m2"], [1000], [0], plan.Settings(
        out=out, data_dir=data, epochs=plan.EPOCHS["quick_colour"], extra_args={}, trainer_args=(),
        dataset="svhn", fit_configs=(plan.QUICK_COLOUR,)))
    assert [run.test.run_dir.relative_to(out).parts[0] for run in runs] == [
        "svhn_m1_classifier", "svhn_m2", "svhn_m1m2"]
    assert plan.logger_name("vae", "svhn") == "svhn_m1_vae" and plan.logger_name("vae") == "m1_vae"
    assert plan.logger_name("m2", "cifar10") == "cifar10_m2" and plan.logger_name("m2", "mnist") == "m2"

    default = dry_run_lines(capsys, "--dataset", "svhn", "--profile", "quick")
    assert "under lightning_logs/table1/svhn-quick " in default[1]


def test_plan_of_cifar10_full_uses_4000_labels(tmp_path: Path, capsys) -> None:
    """--dataset cifar10 --profile full: 4000 labels, seeds 0 1 2, the full epochs, no quick preset; --labels still
    overrides the dataset's default."""
    out = tmp_path.resolve()
    commands = dry_run_commands(capsys, "--dataset", "cifar10", "--profile", "full", "--out", str(out))
    assert len(commands) == 3 + 2 * 3 * 3
    assert all(option(c, "-c").startswith("configs/cifar10/") and c.count("-c") == 1 for c in commands)
    assert {option(c, "--data.num_labelled") for c in commands} == {None, "4000"}
    assert {option(c, "--data.seed") for c in commands} == {"0", "1", "2"}
    epochs = {option(c, "-c"): option(c, "--trainer.max_epochs") for c in commands if c[0] == "fit"}
    assert epochs == {"configs/cifar10/m1_vae.yaml": "100", "configs/cifar10/m1_classifier.yaml": "50",
                      "configs/cifar10/m2.yaml": "300", "configs/cifar10/m1m2.yaml": "300"}
    assert option(commands[1], "--model.init_args.vae_checkpoint") == str(
        out / "cifar10_m1_vae" / "seed0" / "checkpoints" / "last.ckpt")

    quick = dry_run_commands(capsys, "--dataset", "cifar10", "--profile", "quick", "--out", str(out))
    assert {option(c, "--data.num_labelled") for c in quick} == {None, "4000"}
    assert all(c[3:5] == ["-c", "configs/presets/quick_colour.yaml"] for c in quick if c[0] == "fit")
    chosen = dry_run_commands(capsys, "--dataset", "cifar10", "--labels", "250", "--out", str(out))
    assert {option(c, "--data.num_labelled") for c in chosen} == {None, "250"}


def colour_summary() -> dict:
    records = [{"model": m, "num_labelled": n, "seed": s, "test_error": e, "test_acc": 1 - e / 100}
               for m, n, s, e in [("m1", 1000, 0, 60.0), ("m2", 1000, 0, 50.0), ("m1m2", 1000, 0, 40.0),
                                  ("m1m2", 1000, 1, 42.0), ("m1m2", 4000, 0, 30.0)]]
    return report.summarise(records)


def table_rows(text: str) -> dict[str, str]:
    return {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}


def test_write_table_of_svhn_quotes_the_paper_only_for_m1m2_at_1000(tmp_path: Path) -> None:
    text = report.write_table(colour_summary(), [1000, 4000], tmp_path / "table1.md", "python x", "svhn")
    assert text.splitlines()[0].startswith("# SVHN test error (%)")
    assert "MNIST" not in text and "M1+TSVM" not in text
    rows = table_rows(text)
    assert list(rows) == ["model", "M1 + classifier", "M2", "M1+M2"]
    assert "41.00 ± 1.41 (2 seeds) \\| 36.02 ± 0.10" in rows["M1+M2"]
    assert "30.00 ± 0.00 (1 seed) \\| —" in rows["M1+M2"]
    assert "60.00 ± 0.00 (1 seed) \\| —" in rows["M1 + classifier"]
    assert "50.00 ± 0.00 (1 seed) \\| —" in rows["M2"]
    paper_cells = [cell.split(" \\| ")[1] for row in list(rows.values())[1:]
                   for cell in row.strip("| ").split(" | ")[1:]]
    assert paper_cells == ["—", "—", "—", "—", "36.02 ± 0.10", "—"]  # the paper's only SVHN figure we quote
    assert text.count("36.02") == 1


def test_write_table_and_plot_of_cifar10_have_no_paper_figures(tmp_path: Path, monkeypatch) -> None:
    text = report.write_table(colour_summary(), [1000, 4000], tmp_path / "table1.md", "python x", "cifar10")
    assert text.splitlines()[0].startswith("# CIFAR-10 test error (%)") and "not in" in text
    rows = table_rows(text)
    for row in list(rows.values())[1:]:
        assert all(cell.endswith("\\| —") for cell in row.strip("| ").split(" | ")[1:])

    import matplotlib.pyplot as plt

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    for dataset in ("cifar10", "svhn", "mnist"):
        path = tmp_path / f"{dataset}.png"
        report.plot(colour_summary(), path, dataset)
        assert path.read_bytes()[:8] == PNG_SIGNATURE
    legends = [[t.get_text() for t in fig.axes[0].get_legend().get_texts()] for fig in figures]
    titles = [fig.axes[0].get_title() for fig in figures]
    assert [label for label in legends[0] if "paper" in label] == []
    assert [label for label in legends[1] if "paper" in label] == ["M1+M2 (paper)"]
    assert len([label for label in legends[2] if "paper" in label]) == 3
    assert titles[0].startswith("CIFAR-10") and titles[1].startswith("SVHN") and titles[2].startswith("MNIST")


def test_svhn_sweep_with_faked_stages_writes_its_dataset(tmp_path: Path, monkeypatch, capsys) -> None:
    """A whole svhn quick sweep with every `ssvae` stage faked (a no-op process) and a made-up test accuracy: the
    outputs name SVHN and record the dataset and its paper figures."""
    monkeypatch.setattr(run, "SSVAE", [sys.executable, "-c", "pass"])
    monkeypatch.setattr(records, "read_test_accuracy", lambda stage: 0.625)
    out = tmp_path / "out"
    assert table1.main(["--dataset", "svhn", "--out", str(out)]) == 0
    capsys.readouterr()
    results = json.loads((out / "table1.json").read_text())
    assert results["dataset"] == "svhn" and results["profile"] == "quick" and results["labels"] == [1000]
    assert results["paper"] == {"m1m2": {"1000": {"mean": 36.02, "std": 0.10}}}
    assert results["epochs"] == {"vae": 5, "m1": 10, "m2": 5, "m1m2": 10}
    assert [r["test_error"] for r in results["runs"]] == [pytest.approx(37.5)] * 3
    table = (out / "table1.md").read_text()
    assert table.startswith("# SVHN test error (%)") and "37.50 ± 0.00 (1 seed) \\| 36.02 ± 0.10" in table
    assert (out / "table1.png").read_bytes()[:8] == PNG_SIGNATURE
    cache = json.loads((out / "results.json").read_text())
    assert cache["vae-seed0-fit"]["args"][:5] == [
        "fit", "-c", "configs/svhn/m1_vae.yaml", "-c", "configs/presets/quick_colour.yaml"]


def test_report_tables_the_finished_runs_without_running_anything(tmp_path: Path, monkeypatch, capsys) -> None:
    """--report on a sweep cut short: the table, its JSON and the docs section hold the runs whose test finished;
    no stage runs, and the command shown is the sweep's own."""
    monkeypatch.setattr(run, "SSVAE", [sys.executable, "-c", "pass"])
    monkeypatch.setattr(records, "read_test_accuracy", lambda stage: 0.96)
    out, docs = tmp_path / "out", tmp_path / "results.md"
    assert table1.main(["--profile", "quick", "--models", "m2", "--out", str(out)]) == 0
    cache = json.loads((out / "results.json").read_text())
    cache["m1m2-seed0-n100-fit"] = cache["m2-seed0-n100-fit"]  # an M1+M2 fit whose test has not run
    (out / "results.json").write_text(json.dumps(cache))
    monkeypatch.setattr(run, "SSVAE", [sys.executable, "-c", "raise SystemExit(3)"])  # nothing may run
    capsys.readouterr()
    assert table1.main(["--profile", "quick", "--models", "m2", "m1m2", "--out", str(out), "--report",
                        "--docs", str(docs)]) == 0
    assert "1 of 2 runs finished" in capsys.readouterr().out
    results = json.loads((out / "table1.json").read_text())
    assert [(r["model"], r["test_error"]) for r in results["runs"]] == [("m2", pytest.approx(4.0))]
    section = docs.read_text()
    assert "| M2 | 4.00 ± 0.00 (1 seed)" in section and "--report" not in section
    assert "![test error against the number of labels](runs/table1-quick.png)" in section
    assert (tmp_path / "runs" / "table1-quick.png").read_bytes() == (out / "table1.png").read_bytes()
    assert f"`python scripts/reproduce_table1.py --profile quick --models m2 m1m2 --out {out} --docs {docs}`" in section
    empty = tmp_path / "empty"
    assert table1.main(["--profile", "quick", "--out", str(empty), "--report"]) == 1
    assert "no run of this sweep has finished yet" in capsys.readouterr().err


def test_a_sweep_resumes_from_its_record_in_a_fresh_clone(tmp_path: Path, monkeypatch, capsys) -> None:
    """The record of finished stages (--record; docs/runs/ by default, kept in git) is all a fresh clone has: its
    finished tests are skipped, and a seed's VAE, whose checkpoint is gone, trains again only for the classifiers
    still to run; the classifiers recorded on the lost VAE then train again on the new one, so that the seed's
    figures all come from one VAE."""
    def fake_run(stage, log_file, threads=None) -> float:
        note(tmp_path, stage.key)
        if stage.args[0] == "fit":
            stage.checkpoint.parent.mkdir(parents=True, exist_ok=True)
            stage.checkpoint.write_bytes(b"ckpt")
        return 1.0

    monkeypatch.setattr(run, "run_stage", fake_run)
    monkeypatch.setattr(records, "read_test_accuracy", lambda stage: 0.9)
    record, out = tmp_path / "record.json", tmp_path / "out"
    args = ["--profile", "quick", "--models", "m1", "--record", str(record), "--out", str(out)]
    assert table1.main(args) == 0
    assert ran(tmp_path) == ["vae-seed0-fit", "m1-seed0-n100-fit", "m1-seed0-n100-test"]
    assert set(json.loads(record.read_text())) == {"vae-seed0-fit", "m1-seed0-n100-fit", "m1-seed0-n100-test"}

    shutil.rmtree(out)  # a fresh clone: the record, no runs; the budget of 100 labels is done
    assert table1.main(args) == 0
    assert ran(tmp_path) == []
    shutil.rmtree(out)  # one more budget there: its classifier needs the VAE, which trains again, and so does 100's
    assert table1.main([*args, "--labels", "100", "600"]) == 0
    assert ran(tmp_path) == ["vae-seed0-fit", "m1-seed0-n100-fit", "m1-seed0-n100-test", "m1-seed0-n600-fit",
                   "m1-seed0-n600-test"]
    printed = capsys.readouterr().out
    assert "vae-seed0-fit: recorded as done, but its checkpoint is gone" in printed
    assert "m1-seed0-n100-test: recorded as done on a fit that runs again: runs again" in printed
    assert json.loads((out / "table1.json").read_text())["summary"]["m1"].keys() == {"100", "600"}


def test_two_sweeps_of_one_record_side_by_side_keep_each_others_records(tmp_path: Path, monkeypatch) -> None:
    """While a sweep trains its seed's VAE, a job of another sweep of the same record (M2's) records its stage: the
    record keeps both. The first sweep's VAE was lost (a fresh clone), so the classifier recorded on it is dropped
    from the record at once, before its VAE's job starts."""
    record, out = tmp_path / "record.json", tmp_path / "out"
    args = ["--profile", "quick", "--record", str(record), "--out", str(out)]

    def fake_run(stage, log_file, threads=None) -> float:
        if stage.args[0] == "fit":
            stage.checkpoint.parent.mkdir(parents=True, exist_ok=True)
            stage.checkpoint.write_bytes(b"ckpt")
        if stage.key == "vae-seed0-fit" and record.is_file():  # the second sweep's VAE: the other sweep's job ends
            note(tmp_path, stage.key, recorded=sorted(json.loads(record.read_text())))
            records.update_records(record, {"m2-seed0-n100-fit": {"args": ["fit"], "seconds": 1.0}})
        return 1.0

    monkeypatch.setattr(run, "run_stage", fake_run)
    monkeypatch.setattr(records, "read_test_accuracy", lambda stage: 0.9)
    monkeypatch.setattr(records, "fit_summary", lambda stage: {})
    assert table1.main([*args, "--models", "m1"]) == 0  # its VAE runs before anything is recorded
    assert noted(tmp_path) == []
    shutil.rmtree(out)  # a fresh clone: the VAE is gone; the classifier recorded on it must go too
    assert table1.main([*args, "--models", "m1", "--labels", "100", "600"]) == 0
    assert noted(tmp_path) == [{"key": "vae-seed0-fit", "recorded": []}]
    assert set(json.loads(record.read_text())) == {
        "vae-seed0-fit", "m1-seed0-n100-fit", "m1-seed0-n100-test", "m1-seed0-n600-fit", "m1-seed0-n600-test",
        "m2-seed0-n100-fit"}


def test_jobs_run_stages_side_by_side_each_after_the_fits_it_reads(tmp_path: Path, monkeypatch, capsys) -> None:
    """--jobs 2 on 4 cores: two stages at a time (never more), each with 2 threads; a classifier starts only after
    its seed's VAE is recorded, a test only after its fit; every stage is recorded once."""
    def fake_run(stage, log_file, threads=None) -> float:
        started = time.monotonic()  # one clock for every process
        time.sleep(0.6 if stage.args[0] == "fit" else 0.1)
        if stage.args[0] == "fit":
            stage.checkpoint.parent.mkdir(parents=True, exist_ok=True)
            stage.checkpoint.write_bytes(b"ckpt")
        note(tmp_path, stage.key, span=[started, time.monotonic()], threads=threads)
        return time.monotonic() - started

    monkeypatch.setattr(run, "run_stage", fake_run)
    monkeypatch.setattr(records, "read_test_accuracy", lambda stage: 0.9)
    monkeypatch.setattr(records, "fit_summary", lambda stage: {})
    monkeypatch.setattr(run.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    out = tmp_path / "out"
    assert table1.main(["--profile", "quick", "--seeds", "0", "1", "--jobs", "2", "--out", str(out)]) == 0
    assert "2 stages at a time, 2 threads each (OMP_NUM_THREADS)" in capsys.readouterr().out
    stages = plan.unique_stages(plan.plan_runs(
        ["m1", "m2", "m1m2"], [100], [0, 1], plan.Settings(out=out, data_dir=REPO / "data",
                                                          epochs=plan.EPOCHS["quick"], extra_args={},
                                                          trainer_args=())))
    spans = {entry["key"]: (*entry["span"], entry["threads"]) for entry in noted(tmp_path)}
    assert sorted(spans) == sorted(stage.key for stage in stages) == sorted(json.loads((out / "results.json").read_text()))
    assert {threads for _, _, threads in spans.values()} == {2}
    for stage in stages:
        for need in stage.needs:
            assert spans[stage.key][0] >= spans[need][1], (stage.key, need)
    at_once = [sum(start <= t < end for start, end, _ in spans.values()) for t, _, _ in spans.values()]
    assert max(at_once) == 2


def test_after_a_failed_stage_none_starts_and_the_running_one_is_recorded(tmp_path: Path, monkeypatch,
                                                                            capsys) -> None:
    """--jobs 2: M2's fit fails while the VAE trains beside it; the VAE finishes and is recorded, nothing else
    starts, and the sweep stops with M2's failure."""
    def fake_run(stage, log_file, threads=None) -> float:
        note(tmp_path, stage.key)
        if stage.key == "m2-seed0-n100-fit":
            raise records.StageFailed("m2-seed0-n100-fit failed (exit 3)")
        time.sleep(1.0)
        stage.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        stage.checkpoint.write_bytes(b"ckpt")
        return 1.0

    monkeypatch.setattr(run, "run_stage", fake_run)
    monkeypatch.setattr(records, "fit_summary", lambda stage: {})
    out = tmp_path / "out"
    assert table1.main(["--profile", "quick", "--jobs", "2", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert sorted(ran(tmp_path)) == ["m2-seed0-n100-fit", "vae-seed0-fit"]
    assert list(json.loads((out / "results.json").read_text())) == ["vae-seed0-fit"]
    assert "reproduce_table1: m2-seed0-n100-fit failed (exit 3)" in captured.err and "FAILED" in captured.out


def test_hours_start_only_the_stages_that_end_within_the_sitting(tmp_path: Path, monkeypatch, capsys) -> None:
    """--hours 0.5 of the hour profile (VAE 25 min, M1+M2 35, each plus 90 s): the three VAEs start, no M1+M2
    fit does; the sweep says what is left and exits 0. A stage without a time limit starts whatever the hours."""
    def fake_run(stage, log_file, threads=None) -> float:
        note(tmp_path, stage.key)
        stage.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        stage.checkpoint.write_bytes(b"ckpt")
        return 1.0

    monkeypatch.setattr(run, "run_stage", fake_run)
    monkeypatch.setattr(records, "fit_summary", lambda stage: {})
    monkeypatch.setattr(records, "read_test_accuracy", lambda stage: 0.97)
    out = tmp_path / "out"
    assert table1.main(["--profile", "hour", "--hours", "0.5", "--out", str(out)]) == 0
    assert sorted(ran(tmp_path)) == ["vae-seed0-fit", "vae-seed1-fit", "vae-seed2-fit"]
    printed = capsys.readouterr().out
    assert "6 stages would not end within --hours: rerun the same command" in printed
    assert "No run of this sweep has finished yet" in printed
    assert table1.main(["--profile", "hour", "--hours", "0.7", "--seeds", "0", "--out", str(out)]) == 0
    assert ran(tmp_path) == ["m1m2-seed0-n100-fit", "m1m2-seed0-n100-test"]
    assert plan.stage_seconds(plan.Stage("m2-seed0-n100-fit", ("fit", "--trainer.max_epochs", "5"), out)) is None
    assert plan.stage_seconds(plan.Stage("x", ("fit", "--trainer.max_time", "01:02:03:04"), out)) == \
        93784 + plan.STAGE_MARGIN


def test_a_stage_run_side_by_side_gets_its_share_of_the_threads(tmp_path: Path, monkeypatch) -> None:
    """run_stage with threads: the `ssvae` process sees OMP_NUM_THREADS (and MKL's) set to it."""
    monkeypatch.setattr(run, "SSVAE", [sys.executable, "-c", "import os; print('threads', "
                                          "os.environ['OMP_NUM_THREADS'], os.environ['MKL_NUM_THREADS'])"])
    stage = plan.Stage(key="m2-seed0-n100-test", args=("test",), run_dir=tmp_path / "run")
    run.run_stage(stage, tmp_path / "log.txt", threads=3)
    assert "threads 3 3" in (tmp_path / "log.txt").read_text()


def test_fit_summary_reads_a_runs_events(tmp_path: Path) -> None:
    """A finished fit's record carries what its TensorBoard events say: epochs, the median epoch, the last val/acc
    with the best, val/elbo and the active units; a run without events gives an empty summary."""
    from torch.utils.tensorboard import SummaryWriter

    stage = plan.Stage(key="m1m2-seed0-n100-fit", args=("fit",), run_dir=tmp_path / "run")
    assert records.fit_summary(stage) == {}
    writer = SummaryWriter(str(stage.run_dir))
    for epoch, (seconds, acc) in enumerate([(4.0, 0.90), (3.0, 0.97), (5.0, 0.95)]):
        writer.add_scalar("time/epoch_seconds", seconds, epoch)
        writer.add_scalar("val/acc", acc, epoch)
    writer.close()
    assert records.fit_summary(stage) == {"epochs": 3, "median_epoch_seconds": 4.0, "val/acc": 0.95,
                                         "best val/acc": 0.97}


@pytest.mark.parametrize("dataset, edited", [("mnist", "configs/mnist/m1_vae.yaml"),
                                             ("svhn", "configs/colour/conv_vae.yaml")])  # a file m1_vae.yaml names
def test_a_record_made_with_another_config_stops_the_sweep(tmp_path: Path, monkeypatch, capsys, dataset: str,
                                                           edited: str) -> None:
    """A finished stage is not reused once a config it read has changed, whether a ``-c`` file, one that a config
    includes, or one of the fit whose checkpoint it reads (the VAE's, for M1's classifier and its test): the resumed
    sweep stops and names the stage and the file, and --dry-run says so, instead of tabling results of the old
    recipe as the new one's."""
    root = tmp_path / "repo"
    shutil.copytree(plan.ROOT / "configs", root / "configs")
    monkeypatch.setattr(plan, "ROOT", root)
    monkeypatch.setattr(run, "SSVAE", [sys.executable, "-c", "pass"])
    monkeypatch.setattr(records, "read_test_accuracy", lambda stage: 0.9)
    args = ["--dataset", dataset, "--profile", "quick", "--models", "m1", "--record", str(tmp_path / "record.json"),
            "--out", str(tmp_path / "out")]
    assert table1.main(args) == 0
    assert table1.main(args) == 0  # unchanged: every stage skipped
    assert capsys.readouterr().out.count("skip (done") == 3
    vae_config = root / edited
    vae_config.write_text(vae_config.read_text() + "# edited\n")
    assert table1.main(args) == 1
    err = capsys.readouterr().err
    assert "vae-seed0-fit" in err and edited in err and "--out" in err
    assert table1.main([*args, "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "vae-seed0-fit  (recorded with another config: would stop)" in " ".join(lines)
    # the classifier's own config is unchanged, but it was trained on the VAE of the old one
    assert sum("(recorded with another config: would stop)" in line for line in lines) == 3
    assert not any("(done: would skip)" in line for line in lines)
    assert table1.main([*args, "--epochs", "vae=3", "--dry-run"]) == 0
    assert "vae-seed0-fit  (recorded with another command: would stop)" in capsys.readouterr().out


# ---- stopping: Ctrl-C, and SLURM's submission ----------------------------------------------------------------------


def test_ctrl_c_stops_the_running_stages_and_records_nothing_of_them(tmp_path: Path, monkeypatch, capsys) -> None:
    """Ctrl-C while two local stage jobs run: both jobs' processes end, neither is recorded, and the sweep exits 1
    with one line saying so; also where the jobs ignore SIGINT, as the children of a process that ignores it do (a
    pytest-xdist worker, a shell's background job)."""
    def fake_run(stage, log_file, threads=None) -> float:
        note(tmp_path, stage.key, pid=os.getpid())
        time.sleep(60)
        return 60.0

    load_cache = run.load_cache

    def interrupted(path):  # the loop reads the records at every turn: Ctrl-C once both stages run
        if len(noted(tmp_path)) == 2:
            raise KeyboardInterrupt
        return load_cache(path)

    monkeypatch.setattr(run, "run_stage", fake_run)
    monkeypatch.setattr(run, "load_cache", interrupted)
    out = tmp_path / "out"
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the jobs
    try:
        assert table1.main(["--profile", "quick", "--jobs", "2", "--out", str(out)]) == 1
    finally:
        signal.signal(signal.SIGINT, handler)
    err = capsys.readouterr().err.strip()
    assert err == ("reproduce_table1: interrupted: stopped 2 running stages, which recorded nothing; rerun the same "
                   "command to resume from the records.")
    pids = [entry["pid"] for entry in noted(tmp_path)]
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, "a stage's job outlived Ctrl-C"
        time.sleep(0.1)
    assert not (out / "results.json").exists()


def alive(pid: int) -> bool:
    """Whether the process runs (an exited one that no parent has reaped yet, a zombie, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def fake_slurm(folder: Path, fail_at: int | None = None) -> Path:
    """sbatch, scancel and squeue that note their calls in ``folder``: sbatch answers job ids from 101 and fails at
    its ``fail_at``-th call."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sbatch").write_text(f"""#!/bin/bash
n=$(( $(cat {folder}/count 2>/dev/null || echo 0) + 1 )); echo $n > {folder}/count
[ "$n" = "{fail_at}" ] && {{ echo "sbatch: error: Batch job submission failed: Invalid partition name" >&2; exit 1; }}
echo "Submitted batch job $(( 100 + n ))"
""")
    (folder / "scancel").write_text(f'#!/bin/bash\necho "$@" >> {folder}/cancelled\n')
    (folder / "squeue").write_text("#!/bin/bash\n")
    for name in ("sbatch", "scancel", "squeue"):
        (folder / name).chmod(0o755)
    return folder


@pytest.mark.parametrize("how, why", [("fail", "failed (sbatch: error: Batch job submission failed: Invalid "
                                              "partition name)"),
                                      ("ctrl-c", "interrupted")])
def test_a_failed_or_interrupted_submission_cancels_what_it_submitted(tmp_path: Path, monkeypatch, capsys,
                                                                        how: str, why: str) -> None:
    """The third sbatch fails (or Ctrl-C comes during the third submission): the two jobs already submitted are
    cancelled, nothing is recorded as queued, and one line says what happened and that the same command submits
    again."""
    import submitit

    bin_dir = fake_slurm(tmp_path / "bin", fail_at=3 if how == "fail" else None)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    if how == "ctrl-c":
        submit, calls = submitit.SlurmExecutor.submit, []

        def interrupted(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return submit(self, *args, **kwargs)

        monkeypatch.setattr(submitit.SlurmExecutor, "submit", interrupted)
    out = tmp_path / "out"
    assert table1.main(["--profile", "quick", "--out", str(out), "--cluster", "slurm"]) == 1
    *slurms_own, err = capsys.readouterr().err.strip().splitlines()  # ours, after what sbatch itself printed
    assert slurms_own == (["sbatch: error: Batch job submission failed: Invalid partition name"] if how == "fail"
                          else [])
    assert err.startswith("reproduce_table1: submission ") and why in err
    assert err.endswith("cancelled the 2 jobs it had submitted; nothing of it is queued. Rerun the same command "
                        "to submit again.")
    assert (bin_dir / "cancelled").read_text().split() == ["101", "102"]
    assert not (out / "jobs.json").exists() and not (out / "results.json").exists()


def test_the_cluster_option_without_sbatch_says_so_and_submits_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    out = tmp_path / "out"
    assert table1.main(["--profile", "quick", "--out", str(out), "--cluster", "slurm"]) == 1
    assert capsys.readouterr().err.strip() == (
        "reproduce_table1: --cluster slurm needs SLURM's sbatch and squeue on PATH (on a cluster's login node); "
        "without --cluster the sweep runs on this machine.")
    assert not (out / "jobs").exists() and not (out / "jobs.json").exists()


def test_the_adgm_profile_fits_adgm_and_sdgm_three_hours_each_beside_their_papers_figures(capsys,
                                                                                          tmp_path: Path) -> None:
    """--profile adgm: ADGM and SDGM at 100 labels for seeds 0 1 2, each fit stopped at 3 hours, no VAE; their rows
    stand beside Maaløe et al. 2016's figures (0.96 and 1.32); a colour dataset refuses them."""
    commands = dry_run_commands(capsys, "--profile", "adgm", "--out", "/OUT")
    fits = [c for c in commands if c[0] == "fit"]
    assert [option(c, "-c") for c in fits] == ["configs/mnist/adgm.yaml", "configs/mnist/sdgm.yaml"] * 3
    assert {option(c, "--trainer.max_time") for c in fits} == {"00:03:00:00"}
    assert {option(c, "--data.num_labelled") for c in fits} == {"100"}
    records = [{"model": "adgm", "num_labelled": 100, "seed": s, "test_error": e} for s, e in ((0, 1.1), (1, 1.3))]
    text = report.write_table(report.summarise(records), [100], tmp_path / "t.md", "python x")
    assert "| ADGM (paper: ADGM, Maaløe et al. 2016) | 1.20 ± 0.14 (2 seeds) \\| 0.96 ± 0.02 |" in text
    with pytest.raises(SystemExit):
        table1.main(["--dataset", "svhn", "--models", "adgm", "--dry-run"])
    assert "their configs are MNIST's" in capsys.readouterr().err
