"""scripts/benchmark.py end to end on the synthetic MNIST: every way of every model, the full `ssvae fit` epoch,
the limit columns, the JSON and the rendered docs section (a smoke test: the figures themselves are measured on
real data, alone on a machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_times_every_way_and_a_full_fit_and_renders_its_table(tmp_path: Path, shared_mnist_dir: Path,
                                                                         vae_checkpoint: Path) -> None:
    checkpoint = torch.load(vae_checkpoint, map_location="cpu", weights_only=False)
    checkpoint["state_dict"]["latent_mean_std"][:2] = 1.0  # two of the tiny VAE's dimensions count as active
    active_vae = tmp_path / "vae.ckpt"
    torch.save(checkpoint, active_vae)
    docs = tmp_path / "results.md"
    docs.write_text("# Results\n\nkept\n")
    out = tmp_path / "bench.json"
    command = [sys.executable, "scripts/benchmark.py", "--models", "vae", "m2", "m1m2", "--fit", "--breakdown",
               "--vae-checkpoint", str(active_vae), "--steps", "2", "--warmup", "1", "--repeats", "2",
               "--batch-size", "50", "--labelled-batch-size", "10", "--threads", "1", "--peak-size", "128",
               "--data-dir", str(shared_mnist_dir), "--data-option", "val_size=100", "--data-option", "download=false",
               "--data-option", "check_md5=false", "--json", str(out), "--docs", str(docs)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]

    rows = json.loads(out.read_text())["rows"]
    ways = {(row["model"], row["way"]) for row in rows}
    assert ways == {("vae", w) for w in ("reference", "lightning", "compiled", "fit")} \
        | {("m2", w) for w in ("reference", "lightning", "compiled", "naive", "fit")} \
        | {("m1m2", w) for w in ("reference", "lightning", "compiled", "uncached", "fit")}
    for row in rows:
        assert row["ms_per_step"] > 0 and row["limit_epoch_s"] > 0
        assert abs(row["vs_limit"] - row["epoch_s"] / row["limit_epoch_s"]) < 1e-9
    parts = json.loads(out.read_text())["breakdown"]
    assert {(p["model"], p["loop"]) for p in parts} == {(m, loop) for m in ("vae", "m2", "m1m2")
                                                        for loop in ("eager", "compiled")}
    for part in parts:  # the products take part of the step, and do its FLOPs at a positive rate
        assert 0 < part["products_ms"] < part["ms_per_step"] and part["products_gflop_per_s"] > 0
        assert abs(part["products_ms"] + part["rest_ms"] - part["ms_per_step"]) < 1e-6
    fit = next(row for row in rows if row["way"] == "fit" and row["model"] == "m2")
    assert 0 < fit["train_epoch_s"] <= fit["epoch_s"]  # the whole epoch holds its training loop
    assert 0 < fit["validation_s"] <= fit["epoch_s"] - fit["train_epoch_s"]  # and its validation, then checkpoints

    text = docs.read_text()
    assert text.startswith("# Results\n\nkept\n")
    assert "<!-- benchmark 32-true cpu -->" in text and "<!-- /benchmark 32-true cpu -->" in text
    assert "python scripts/benchmark.py --models vae m2 m1m2 --fit" in text
    assert text.count("| m2 | fit |") == 1 and "Machine: device cpu" in text
    assert text.count("| m2 | compiled | ") == 2  # the main table's way, and the breakdown's loop

    # the same table rendered again from its JSON alone (as one measured on another machine is): the same section
    again = tmp_path / "again.md"
    done = subprocess.run([sys.executable, "scripts/benchmark.py", "--render", str(out), "--docs", str(again)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    section = text[text.index("<!-- benchmark 32-true cpu -->"):]
    assert again.read_text().strip() == section.strip() and "--json" not in section


def test_a_section_of_its_own_leaves_the_main_table_in_place(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    import benchmark

    row = {"model": "m2", "way": "fit", "batch": "200+100", "images_per_s": 1.0, "ms_per_step": 1.0, "epoch_s": 2.0,
           "train_epoch_s": 1.5, "gflop_per_s": 1.0, "peak_gflop_per_s": 1.0, "limit_epoch_s": 1.0, "vs_limit": 2.0,
           "vs_reference": 1.0}
    docs = tmp_path / "results.md"
    docs.write_text("# Results\n\n<!-- benchmark bf16-mixed cpu -->\nthe main table\n<!-- /benchmark bf16-mixed cpu -->\n")
    argv = ["scripts/benchmark.py", "--models", "m2", "--fit", "--fit-compile", "true", "--precision", "bf16-mixed",
            "--section", "compiled", "--json", "x.json"]
    benchmark.render({"argv": argv, "setting": "a machine", "rows": [row]}, docs)
    text = docs.read_text()
    assert "the main table" in text
    section = text[text.index("<!-- benchmark bf16-mixed cpu compiled -->"):]
    assert "--section compiled" in section and "| m2 | fit |" in section and section.rstrip().endswith(
        "<!-- /benchmark bf16-mixed cpu compiled -->")


def test_repeated_fits_report_the_fit_of_median_ratio_each_beside_its_own_peak() -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    import benchmark

    fits = [{"epoch_s": 8.0, "train_epoch_s": 7.0, "peak_gflop_per_s": 400.0, "vs_limit": 1.6},
            {"epoch_s": 7.0, "train_epoch_s": 6.5, "peak_gflop_per_s": 300.0, "vs_limit": 1.05},
            {"epoch_s": 9.0, "train_epoch_s": 8.0, "peak_gflop_per_s": 330.0, "vs_limit": 1.49}]
    assert benchmark.median_fit(fits) == fits[2]  # the middle ratio, not the middle epoch (8.0 s)
    assert benchmark.median_fit(fits[:2]) == fits[1]  # an even count: the lower of the middle two
    row = {"model": "m2", "way": "fit", "batch": "200+100", "images_per_s": 1.0, "ms_per_step": 1.0, "epoch_s": 9.0,
           "train_epoch_s": 8.0, "gflop_per_s": 1.0, "peak_gflop_per_s": 330.0, "limit_epoch_s": 6.04,
           "vs_limit": 1.49, "vs_reference": 1.0, "fits": fits}
    lines = benchmark.table_lines([row])
    assert "| 9.0 | 1.0 s (11%) |" in lines[2]  # a record without the validation's own time: the two together
    assert benchmark.fit_shares({**row, "validation_s": 0.7}) == "0.7 s (8%); checkpoints 0.3 s (3%)"
    assert lines[-1] == ("m2 `fit`, the median of 3 fits, each beside its own peak (epoch, peak GFLOP/s, x limit): "
                         "7.00 s at 300 (1.05), 9.00 s at 330 (1.49), 8.00 s at 400 (1.60).")


def test_every_way_binarises_as_the_shipped_config(make_dm) -> None:
    """The plain loop's batches follow the data module's ``binarize``, which the benchmark sets from each model's
    config: the VAE's binarised afresh, M2's grey levels as they are, like the Lightning way and the fit."""
    sys.path.insert(0, str(REPO / "scripts"))
    import benchmark

    dm = make_dm(binarize="none")
    dm.setup("fit")
    batch = benchmark.Batches(dm, torch.device("cpu"), 20, 50)()["unlabelled"]
    lightning = dm.on_after_batch_transfer({"unlabelled": dm.unlabelled_dataset().__getitems__(list(range(50)))}, 0)
    for images in (batch, lightning["unlabelled"]):  # grey levels strictly between black and white survive
        assert ((images > 0) & (images < 1)).any()
    dm.hparams.binarize = "dynamic"
    batch = benchmark.Batches(dm, torch.device("cpu"), 20, 50)()["unlabelled"]
    assert ((batch == 0) | (batch == 1)).all()
    assert (benchmark.config_binarize("vae"), benchmark.config_binarize("m2")) == ("dynamic", "none")


def test_the_plain_loop_runs_without_lightnings_environment(make_dm, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference is the loop a user would write without Lightning: its steps run without the
    ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` that Lightning's import sets (an NVML lookup at every Adam step where CUDA
    is never initialised), which is put back afterwards."""
    sys.path.insert(0, str(REPO / "scripts"))
    import benchmark
    from ssvae_pl.host import NVML_CHECK

    monkeypatch.setenv(NVML_CHECK, "1")
    seen = []
    model = torch.nn.Linear(2, 1)
    monkeypatch.setattr(benchmark, "training_loss", lambda *a, **k: (seen.append(os.environ.get(NVML_CHECK)),
                                                                     model(torch.ones(1, 2)).sum())[1])
    benchmark.time_reference(model, lambda: {}, torch.device("cpu"), "32-true", warmup=1, steps=2)
    assert seen == [None] * 3 and os.environ[NVML_CHECK] == "1"


def test_adgm_and_sdgm_are_benchmarked_as_their_configs_train_them(make_dm) -> None:
    """ADGM's and SDGM's rows: the shipped configs' models and batches (100 unlabelled + 100 labelled, binarised
    afresh), their steps' FLOPs counted through the same loss the fit trains."""
    sys.path.insert(0, str(REPO / "scripts"))
    import benchmark

    assert benchmark.BATCHES["adgm"] == benchmark.BATCHES["sdgm"] == (100, 100)
    assert benchmark.config_binarize("adgm") == benchmark.config_binarize("sdgm") == "dynamic"
    dm = make_dm(binarize="dynamic")
    dm.setup("fit")
    batch = benchmark.Batches(dm, torch.device("cpu"), 10, 20)()
    for name, skip in (("adgm", False), ("sdgm", True)):
        model = benchmark.make_model(name, dm.num_train, tiny=True)
        assert type(model).__name__ == name.upper() and model.skip is skip
        model.set_data_sizes(10, dm.num_unlabelled, dm.num_train)
        assert benchmark.step_flops(model, batch) > 0
        assert torch.isfinite(benchmark.training_loss(model, batch))
