"""What a run shows in TensorBoard (ssvae_pl/callbacks/): the configs' callbacks write the documented scalar,
image and HParams tags and the projector's files; read back with tensorboard's own event reader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers.trainers import quiet_trainer
from ssvae_pl.callbacks import ConfusionMatrix, GenerativeImages, LatentSpace, grid_figure_inches
from ssvae_pl.models import M2, VAE
from ssvae_pl.results import read_scalars, read_tags
from test_cli import CLASSIFIER_CONFIG, REPO, SHORT_FIT, TINY_VAE, cli_data, data_args, ok  # noqa: F401
from helpers.cli import ssvae_here as ssvae

M2_CONFIG = str(REPO / "configs" / "mnist" / "m2.yaml")
TINY_M2 = ["--model.init_args.hidden_dims", "[16]", "--model.init_args.classifier_hidden_dims", "[16]",
           "--model.init_args.latent_dim", "3"]
HPARAMS = {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"}


def projector_files(run: Path) -> set[str]:
    return {p.name for p in run.rglob("*") if p.is_file() and p.name in {"tensors.tsv", "metadata.tsv",
                                                                        "sprite.png", "projector_config.pbtxt"}}


def test_m2_run_writes_its_pictures_embedding_and_hparams(tmp_path: Path, cli_data: Path) -> None:
    """``ssvae fit`` then ``ssvae test`` of the M2 config: scalars, the four M2 image grids, the latent PCA, the
    confusion matrix, the projector's files, and the HParams summary with the final val and test metrics."""
    data = data_args(cli_data)
    ok(ssvae(tmp_path, "fit", "-c", M2_CONFIG, *data, *TINY_M2, *SHORT_FIT))
    run = tmp_path / "lightning_logs" / "m2" / "version_0"
    tags = read_tags(run)
    for name in ("elbo_labelled", "elbo_unlabelled", "classification", "loss"):
        assert f"train/{name}_epoch" in tags["scalars"]
    assert {"val/acc", "val/elbo", "time/epoch_seconds", "hparams/val_acc", "hparams/val_elbo"} <= tags["scalars"]
    assert tags["images"] >= {"images/reconstructions", "images/class_samples", "images/analogies", "latent/pca",
                              "val/confusion_matrix"}
    assert "images/prior_samples" not in tags["images"]
    assert HPARAMS <= tags["hparams"]
    assert projector_files(run) == {"tensors.tsv", "metadata.tsv", "sprite.png", "projector_config.pbtxt"}
    assert read_scalars(run)["hparams/val_acc"] == pytest.approx(read_scalars(run)["val/acc"])

    ckpt = run / "checkpoints" / "last.ckpt"
    ok(ssvae(tmp_path, "test", "-c", M2_CONFIG, *data, "--ckpt_path", str(ckpt)))
    tested = read_tags(run)  # the test's metrics go into the checkpoint's own run folder
    assert {"test/acc", "test/elbo", "hparams/test_acc"} <= tested["scalars"] and HPARAMS <= tested["hparams"]


def test_m1_runs_write_their_pictures(tmp_path: Path, cli_data: Path) -> None:
    """The VAE: reconstructions, prior samples and the latent space; the latent classifier: the latent space and
    the confusion matrix, no generated images."""
    data = data_args(cli_data)
    ok(ssvae(tmp_path, "fit", "-c", str(REPO / "configs" / "mnist" / "m1_vae.yaml"), *data, *TINY_VAE, *SHORT_FIT))
    vae_run = tmp_path / "lightning_logs" / "m1_vae" / "version_0"
    vae_tags = read_tags(vae_run)
    assert vae_tags["images"] == {"images/reconstructions", "images/prior_samples", "latent/pca"}
    assert {"hparams/val_elbo", "val/elbo", "val/knn_acc"} <= vae_tags["scalars"] and HPARAMS <= vae_tags["hparams"]

    ok(ssvae(tmp_path, "fit", "-c", CLASSIFIER_CONFIG, *data, *SHORT_FIT,
             "--model.vae_checkpoint", str(vae_run / "checkpoints" / "last.ckpt")))
    classifier_tags = read_tags(tmp_path / "lightning_logs" / "m1_classifier" / "version_0")
    assert classifier_tags["images"] == {"latent/pca", "val/confusion_matrix"}
    assert {"val/acc", "hparams/val_acc"} <= classifier_tags["scalars"]


def pixels(num_rows: int, per_row: int) -> tuple[int, int]:
    """(height, width) in TensorBoard of a grid of MNIST tiles: its figure's inches at 100 pixels an inch."""
    width, height = grid_figure_inches(num_rows, per_row)
    return round(100 * height), round(100 * width)


def fit_with(callbacks, model, make_dm, tmp_path: Path, epochs: int) -> Path:
    from pytorch_lightning.loggers import TensorBoardLogger

    logger = TensorBoardLogger(str(tmp_path), name="run", version="v", default_hp_metric=False)
    trainer = quiet_trainer(max_epochs=epochs, limit_train_batches=1, limit_val_batches=2, logger=logger,
                            callbacks=callbacks)
    trainer.fit(model, datamodule=make_dm())
    return tmp_path / "run" / "v"


