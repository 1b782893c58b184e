"""``ssvae export``: TorchScript and ONNX files that give the checkpoint's class probabilities, for any batch size.

One run goes through the real entry point; the others call ``export_classifier`` in this process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.trainers import quiet_trainer
from ssvae_pl import export
from ssvae_pl.data.sources import idx as sources
from ssvae_pl.errors import CheckpointError, ExportError
from ssvae_pl.export import export_classifier, load_classifier, load_torchscript
from test_cli import assert_one_line_user_error, ok
from helpers.cli import ssvae_here as ssvae
from test_predict import predict, read_csv
from test_python_api import readme_python

onnxruntime = pytest.importorskip("onnxruntime")

TOLERANCE = export.TOLERANCE  # on probabilities, as export's own check


def assert_exports_match(files: dict[str, Path], ckpt: Path, images: torch.Tensor) -> None:
    """The exported files, loaded as a user would, give the checkpoint's probabilities on real images, in a batch
    of a size other than the ones traced and checked, and of one image."""
    model = load_classifier(str(ckpt))
    scripted = load_torchscript(files["torchscript"])
    session = onnxruntime.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])
    for x in (images[:37], images[:1]):
        with torch.no_grad():
            expected = model(x).softmax(dim=-1)
        from_onnx = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        for got in (scripted(x), from_onnx):
            assert got.shape == (len(x), 10)
            torch.testing.assert_close(got, expected, rtol=0, atol=TOLERANCE)
            torch.testing.assert_close(got.sum(dim=-1), torch.ones(len(x)), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def test_images(synthetic_mnist) -> torch.Tensor:
    """The synthetic test images in [0, 1], binarised: (200, 1, 28, 28)."""
    images = torch.from_numpy(synthetic_mnist[1][sources.TEST_IMAGES]).unsqueeze(1).float() / 255
    return torch.bernoulli(images, generator=torch.Generator().manual_seed(0))


def fit_m2(make_dm, root: Path, **options) -> Path:
    """A tiny M2 (or M1+M2 with ``vae_checkpoint``) fitted for 2 steps by a plain Trainer; its checkpoint."""
    from ssvae_pl.models import M1M2, M2

    torch.manual_seed(0)
    model = (M1M2 if "vae_checkpoint" in options else M2)(hidden_dims=[16], classifier_hidden_dims=[16], latent_dim=4, **options)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, default_root_dir=str(root))
    trainer.fit(model, datamodule=make_dm())
    trainer.save_checkpoint(root / "m2.ckpt")
    return root / "m2.ckpt"


def test_ssvae_export_of_a_latent_classifier(tmp_path: Path, classifier_checkpoint: Path, test_images) -> None:
    """``ssvae export`` writes both files, says they match, and refuses to replace them without --overwrite."""
    result = ssvae(tmp_path, "export", "--ckpt_path", str(classifier_checkpoint), "--output_dir", str(tmp_path / "x"))
    ok(result)
    files = {"torchscript": tmp_path / "x" / "last.torchscript.pt", "onnx": tmp_path / "x" / "last.onnx"}
    classes = tmp_path / "x" / "last.json"
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == sorted(p.name for p in [*files.values(), classes])
    assert result.stdout.count("matches the checkpoint") == 2
    assert_exports_match(files, classifier_checkpoint, test_images)
    meaning = json.loads(classes.read_text())  # output k is the probability of class_names[k]
    assert meaning["class_names"] == [str(k) for k in range(10)] and meaning["input_shape"] == [1, 28, 28]
    assert meaning["preprocessing"] | {"invert": "auto", "mode": "L", "resize": "pad", "size": [28, 28]} \
        == meaning["preprocessing"]

    kept = {kind: path.read_bytes() for kind, path in files.items()}
    again = ssvae(tmp_path, "export", "--ckpt_path", str(classifier_checkpoint), "--output_dir", str(tmp_path / "x"))
    assert again.returncode == 2
    assert_one_line_user_error(again, "--overwrite")
    assert {kind: path.read_bytes() for kind, path in files.items()} == kept


def test_export_of_m2_and_m1_m2(tmp_path: Path, make_dm, vae_checkpoint: Path, test_images) -> None:
    """M2's q(y|x), and M1+M2's q(y|x) on M1's frozen encoder, as exported files; --overwrite replaces them."""
    m2 = fit_m2(make_dm, tmp_path / "m2")
    files = {kind: path for kind, (path, _) in export_classifier(str(m2)).items()}
    assert files.pop("json") == m2.parent / "m2.json"
    assert files == {"torchscript": m2.parent / "m2.torchscript.pt", "onnx": m2.parent / "m2.onnx"}
    assert_exports_match(files, m2, test_images)

    spread = torch.load(vae_checkpoint, weights_only=True)["state_dict"]["latent_mean_std"]
    m1m2 = fit_m2(make_dm, tmp_path / "m1m2", vae_checkpoint=str(vae_checkpoint),
                  m1_active_threshold=spread.median().item())  # 2 of M1's 4 latent dimensions: exported so
    out = tmp_path / "exported"
    export_classifier(str(m1m2), str(out))
    written = export_classifier(str(m1m2), str(out), overwrite=True)
    written.pop("json")
    assert all(difference <= TOLERANCE for _, difference in written.values())
    assert_exports_match({kind: path for kind, (path, _) in written.items()}, m1m2, test_images)
    assert sorted(p.name for p in out.iterdir()) == ["m2.json", "m2.onnx", "m2.torchscript.pt"]


