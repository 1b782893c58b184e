"""``data.dataset: ImageFolder``: the user's own folders of images, through the data module and the ``ssvae``
command (fit, test, predict with class names). The folders are small PNGs written by ``helpers/image_folders.py``."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from helpers.image_folders import CLASSES, write_image_folders
from ssvae_pl.data.datamodule import SemiSupervisedDataModule
from ssvae_pl.data.image_folder import (FolderImages, ImageFolder, class_folders, image_folder_pool, labelled_folder,
                                        load_image_folder)
from ssvae_pl.data.preprocess import Preprocessing, border_colour, read_image
from ssvae_pl.data.sources import offline as offline_sources
from ssvae_pl.data.sources.idx import IdxDataset
from ssvae_pl.errors import ConfigError, ImageReadError
from ssvae_pl.results import read_scalars
from test_cli import assert_one_line_user_error
from helpers.cli import ssvae_here as ssvae

REPO = Path(__file__).resolve().parents[1]
M2_CONFIG = str(REPO / "configs" / "mnist" / "m2.yaml")
FOLDER_DATA = str(REPO / "configs" / "image_folder" / "data.yaml")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three classes of 6 labelled RGB images (40 x 48), 30 unlabelled ones in two sub-folders, 4 test images per
    class; three bad files: a truncated PNG among the labelled ones, text named .png and a .txt note."""
    return write_image_folders(tmp_path_factory.mktemp("photos"), corrupt=True)


FOLDER_KEYS = ("labelled_dir", "unlabelled_dir", "test_dir", "image_size", "channels", "in_memory")


def folder_dm(folders: dict[str, Path], **kwargs) -> SemiSupervisedDataModule:
    """A data module on ``folders``; ``kwargs`` override the ImageFolder's arguments and the data module's."""
    source = dict(labelled_dir=str(folders["labelled"]), unlabelled_dir=str(folders["unlabelled"]),
                  test_dir=str(folders["test"]), image_size=16, channels=3)
    options = dict(num_labelled=None, val_size=3, batch_size=8, labelled_batch_size=4, eval_batch_size=64,
                   binarize="none", on_error="skip", resize="crop")
    for key, value in kwargs.items():
        (source if key in FOLDER_KEYS else options)[key] = value
    return SemiSupervisedDataModule(dataset=ImageFolder(**source), **options)


def first_batch(dm: SemiSupervisedDataModule) -> dict:
    batch = next(iter(dm.train_dataloader()))
    return dm.on_after_batch_transfer(batch[0] if isinstance(batch, tuple) else batch, 0)


