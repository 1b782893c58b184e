"""``ssvae predict``: the CSV of class probabilities, for the test set or a folder of the user's own images.

The command runs as a subprocess (the real entry point) a few times; the image conversion and the data module's
predict path are checked in this process, on the synthetic MNIST and tiny models.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.trainers import quiet_trainer
from ssvae_pl.data.sources import idx as sources
from ssvae_pl.data.image_folder import find_images, load_image_folder
from ssvae_pl.data.preprocess import Preprocessing
from ssvae_pl.errors import ConfigError
from ssvae_pl.files import atomic_output
from ssvae_pl.prediction import PredictionCSVWriter
from test_cli import CLASSIFIER_CONFIG, assert_one_line_user_error, data_args, ok
from helpers.cli import ssvae_here as ssvae

PROB_COLUMNS = [f"prob_{k}" for k in range(10)]


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as stream:
        reader = csv.DictReader(stream)
        return list(reader.fieldnames), list(reader)


def assert_probabilities(rows: list[dict[str, str]]) -> None:
    """Each row's probabilities sum to 1 and its ``predicted`` class is the most probable."""
    for row in rows:
        probs = [float(row[c]) for c in PROB_COLUMNS]
        assert abs(sum(probs) - 1) < 1e-4 and min(probs) >= 0, row
        assert int(row["predicted"]) == int(np.argmax(probs)), row


def predict(cwd: Path, data_dir: Path, ckpt: Path, output: Path, *args: str):
    return ssvae(cwd, "predict", "-c", CLASSIFIER_CONFIG, *data_args(data_dir), "--ckpt_path", str(ckpt),
                 "--trainer.logger", "false", "--predictions.output", str(output), *args)


def dark_on_light(digit: np.ndarray, size: tuple[int, int], mode: str) -> Image.Image:
    """A synthetic digit (28 x 28, light on dark) as a user's scan: dark ink on white paper, another size and mode."""
    return Image.fromarray(255 - digit).resize(size).convert(mode)


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory: pytest.TempPathFactory, synthetic_mnist) -> Path:
    """A user's folder: three readable images of other sizes and modes (one in a subfolder), a note that is not an
    image, and a corrupt PNG."""
    _, arrays = synthetic_mnist
    digits = arrays[sources.TEST_IMAGES]
    folder = tmp_path_factory.mktemp("my_images")
    (folder / "scans").mkdir()
    Image.fromarray(digits[0]).save(folder / "a_grey_28.png")  # MNIST's own form
    dark_on_light(digits[1], (56, 40), "RGB").save(folder / "scans" / "b_rgb_56x40.JPG")
    dark_on_light(digits[2], (100, 100), "RGBA").save(folder / "c_rgba_100.png")
    (folder / "notes.txt").write_text("not an image, left alone")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00 truncated" * 10)
    return folder


def test_predict_the_test_set_writes_one_row_per_image(tmp_path: Path, shared_mnist_dir: Path, synthetic_mnist,
                                                       classifier_checkpoint: Path) -> None:
    """On the test set: a row per test image, its index and true label, probabilities that sum to 1."""
    output = tmp_path / "out" / "test.csv"
    result = predict(tmp_path, shared_mnist_dir, classifier_checkpoint, output)
    ok(result)
    header, rows = read_csv(output)
    assert header == ["file", "label", "predicted", *PROB_COLUMNS]
    labels = synthetic_mnist[1][sources.TEST_LABELS]
    assert [int(r["file"]) for r in rows] == list(range(len(labels)))
    assert [int(r["label"]) for r in rows] == labels.tolist()
    assert_probabilities(rows)
    assert sorted(p.name for p in output.parent.iterdir()) == ["test.csv"]  # no temporary file left behind


def test_predict_a_folder_skips_a_corrupt_image_with_a_warning(tmp_path: Path, shared_mnist_dir: Path,
                                                               user_folder: Path, classifier_checkpoint) -> None:
    """``--data.on_error skip``: the readable images (any size, colour, polarity; subfolders too) are predicted,
    the corrupt one is named in a warning and left out of the CSV; a note that is not an image is ignored."""
    output = tmp_path / "folder.csv"
    result = predict(tmp_path, shared_mnist_dir, classifier_checkpoint, output, "--data.predict_dir",
                     str(user_folder), "--data.on_error", "skip")
    ok(result)
    assert "broken.png" in result.stderr and "skipped" in result.stderr
    header, rows = read_csv(output)
    assert header == ["file", "predicted", *PROB_COLUMNS]
    assert [r["file"] for r in rows] == ["a_grey_28.png", "c_rgba_100.png", "scans/b_rgb_56x40.JPG"]
    assert_probabilities(rows)


def test_predict_a_folder_fails_on_a_corrupt_image_and_keeps_the_earlier_csv(
        tmp_path: Path, shared_mnist_dir: Path, user_folder: Path, classifier_checkpoint) -> None:
    """``--data.on_error fail`` (the default): one line naming the corrupt file, exit 2, and the CSV already at
    the output path stays as it was."""
    output = tmp_path / "predictions.csv"
    output.write_text("an earlier run's predictions\n")
    result = predict(tmp_path, shared_mnist_dir, classifier_checkpoint, output, "--data.predict_dir",
                     str(user_folder))
    assert result.returncode == 2
    assert_one_line_user_error(result, "broken.png")
    assert "--data.on_error skip" in result.stderr
    assert output.read_text() == "an earlier run's predictions\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.csv"]


