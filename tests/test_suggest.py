"""``ssvae suggest``: the strategies' scores and picks, the CSV and contact sheet of a tiny M2's suggestions (never a
labelled or validation image), links for an image folder, and one error line for each bad input."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers.cli import ssvae_here
from helpers.image_folders import write_image_folders
from ssvae_pl import ranking
from test_cli import REPO, cli_data, data_args, ok  # noqa: F401  (cli_data is a fixture)

M2 = str(REPO / "configs" / "mnist" / "m2.yaml")
VAE = str(REPO / "configs" / "mnist" / "m1_vae.yaml")
CLASSIFIER = str(REPO / "configs" / "mnist" / "m1_classifier.yaml")
TINY_M2 = ["--model.init_args.hidden_dims", "[16]", "--model.init_args.classifier_hidden_dims", "[16]",
           "--model.init_args.latent_dim", "4", "--data.labelled_batch_size", "20"]
QUICK = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
         "--trainer.enable_model_summary", "false"]


def test_entropy_and_margin_score_uncertain_images_higher() -> None:
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.6, 0.3, 0.1]])
    assert ranking.scores("entropy", probs).tolist() == pytest.approx([0.0, math.log(2), math.log(3), 0.8979], abs=1e-4)
    assert ranking.margin(probs).tolist() == pytest.approx([0.0, 1.0, 1.0, 0.7])
    bounds = torch.tensor([[-90.0, -90.0, -200.0], [-80.0, -120.0, -130.0]])  # ambiguous, then sure, to the model
    assert ranking.scores("bound", probs[:2], bounds).tolist() == pytest.approx([math.log(2), 0.0], abs=1e-6)
    assert ranking.pick("margin", ranking.margin(probs), probs.argmax(-1), 2).tolist() == [1, 2]


def test_spread_takes_the_best_of_each_predicted_class_in_turn() -> None:
    """Six confused 0s and three 1s, 2s: spread's first three picks are one of each class, best score first."""
    score = torch.tensor([0.9, 0.95, 0.85, 0.8, 0.99, 0.7, 0.3, 0.2, 0.5, 0.4])
    predicted = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 2])
    assert ranking.pick("margin", score, predicted, 3).tolist() == [4, 1, 0]  # all 0s
    assert ranking.pick("spread", score, predicted, 7).tolist() == [4, 8, 6, 1, 9, 7, 0]


@pytest.fixture(scope="module")
def m2_run(tmp_path_factory: pytest.TempPathFactory, cli_data: Path) -> tuple[Path, Path]:
    """A tiny M2 fitted for two steps on the synthetic MNIST: (its folder, last.ckpt)."""
    cwd = tmp_path_factory.mktemp("m2_run")
    ok(ssvae_here(cwd, "fit", "-c", M2, *data_args(cli_data), *TINY_M2, *QUICK))
    return cwd, cwd / "lightning_logs" / "m2" / "version_0" / "checkpoints" / "last.ckpt"


def suggest(cwd: Path, data: Path, ckpt: Path, *args: str, config: str = M2):
    return ssvae_here(cwd, "suggest", "-c", config, *data_args(data), *TINY_M2, "--ckpt_path", str(ckpt), *args)