def test_the_folders_become_a_semi_supervised_data_set(folders) -> None:
    """Classes from the sub-folders; the bad files listed in one warning and left out; validation held out from the
    labelled images; every image (H, W, C) brought to the configured (3, 16, 16) in [0, 1]."""
    dm = folder_dm(folders)
    assert dm.class_names == list(CLASSES) and dm.num_classes == 3 and dm.input_shape == (3, 16, 16)
    with pytest.warns(UserWarning) as record:
        dm.setup("fit")
    message = " ".join(str(w.message) for w in record)
    for bad in ("truncated.png", "not_a_png.png", "notes.txt"):
        assert bad in message
    assert "skipped 3 file(s)" in message
    # 18 labelled (6 per class): 3 held out, the other 15 labelled; 30 unlabelled: 45 training images
    assert (len(dm.split.val), dm.num_labelled, dm.num_train) == (3, 15, 45)
    batch = first_batch(dm)
    x_l, y_l = batch["labelled"]
    assert x_l.shape == (4, 3, 16, 16) and batch["unlabelled"].shape == (8, 3, 16, 16)
    assert 0 <= float(x_l.min()) and float(x_l.max()) <= 1 and set(y_l.tolist()) <= {0, 1, 2}
    x_test, y_test = next(iter(dm.test_dataloader()))
    assert x_test.shape == (12, 3, 16, 16) and y_test.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_streaming_from_disk_gives_the_in_memory_batches(folders) -> None:
    """``in_memory: false`` keeps the images on disk (decoded per batch, in workers when there are some) and draws
    exactly the batches of the in-memory path."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_memory, on_disk = folder_dm(folders, in_memory=True), folder_dm(folders, in_memory=False)
        in_memory.setup("fit"), on_disk.setup("fit")
    assert isinstance(on_disk._train_images, FolderImages) and isinstance(in_memory._train_images, torch.Tensor)
    torch.manual_seed(0)
    a = first_batch(in_memory)
    torch.manual_seed(0)
    b = first_batch(on_disk)
    assert torch.equal(a["unlabelled"], b["unlabelled"]) and torch.equal(a["labelled"][0], b["labelled"][0])
    for x, y in zip(in_memory.val_dataloader(), on_disk.val_dataloader()):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])


def test_a_class_balanced_label_budget_and_the_record_of_labelled_files(folders, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm = folder_dm(folders, num_labelled=9, val_size=0)
        dm.setup("fit")
    labels = dm._train_labels[dm.split.labelled]
    assert torch.bincount(labels, minlength=3).tolist() == [3, 3, 3]
    dm._write_split(tmp_path)
    record = json.loads((tmp_path / "labelled_indices.json").read_text())
    assert record["class_names"] == list(CLASSES)
    assert all(f.startswith(f"labelled/{CLASSES[y]}/") for f, y in zip(record["labelled_files"], labels.tolist()))


def test_bad_folders_are_one_clear_error_each(folders, tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match=r"1 file\(s\) cannot be used: .*truncated\.png.*--data\.on_error skip"):
        folder_dm(folders, unlabelled_dir=None, on_error="fail").setup("fit")
    empty = write_image_folders(tmp_path / "empty", labelled_per_class=2, unlabelled=0, test_per_class=1)
    for image in (empty["labelled"] / CLASSES[2]).iterdir():
        image.unlink()
    with pytest.raises(ConfigError, match=re.escape(f"{empty['labelled'] / CLASSES[2]} hold no usable image")):
        folder_dm(empty, unlabelled_dir=None, val_size=0).setup("fit")
    (empty["test"] / "hexagon").mkdir()
    with pytest.raises(ConfigError, match=r"data\.dataset\.test_dir: the class folder\(s\) \['hexagon'\]"):
        folder_dm(empty, unlabelled_dir=None, labelled_dir=str(folders["labelled"]), val_size=0).setup("fit")
    with pytest.raises(ConfigError, match="data.dataset.labelled_dir is required"):
        folder_dm(folders, labelled_dir=None)
    with pytest.raises(ConfigError, match=re.escape(f"data.dataset.labelled_dir: {tmp_path / 'nope'} is not a folder")):
        folder_dm(folders, labelled_dir=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="data.dataset.channels must be 1"):
        folder_dm(folders, channels=4)
    with pytest.raises(ConfigError, match="data.dataset.image_size must be set"):
        folder_dm(folders, image_size=None)
    with pytest.raises(ConfigError, match="no labelled training image is left for the class"):
        folder_dm(folders, val_size=17).setup("fit")


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as stream:
        reader = csv.DictReader(stream)
        return list(reader.fieldnames), list(reader)


def test_fit_test_and_predict_through_ssvae_with_class_names(folders, tmp_path: Path, capsys) -> None:
    """M2 (tiny MLP) on the folders through the ``ssvae`` command: fit (bad files skipped), test on test_dir, then
    predict a folder: the CSV names the classes, which the checkpoint carries."""
    from ssvae_pl.cli import main

    logs = tmp_path / "lightning_logs"
    common = ["-c", M2_CONFIG, "-c", FOLDER_DATA, "--data.dataset.labelled_dir", str(folders["labelled"]),
              "--data.dataset.unlabelled_dir", str(folders["unlabelled"]),
              "--data.dataset.test_dir", str(folders["test"]),
              "--data.dataset.image_size", "16", "--data.val_size", "3", "--data.batch_size", "8",
              "--data.labelled_batch_size", "4", "--data.on_error", "skip", "--model.init_args.hidden_dims", "[16]",
              "--model.init_args.classifier_hidden_dims", "[16]", "--model.init_args.latent_dim", "4",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
              "--trainer.logger.init_args.save_dir", str(logs), "--trainer.logger.init_args.version", "run"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["fit", *common, "--trainer.max_epochs", "2", "--trainer.callbacks+=ssvae_pl.callbacks.EpochTimer"])
    checkpoint = logs / "m2" / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=True)["hyper_parameters"]["class_names"] == list(CLASSES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["test", *common[:-2], "--ckpt_path", str(checkpoint)])
    assert 0 <= read_scalars(logs / "m2" / "run")["test/acc"] <= 1  # on test_dir's 12 images, beside the fit
    output = tmp_path / "predictions.csv"
    new_photos = write_image_folders(tmp_path / "new", labelled_per_class=2, unlabelled=0, test_per_class=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["predict", *common, "--ckpt_path", str(checkpoint), "--trainer.logger", "false",
              "--data.predict_dir", str(new_photos["labelled"]), "--predictions.output", str(output)])
    header, rows = read_csv(output)
    assert header == ["file", "predicted", *(f"prob_{name}" for name in CLASSES)]
    assert [row["file"] for row in rows][:2] == [f"{CLASSES[0]}/{CLASSES[0]}_000.png", f"{CLASSES[0]}/{CLASSES[0]}_001.png"]
    assert {row["predicted"] for row in rows} <= set(CLASSES)
    # a checkpoint is refused on data of other classes: one error naming both lists, exit 2, no CSV
    (new_photos["labelled"] / CLASSES[0]).rename(new_photos["labelled"] / "disc")
    other = [a if a != str(folders["labelled"]) else str(new_photos["labelled"]) for a in common]
    with pytest.raises(SystemExit) as stopped, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["predict", *other, "--ckpt_path", str(checkpoint), "--trainer.logger", "false",
              "--data.predict_dir", str(new_photos["labelled"]), "--predictions.output", str(tmp_path / "no.csv")])
    assert stopped.value.code == 2 and not (tmp_path / "no.csv").exists()
    assert "the checkpoint was trained on 3x16x16 images of 3 classes (circle, square, triangle)" \
        in capsys.readouterr().err
    result = ssvae(tmp_path, "fit", *common[:-2], "--trainer.logger.init_args.version", "strict",
                   "--data.on_error", "fail", "--trainer.max_epochs", "1")
    assert result.returncode == 2
    assert_one_line_user_error(result, "truncated.png")
    assert not (logs / "m2" / "strict" / "checkpoints").exists()


# ---- user reports: 16-bit images, hidden and unreadable folders, the folder script offline, wide digits ----------


@pytest.mark.parametrize("mode, suffix", [("I;16", ".png"), ("I;16B", ".tif"), ("I", ".tif"), ("F", ".tif")])
def test_high_bit_depth_grey_images_are_scaled_to_8_bits(tmp_path: Path, mode: str, suffix: str) -> None:
    """16-bit grey (``I;16``, ``I;16B``, ``I``) becomes round(v / 257); float ``F`` in [0, 1] becomes v * 255."""
    values = np.linspace(0, 65535, 48).round().astype(np.uint16).reshape(6, 8)
    if mode == "F":
        picture, expected = Image.fromarray((values / 65535).astype(np.float32)), np.rint(values / 65535 * 255)
    else:
        picture = Image.fromarray(values.astype({"I;16": np.uint16, "I;16B": ">u2", "I": np.int32}[mode]))
        expected = np.rint(values / 257)
    path = tmp_path / f"grey{suffix}"
    picture.save(path)
    with Image.open(path) as reopened:
        assert reopened.mode == mode
    for target in ("L", "RGB"):
        decoded = np.asarray(read_image(path, target), dtype=np.int64).reshape(6, 8, -1)
        assert np.abs(decoded - expected[..., None]).max() <= 1, (target, decoded[..., 0])


def small_folders(root: Path) -> dict[str, Path]:
    return write_image_folders(root, labelled_per_class=2, unlabelled=4, test_per_class=1, size=(8, 10))


def test_hidden_folders_are_not_classes(tmp_path: Path) -> None:
    """``labelled/.ipynb_checkpoints/`` (and one in test_dir) is left out as unlabelled_dir's hidden folders are."""
    folders = small_folders(tmp_path)
    for name in ("labelled", "test"):
        hidden = folders[name] / ".ipynb_checkpoints"
        hidden.mkdir()
        (hidden / "copy.png").write_bytes(next((folders[name] / CLASSES[0]).iterdir()).read_bytes())
    assert class_folders(folders["labelled"]) == list(CLASSES)
    _, labels = labelled_folder(folders["test"], CLASSES, Preprocessing((3, 8, 8)), "fail")
    assert labels.tolist() == [0, 1, 2]