def test_a_missing_or_empty_folder_is_an_error_naming_it(tmp_path: Path) -> None:
    """(Raised while the data module sets up, so ``ssvae`` prints it as one line, as for the corrupt image above.)"""
    missing = tmp_path / "no_such_folder"
    with pytest.raises(ConfigError, match=re.escape(f"{missing} is not a folder")):
        find_images(missing)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("no images here")
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path} holds no images")):
        find_images(tmp_path)


def test_images_of_other_sizes_and_colours_become_mnist_like(synthetic_mnist) -> None:
    """A dark digit on white paper, of another size, in RGB, becomes a (1, 28, 28) light digit on black: inverted by
    ``auto`` (its border is light), padded to a square (the aspect ratio kept), resized."""
    digit = synthetic_mnist[1][sources.TEST_IMAGES][0]  # (28, 28) uint8, light block on a dark background
    scan = dark_on_light(digit, (56, 40), "RGB").convert("L")
    for invert in ("auto", True):
        converted = Preprocessing((1, 28, 28), invert).prepare(scan)
        pixels = np.asarray(converted, dtype=np.float64)
        assert converted.size == (28, 28) and converted.mode == "L"
        assert pixels[:3].mean() < 80  # dark background, as MNIST
        assert pixels.max() > 170  # the light digit
    kept = np.asarray(Preprocessing((1, 28, 28), invert=False).prepare(scan), dtype=np.float64)
    assert kept[:3].mean() > 170  # left as it was: light paper
    # the padding keeps a square digit square: a 20 x 10 white bar on black stays twice as tall as wide
    bar = np.zeros((40, 80), dtype=np.uint8)
    bar[10:30, 35:45] = 255
    rows, cols = (np.asarray(Preprocessing((1, 28, 28), "auto").prepare(Image.fromarray(bar))) > 127).nonzero()
    assert (rows.max() - rows.min() + 1) / (cols.max() - cols.min() + 1) == pytest.approx(2, abs=0.5)


def test_a_folder_of_the_test_images_predicts_them_grey(tmp_path: Path, make_dm, synthetic_mnist) -> None:
    """The synthetic test images written as PNGs are read back exactly, and predicted as they are (x / 255), not
    binarised, even when the model trained on binarised images: an image's input depends on that image alone, the
    same alone as among others, as the exports record it."""
    test_images = synthetic_mnist[1][sources.TEST_IMAGES]
    for i, image in enumerate(test_images):
        Image.fromarray(image).save(tmp_path / f"{i:04d}.png")
    images, names = load_image_folder(tmp_path, Preprocessing((1, 28, 28), invert="auto"))
    assert names == [f"{i:04d}.png" for i in range(len(test_images))]
    assert torch.equal(images[:, 0], torch.from_numpy(test_images))

    def predict_batches(folder: Path) -> torch.Tensor:
        dm = make_dm(binarize="dynamic", predict_dir=str(folder))
        dm.setup("predict")
        return torch.cat([dm.on_after_batch_transfer(b, 0) for b in dm.predict_dataloader()])

    from_folder = predict_batches(tmp_path)
    torch.testing.assert_close(from_folder[:, 0], torch.from_numpy(test_images).float() / 255, rtol=0, atol=0)
    alone = tmp_path / "alone"
    alone.mkdir()
    (tmp_path / "0007.png").rename(alone / "0007.png")
    assert torch.equal(predict_batches(alone)[0], from_folder[7])


def test_the_writer_writes_m2_predictions_of_a_folder(tmp_path: Path, make_dm, user_folder: Path) -> None:
    """An M2 model through Trainer.predict and the CSV writer, on a folder (corrupt image skipped, with a warning)."""
    from ssvae_pl.models import M2

    model = M2(hidden_dims=[16], classifier_hidden_dims=[16], latent_dim=4)
    output = tmp_path / "m2.csv"
    with pytest.warns(UserWarning, match="broken.png"):
        dm = make_dm(predict_dir=str(user_folder), on_error="skip")
        quiet_trainer(callbacks=[PredictionCSVWriter(str(output))]).predict(model, datamodule=dm)
    header, rows = read_csv(output)
    assert header[:2] == ["file", "predicted"] and len(rows) == 3
    assert_probabilities(rows)


def test_a_failed_write_leaves_the_earlier_file(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    target.write_text("earlier")
    with pytest.raises(RuntimeError), atomic_output(target, overwrite=True) as temporary:
        temporary.write_text("half a fi")
        raise RuntimeError("the run fails half-way")
    assert target.read_text() == "earlier" and sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]
    with atomic_output(target, overwrite=True) as temporary:
        temporary.write_text("new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]


def test_bad_folder_options_are_refused(make_dm) -> None:
    with pytest.raises(ConfigError, match="data.on_error"):
        make_dm(on_error="ignore")
    with pytest.raises(ConfigError, match="data.invert"):
        make_dm(invert="sometimes")