@pytest.mark.parametrize("strategy", ["margin", "bound", "spread"])
def test_suggest_writes_the_ranked_csv_and_the_contact_sheet(m2_run, cli_data: Path, strategy: str) -> None:
    """N = 20 of the synthetic MNIST's unlabelled training images: ranks 1..20, no labelled or validation image,
    scores in rank order (spread: by class turns), probabilities by class name summing to 1; the sheet holds 20
    captioned cells (two rows of ten)."""
    cwd, ckpt = m2_run
    out = cwd / f"{strategy}.csv"
    done = suggest(cwd, cli_data, ckpt, "--suggest.count", "20", "--suggest.output", str(out),
                   "--suggest.strategy", strategy)
    ok(done)
    assert f"ranked 400 unlabelled images by {strategy}" in done.stderr + done.stdout  # 500 minus 100 labelled
    rows = list(csv.DictReader(out.open()))
    assert [int(r["rank"]) for r in rows] == list(range(1, 21))
    assert list(rows[0]) == ["rank", "index", "score", "predicted", *(f"prob_{k}" for k in range(10))]
    record = json.loads((ckpt.parent.parent / "labelled_indices.json").read_text())
    chosen = {int(r["index"]) for r in rows}
    assert len(chosen) == 20 and not chosen & set(record["labelled_indices"]) and not chosen & set(
        record["val_indices"])
    scores = [float(r["score"]) for r in rows]
    if strategy != "spread":
        assert scores == sorted(scores, reverse=True)
    else:
        firsts = [r["predicted"] for r in rows][:len({r["predicted"] for r in rows})]
        assert len(set(firsts)) == len(firsts)  # one of each predicted class before any second
    for r in rows:
        assert sum(float(r[f"prob_{k}"]) for k in range(10)) == pytest.approx(1, abs=1e-4)
        assert r["predicted"] == str(max(range(10), key=lambda k: float(r[f"prob_{k}"])))
    sheet = Image.open(out.with_suffix(".png")).convert("L")
    assert sheet.size == (10 * 90, 2 * 102)  # 28-pixel digits at 3x (84) in cells of 90 x (84 + 18 for the caption)
    for k in range(20):  # every cell holds a digit (dark background) and its caption (dark text on white)
        x, y = (k % 10) * 90 + 3, (k // 10) * 102 + 2
        assert sheet.crop((x, y, x + 84, y + 84)).getextrema()[0] < 50
        assert sheet.crop((x, y + 85, x + 84, y + 100)).getextrema()[0] < 50  # antialiased black text


def test_bad_inputs_are_one_line_and_overwrite_nothing(m2_run, cli_data: Path, tmp_path: Path) -> None:
    cwd, ckpt = m2_run
    mine, fresh = tmp_path / "to_label.csv", tmp_path / "fresh.csv"
    mine.write_text("the user's own file\n")
    cases = [
        (fresh, ["--suggest.count", "0"], "suggest.count must be at least 1, got 0"),
        (fresh, ["--suggest.count", "401"], "suggest.count=401 exceeds the 400 unlabelled images"),
        (fresh, ["--suggest.strategy", "oracle"], "suggest.strategy must be one of entropy, margin, bound, spread"),
        (mine, [], f"{mine} already exists; pass --suggest.overwrite true"),
    ]
    for out, args, message in cases:
        done = suggest(cwd, cli_data, ckpt, "--suggest.output", str(out), *args)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert lines[-1].startswith("ssvae: error:") and message in lines[-1], lines[-1]
        assert mine.read_text() == "the user's own file\n" and not fresh.exists()
        assert not out.with_suffix(".png").exists()
    ok(suggest(cwd, cli_data, ckpt, "--suggest.output", str(mine), "--suggest.count", "5",
               "--suggest.overwrite", "true"))
    assert len(mine.read_text().splitlines()) == 6


def test_a_model_that_does_not_classify_or_lacks_the_bounds_is_refused(cli_data: Path, tmp_path: Path) -> None:
    """The VAE does not classify; M1's classifier has no L(x, y) for the bound strategy: one line each."""
    tiny_vae = ["--model.init_args.hidden_dims", "[16]", "--model.init_args.latent_dim", "4"]
    ok(ssvae_here(tmp_path, "fit", "-c", VAE, *data_args(cli_data), *tiny_vae, *QUICK))
    vae = tmp_path / "lightning_logs" / "m1_vae" / "version_0" / "checkpoints" / "last.ckpt"
    done = ssvae_here(tmp_path, "suggest", "-c", VAE, *data_args(cli_data), *tiny_vae, "--ckpt_path", str(vae),
                      "--suggest.output", str(tmp_path / "s.csv"))
    assert done.returncode == 2 and "ssvae: error: ssvae suggest ranks images by a classifier's q(y|x), and a VAE" \
        in done.stderr
    ok(ssvae_here(tmp_path, "fit", "-c", CLASSIFIER, *data_args(cli_data), "--model.init_args.vae_checkpoint",
                  str(vae), "--data.labelled_batch_size", "20", *QUICK))
    classifier = tmp_path / "lightning_logs" / "m1_classifier" / "version_0" / "checkpoints" / "last.ckpt"
    done = ssvae_here(tmp_path, "suggest", "-c", CLASSIFIER, *data_args(cli_data), "--ckpt_path", str(classifier),
                      "--data.labelled_batch_size", "20", "--suggest.strategy", "bound",
                      "--suggest.output", str(tmp_path / "s.csv"))
    assert done.returncode == 2 and "needs the bound L(x, y) of every class, which a LatentClassifier has not" \
        in done.stderr
    assert not (tmp_path / "s.csv").exists()
    ok(ssvae_here(tmp_path, "suggest", "-c", CLASSIFIER, *data_args(cli_data), "--ckpt_path", str(classifier),
                  "--data.labelled_batch_size", "20", "--suggest.output", str(tmp_path / "s.csv")))
    assert len((tmp_path / "s.csv").read_text().splitlines()) == 51


def test_an_image_folder_gets_its_unlabelled_files_ranked_and_linked(tmp_path: Path) -> None:
    """The folder's unlabelled files (never its labelled ones) by path, and a link to each in --suggest.link_dir in
    rank order; an empty --data.predict_dir is one error."""
    folders = write_image_folders(tmp_path / "photos", labelled_per_class=6, unlabelled=30)
    data = ["-c", str(REPO / "configs" / "image_folder" / "data.yaml"),
            "--data.dataset.labelled_dir", str(folders["labelled"]),
            "--data.dataset.unlabelled_dir", str(folders["unlabelled"]), "--data.dataset.test_dir",
            str(folders["test"]), "--data.val_size", "3", "--data.batch_size", "8", "--data.labelled_batch_size", "4",
            "--trainer.enable_progress_bar", "false"]
    ok(ssvae_here(tmp_path, "fit", "-c", M2, *data, *TINY_M2[:6], "--data.labelled_batch_size", "4", *QUICK))
    ckpt = tmp_path / "lightning_logs" / "m2" / "version_0" / "checkpoints" / "last.ckpt"
    args = ["suggest", "-c", M2, *data, *TINY_M2[:6], "--data.labelled_batch_size", "4", "--ckpt_path", str(ckpt)]
    ok(ssvae_here(tmp_path, *args, "--suggest.count", "5", "--suggest.output", str(tmp_path / "t.csv"),
                  "--suggest.link_dir", str(tmp_path / "to_label")))
    rows = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert all(r["file"].startswith("unlabelled/batch") for r in rows) and len(rows) == 5
    links = sorted((tmp_path / "to_label").iterdir())
    assert [link.name[:5] for link in links] == ["0001_", "0002_", "0003_", "0004_", "0005_"]
    assert [link.resolve() for link in links] == [(folders["unlabelled"] / r["file"].removeprefix("unlabelled/"))
                                                 .resolve() for r in rows]
    (tmp_path / "empty").mkdir()
    done = ssvae_here(tmp_path, *args, "--data.predict_dir", str(tmp_path / "empty"), "--suggest.output",
                      str(tmp_path / "e.csv"))
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("ssvae: error: data.predict_dir")
    assert not (tmp_path / "e.csv").exists()


def test_the_suggested_images_once_labelled_train_the_next_round(m2_run, cli_data: Path, tmp_path: Path) -> None:
    """The loop: the run's labelled indices plus the 20 suggested ones, named by --data.labelled_indices, are the
    next fit's labelled subset (recorded with where they came from); its validation hold-out is unchanged."""
    cwd, ckpt = m2_run
    ok(suggest(cwd, cli_data, ckpt, "--suggest.count", "20", "--suggest.output", str(tmp_path / "next.csv")))
    record = json.loads((ckpt.parent.parent / "labelled_indices.json").read_text())
    suggested = [int(r["index"]) for r in csv.DictReader((tmp_path / "next.csv").open())]
    (tmp_path / "round1.json").write_text(json.dumps(record["labelled_indices"] + suggested))
    ok(ssvae_here(tmp_path, "fit", "-c", M2, *data_args(cli_data), *TINY_M2, *QUICK, "--data.num_labelled", "120",
                  "--data.labelled_indices", str(tmp_path / "round1.json")))
    again = json.loads((tmp_path / "lightning_logs" / "m2" / "version_0" / "labelled_indices.json").read_text())
    assert again["labelled_indices"] == sorted(record["labelled_indices"] + suggested)
    assert again["val_indices"] == record["val_indices"] and again["labelled_from"] == str(tmp_path / "round1.json")