def test_a_mismatch_is_an_error_and_writes_nothing(tmp_path: Path, classifier_checkpoint: Path, monkeypatch) -> None:
    """An exported model that does not reproduce the checkpoint is refused, and no file is left behind."""
    torchscript_bytes = export.torchscript_bytes
    monkeypatch.setattr(export, "torchscript_bytes", lambda model, example: torchscript_bytes(
        torch.nn.Sequential(model, torch.nn.Softmax(dim=-1)), example))  # softmax twice: other probabilities
    with pytest.raises(ExportError, match="TorchScript model differs"):
        export_classifier(str(classifier_checkpoint), str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_checkpoints_that_cannot_be_exported_are_one_clear_error(tmp_path: Path, vae_checkpoint: Path) -> None:
    """A missing file, a corrupt one and a VAE (which does not classify) are each refused, naming the file."""
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    for path, reason in ((tmp_path / "missing.ckpt", "does not exist"), (corrupt, "cannot be read"),
                         (vae_checkpoint, "does not classify")):
        with pytest.raises(CheckpointError, match=reason) as raised:
            export_classifier(str(path), str(tmp_path / "out"))
        assert str(path) in str(raised.value)
    assert not (tmp_path / "out").exists()


def user_images(folder: Path, digits: np.ndarray) -> None:
    """The user's PNGs: the digits at other sizes and aspect ratios, half of them dark on light, in L and RGB."""
    folder.mkdir()
    sizes = [(28, 28), (56, 40), (33, 71), (100, 100), (20, 24)]
    for i, digit in enumerate(digits):
        image = Image.fromarray(255 - digit if i % 2 else digit).resize(sizes[i % len(sizes)], Image.BICUBIC)
        image.convert("RGB" if i % 3 == 0 else "L").save(folder / f"{i:02d}.png")


def test_the_documented_onnx_snippet_predicts_as_ssvae_predict(tmp_path: Path, classifier_checkpoint: Path,
                                                           shared_mnist_dir: Path, synthetic_mnist) -> None:
    """The exported ONNX file and ``<stem>.json``, used by docs/python_api.md's ONNX Runtime snippet with Pillow and
    NumPy alone, give ``ssvae predict``'s classes and probabilities on images of other sizes and polarities."""
    user_images(tmp_path / "my_images", synthetic_mnist[1][sources.TEST_IMAGES][:20])
    export_classifier(str(classifier_checkpoint), str(tmp_path / "exported"))
    result = predict(tmp_path, shared_mnist_dir, classifier_checkpoint, tmp_path / "predictions.csv",
                     "--data.predict_dir", str(tmp_path / "my_images"))
    ok(result)
    _, rows = read_csv(tmp_path / "predictions.csv")

    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(readme_python("onnxruntime", "docs/python_api.md"), "docs/python_api.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    assert [f.name for f in namespace["files"]] == [row["file"] for row in rows]
    expected = np.array([[float(row[f"prob_{k}"]) for k in range(10)] for row in rows])
    np.testing.assert_allclose(namespace["probs"], expected, rtol=0, atol=TOLERANCE)
    assert namespace["probs"].argmax(axis=1).tolist() == [int(row["predicted"]) for row in rows]
