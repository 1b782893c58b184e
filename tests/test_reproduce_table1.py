"""scripts/reproduce_table1.py: the plan (one VAE per seed, shared), the table and plot, the cache, and one tiny
end-to-end sweep on the synthetic MNIST."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_synthetic_mnist

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
            assert command[0] == "test" and version == f"seed{seed}-n{n}-test"
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
    summary = table1.summarise(fabricated_records())
    assert summary["m2"][100].mean == pytest.approx(12.0) and summary["m2"][100].std == pytest.approx(2.0)
    assert summary["m2"][100].n == 3
    assert summary["m1m2"][100].mean == pytest.approx(4.5)
    assert summary["m1m2"][100].std == pytest.approx(0.7071, abs=1e-4)
    assert summary["m1m2"][600].n == 1 and summary["m1m2"][600].std == 0.0
    assert summary["m1"][3000].std == 0.0

    path = tmp_path / "table1.md"
    text = table1.write_table(summary, [100, 600, 1000, 3000], path, "python scripts/reproduce_table1.py --x")
    assert path.read_text() == text
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
    table1.plot(table1.summarise(fabricated_records()), path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_failed_stage_names_the_command_and_its_log(tmp_path: Path, monkeypatch, capsys) -> None:
    """A stage that fails stops the sweep with its command and log file; nothing is cached for it."""
    monkeypatch.setattr(table1, "SSVAE", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])
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
            "--model.init_args.latent_dim 4",
}


def run_script(cwd: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


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
    progress = [line for line in first.stdout.splitlines() if line.startswith("[")]
    assert [line.split()[1] for line in progress] == [
        "vae-seed0-fit", "m1-seed0-n100-fit", "m1-seed0-n100-test", "m1m2-seed0-n100-fit", "m1m2-seed0-n100-test"]
    assert all(" s" in line and "log:" in line for line in progress)
    for name in ("table1.md", "table1.png", "table1.json", "results.json"):
        assert (out / name).is_file(), name
    assert (out / "table1.png").read_bytes()[:8] == PNG_SIGNATURE
    assert (out / "logs" / "vae-seed0-fit.log").is_file() and (out / "logs" / "m1m2-seed0-n100-test.log").is_file()
    assert (out / "m1_vae" / "seed0" / "checkpoints" / "last.ckpt").is_file()
    assert (out / "m1m2" / "seed0-n100-test").is_dir()

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
    second = run_script(tmp_path, *args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert time.perf_counter() - started < 30
    assert sum("skip" in line for line in second.stdout.splitlines() if line.startswith("[")) == 5
    assert json.loads((out / "results.json").read_text()) == cache

    more_epochs = ["2" if arg == "1" and args[i - 1] == "--epochs" else arg for i, arg in enumerate(args)]
    changed = run_script(tmp_path, *more_epochs)
    assert changed.returncode == 1
    assert "different command" in changed.stderr and "vae-seed0-fit" in changed.stderr