def image_steps(run: Path, tag: str) -> list[tuple[int, int, int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = []
    for file in run.glob("events.out.tfevents.*"):
        events = EventAccumulator(str(file), size_guidance={"images": 0})
        events.Reload()
        if tag in events.Tags()["images"]:
            out += [(e.step, e.height, e.width) for e in events.Images(tag)]
    return sorted(out)


def test_interval_and_bounded_image_counts(tmp_path: Path, make_dm) -> None:
    """``every_n_epochs: 2`` over 3 epochs draws after epochs 2 and 3 (the last); the grids hold ``num_images``
    validation images and ``num_samples`` samples of each class; the latent space takes at most ``num_images``."""
    torch.manual_seed(0)
    model = M2(hidden_dims=[16], classifier_hidden_dims=[16], latent_dim=3)
    images = GenerativeImages(every_n_epochs=2, num_images=5, num_samples=4)
    latent = LatentSpace(every_n_epochs=2, num_images=70, embedding=True)
    run = fit_with([images, latent, ConfusionMatrix(every_n_epochs=2)], model, make_dm, tmp_path, epochs=3)
    analogies = image_steps(run, "images/analogies")
    assert [step for step, _, _ in analogies] == [2, 3]  # one training batch per epoch
    assert analogies[0][1:] == pixels(5, 11)  # 5 images, each with its K = 10 analogies
    assert image_steps(run, "images/class_samples")[0][1:] == pixels(10, 4)  # K rows of 4
    assert image_steps(run, "images/reconstructions")[0][1:] == pixels(2, 5)  # 5 images above their reconstructions
    assert [step for step, _, _ in image_steps(run, "val/confusion_matrix")] == [2, 3]
    rows = (run / "00002" / "latent" / "tensors.tsv").read_text().strip().splitlines()
    assert len(rows) == 64 + 6 and len(rows[0].split("\t")) == 3  # two validation batches of 64, cut to 70


def test_confusion_matrix_counts_the_validation_predictions_without_another_forward(make_dm) -> None:
    """The confusion matrix is built from what ``validation_step`` predicted: no second pass of the model over the
    validation images; its counts are those predictions against the labels."""
    torch.manual_seed(0)
    model = M2(hidden_dims=[16], classifier_hidden_dims=[16], latent_dim=3)
    calls = []
    forward = model.forward
    model.forward = lambda x: calls.append(len(x)) or forward(x)
    matrix = ConfusionMatrix(every_n_epochs=1)
    kept = []
    original = ConfusionMatrix.on_validation_epoch_end

    def keep(self, trainer, pl_module):
        kept.append(self.matrix.compute().clone())
        original(self, trainer, pl_module)

    matrix.on_validation_epoch_end = keep.__get__(matrix)
    dm = make_dm()
    quiet_trainer(callbacks=[matrix], logger=False).validate(model, datamodule=dm)
    assert calls == []
    x, y = zip(*dm.val_dataloader())
    model.forward = forward
    with torch.no_grad():
        predicted = torch.cat([model(dm.on_after_batch_transfer((b, t), 0)[0]).argmax(-1) for b, t in zip(x, y)])
    expected = torch.zeros(10, 10, dtype=torch.long)
    expected.index_put_((torch.cat(y), predicted), torch.ones_like(predicted), accumulate=True)
    assert torch.equal(kept[0].cpu(), expected)


def test_vae_prior_samples_grid(tmp_path: Path, make_dm) -> None:
    """The VAE's prior samples: a num_samples x num_samples grid."""
    torch.manual_seed(0)
    run = fit_with([GenerativeImages(num_samples=3)], VAE(hidden_dims=[16], latent_dim=2), make_dm, tmp_path, 1)
    assert image_steps(run, "images/prior_samples") == [(1, *pixels(3, 3))]


def test_bad_callback_settings_are_config_errors() -> None:
    from ssvae_pl.errors import ConfigError

    with pytest.raises(ConfigError, match="every_n_epochs"):
        GenerativeImages(every_n_epochs=0)
    with pytest.raises(ConfigError, match="num_images"):
        LatentSpace(num_images=-1)


class FigureWriter:
    """A SummaryWriter stand-in that keeps the figures it is given."""

    def __init__(self) -> None:
        self.figures: dict = {}

    def add_figure(self, tag, figure, step) -> None:
        self.figures[tag] = figure

    def add_embedding(self, *args, **kwargs) -> None:
        pass


def texts(figure) -> dict[str, list[str]]:
    axes = figure.axes[0]
    return {"title": [axes.get_title()], "x": [axes.get_xlabel()], "y": [axes.get_ylabel()],
            "xticks": [t.get_text() for t in axes.get_xticklabels()],
            "yticks": [t.get_text() for t in axes.get_yticklabels()]}


def test_pictures_name_their_rows_columns_axes_and_latent() -> None:
    """Class grids name their rows by class, analogies their columns; the PCA names its axes and which latent it
    shows; reconstructions are large enough to see (0.45 inch a digit)."""
    torch.manual_seed(0)
    names = [f"c{k}" for k in range(10)]
    model = M2(hidden_dims=[16], classifier_hidden_dims=[16], latent_dim=3, class_names=names).eval()
    x, y = torch.rand(4, 1, 28, 28), torch.arange(4)
    writer = FigureWriter()
    GenerativeImages(num_samples=3).draw(writer, model, x, y, step=1)
    LatentSpace(embedding=False).draw(writer, model, x, y, step=1)
    assert texts(writer.figures["images/class_samples"])["yticks"] == names
    assert texts(writer.figures["images/analogies"])["xticks"] == ["input", *names]
    assert texts(writer.figures["images/reconstructions"])["yticks"] == ["input", "reconstruction"]
    assert writer.figures["images/reconstructions"].get_size_inches()[1] >= 0.45 * 2
    pca = texts(writer.figures["latent/pca"])
    assert pca["x"][0].startswith("PC 1 (") and pca["y"][0].startswith("PC 2 (")
    assert "M2's z, mean of q(z|x,y)" in pca["title"][0]