def deny_listing(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """``os.scandir`` of ``folder`` raises PermissionError, as for a folder without read permission (the tests run
    as root, who can list any folder)."""
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(os.fsdecode(path)) == folder:
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_a_folder_that_cannot_be_listed_is_reported_as_an_unreadable_file(tmp_path: Path, monkeypatch) -> None:
    """A sub-folder of unlabelled_dir, of a class folder or of predict_dir that cannot be listed: one error naming it
    (``on_error: fail``), or one warning naming it and the other images used (``skip``); never left out silently."""
    folders = small_folders(tmp_path)
    preprocessing = Preprocessing((3, 8, 8))
    denied = folders["unlabelled"] / "batch1"
    deny_listing(monkeypatch, denied)
    with pytest.raises(ImageReadError, match=rf"{re.escape(str(denied))} cannot be listed.*--data\.on_error skip"):
        image_folder_pool(folders["labelled"], folders["unlabelled"], preprocessing, "fail")
    with pytest.warns(UserWarning, match=rf"skipped 1 folder\(s\).*{re.escape(str(denied))} cannot be listed"):
        images, labels, _, names = image_folder_pool(folders["labelled"], folders["unlabelled"], preprocessing, "skip")
    assert len(images) == 6 + 2 and not any("batch1" in name for name in names)
    with pytest.raises(ImageReadError, match=rf"data\.predict_dir: .*{re.escape(str(denied))} cannot be listed"):
        load_image_folder(folders["unlabelled"], preprocessing, "fail")
    deny_listing(monkeypatch, folders["labelled"] / CLASSES[1])
    with pytest.raises(ImageReadError, match=re.escape(f"{folders['labelled'] / CLASSES[1]} cannot be listed")):
        image_folder_pool(folders["labelled"], None, preprocessing, "fail")
    deny_listing(monkeypatch, folders["unlabelled"])
    with pytest.raises(ConfigError, match=rf"data\.predict_dir: {re.escape(str(folders['unlabelled']))} cannot be "
                                          r"listed .*chmod"):
        load_image_folder(folders["unlabelled"], preprocessing, "skip")


def test_make_image_folder_without_the_dataset_is_one_error_line(tmp_path: Path, monkeypatch, capsys) -> None:
    """Fashion-MNIST with no files, no network and no Debian package: one ``make_image_folder: error:`` line that
    names the package to install, exit 2, nothing written."""
    spec = importlib.util.spec_from_file_location("make_image_folder", REPO / "scripts" / "make_image_folder.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def no_network(self, staging: Path) -> None:
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(IdxDataset, "_stage_download", no_network)
    monkeypatch.setattr(offline_sources, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian-package")
    with pytest.raises(SystemExit) as stopped:
        script.main(["--dataset", "fashion_mnist", "--data-dir", str(tmp_path / "data"),
                     "--out", str(tmp_path / "out")])
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("make_image_folder: error: "), lines
    assert "apt-get install dataset-fashion-mnist" in lines[0] and "--dataset mnist" in lines[0]
    assert not (tmp_path / "out").exists()


def content_extent(image) -> int:
    """The longer side of the box of pixels brighter than 51 in a grey image."""
    rows, cols = np.nonzero(np.asarray(image) > 51)
    return int(max(rows.max() - rows.min(), cols.max() - cols.min())) + 1


def as_the_spec_says(image: Image.Image) -> Image.Image:
    """``resize: content`` as the exports' ``resize_content`` spells it, with Pillow and NumPy alone (28 x 28)."""
    a = np.asarray(image, np.float64).reshape(image.height, image.width, -1)
    border = border_colour(image)
    c = (np.abs(a - border) > 51).any(axis=2)
    (y0, *_, y1), (x0, *_, x1) = np.flatnonzero(c.any(axis=1)), np.flatnonzero(c.any(axis=0))
    h, w = y1 + 1 - y0, x1 + 1 - x0
    s = max(h, w) + 2 * round(0.2 * max(h, w))
    fill = round(border[0])
    square = Image.new("L", (s, s), fill)
    square.paste(image, (-(x0 - (s - w) // 2), -(y0 - (s - h) // 2)))
    return ImageOps.pad(square, (28, 28), Image.BILINEAR, color=fill)


def test_resize_content_fills_the_input_with_a_digit_of_a_wide_canvas(folders) -> None:
    """A light stroke on a dark 28 x 84 canvas: ``pad`` shrinks it to a third; ``content`` crops to it, squares it
    with MNIST's margin (20 of 28) and resizes; a blank canvas is padded as ``pad`` does."""
    canvas = np.zeros((28, 84), dtype=np.uint8)
    canvas[6:22, 50:58] = 230  # a "1": 16 x 8 pixels
    picture = Image.fromarray(canvas)
    padded = Preprocessing((1, 28, 28), False, "pad").prepare(picture)
    cropped = Preprocessing((1, 28, 28), False, "content").prepare(picture)
    assert cropped.size == (28, 28) and content_extent(padded) <= 7
    assert 19 <= content_extent(cropped) <= 22  # 16 rows + a margin of round(0.2 * 16) = 3 each side: 20 of 28
    dark_on_paper = Image.fromarray(255 - np.pad(canvas, ((10, 10), (0, 0)), constant_values=0))
    inverted = Preprocessing((1, 28, 28), "auto", "content").prepare(dark_on_paper)
    assert 19 <= content_extent(inverted) <= 22
    blank = Image.new("L", (84, 28), 40)
    assert np.array_equal(np.asarray(Preprocessing((1, 28, 28), False, "content").prepare(blank)),
                          np.asarray(Preprocessing((1, 28, 28), False, "pad").prepare(blank)))
    assert "0.2 * max(h, w)" in Preprocessing((1, 28, 28), False, "content").spec()["resize_content"]
    assert np.array_equal(np.asarray(cropped), np.asarray(as_the_spec_says(picture)))
    assert folder_dm(folders, resize="content").hparams["resize"] == "content"


def test_linked_folders_are_followed_once_and_an_empty_unlabelled_dir_is_named(tmp_path: Path) -> None:
    """A symlinked sub-folder of ``unlabelled_dir`` was skipped without a word (``os.walk`` does not follow links);
    a link loop must still end; and an ``unlabelled_dir`` without images trained on nothing unlabelled, silently."""
    folders = write_image_folders(tmp_path / "photos", labelled_per_class=2, unlabelled=4, test_per_class=1)
    elsewhere = tmp_path / "more"
    (folders["unlabelled"] / "batch0").rename(elsewhere)
    (folders["unlabelled"] / "linked").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(folders["unlabelled"], target_is_directory=True)
    preprocessing = Preprocessing((3, 8, 8))
    _, labels, _, names = image_folder_pool(folders["labelled"], folders["unlabelled"], preprocessing, "fail")
    unlabelled = sorted(n for n in names if n.startswith("unlabelled/"))
    assert len(unlabelled) == 4 and sum(n.startswith("unlabelled/linked/") for n in unlabelled) == 2
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("nothing here yet")
    with pytest.raises(ConfigError, match=r"data.dataset.unlabelled_dir: .*empty holds no images"):
        image_folder_pool(folders["labelled"], empty, preprocessing, "fail")
