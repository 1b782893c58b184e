"""Tests of the colour datasets of ssvae_pl.data.sources (CIFAR-10 and SVHN) on small synthetic files in
torchvision's layout (tests/helpers/colour_data.py), and of every dataset's class names. No network."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from helpers.colour_data import pack_cifar_archive, write_synthetic_colour
from ssvae_pl.data.datamodule import SemiSupervisedDataModule
from helpers.synthetic import ensure, load
from ssvae_pl.data.sources import NAMED, DataSourceError, colour, named

COLOUR = ["cifar10", "svhn"]
URLS = {
    "cifar10": ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"],
    "svhn": ["http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
             "http://ufldl.stanford.edu/housenumbers/test_32x32.mat"],
}
N_TRAIN, N_TEST = 23, 7  # not multiples of 5 or 10: uneven CIFAR batches, unequal classes


def bypass_md5_checks(monkeypatch: pytest.MonkeyPatch, cls: type) -> None:
    """Let torchvision's class accept the synthetic files (it checks the official md5s when built)."""
    monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)  # batches.meta


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("name", COLOUR)
def test_load_split_shapes_dtypes_and_labels(tmp_path: Path, name: str) -> None:
    written = write_synthetic_colour(tmp_path, name, N_TRAIN, N_TEST)
    assert ensure(name, tmp_path, download=False, check_md5=False) == named(name, tmp_path).folder
    for split, train in (("train", True), ("test", False)):
        images, labels = load(name, tmp_path, train=train, download=False, check_md5=False)
        expected_images, expected_labels = written[split]
        n = len(expected_labels)
        assert images.dtype == torch.uint8 and images.shape == (n, 3, 32, 32) and images.is_contiguous()
        assert labels.dtype == torch.int64 and labels.shape == (n,) and labels.is_contiguous()
        assert torch.equal(images, torch.from_numpy(expected_images))
        assert torch.equal(labels, torch.from_numpy(expected_labels))
        assert 0 <= labels.min() and labels.max() <= 9 and (labels == 0).any()


def test_svhn_label_10_is_digit_0(tmp_path: Path) -> None:
    from scipy.io import loadmat

    written = write_synthetic_colour(tmp_path, "svhn", N_TRAIN, N_TEST)
    stored = loadmat(str(written["files"]["train_32x32.mat"]))["y"][:, 0]
    assert set(stored.tolist()) == set(range(1, 11))  # as the official files: 1..10, no 0
    _, labels = load("svhn", tmp_path, train=True, download=False, check_md5=False)
    assert torch.equal(labels, torch.from_numpy(np.where(stored == 10, 0, stored).astype(np.int64)))


@pytest.mark.parametrize("name", COLOUR)
def test_synthetic_files_read_as_torchvision_reads_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        name: str) -> None:
    """The layout and the channel order are torchvision's: its own class (md5 check bypassed) sees the same data."""
    write_synthetic_colour(tmp_path, name, N_TRAIN, N_TEST)
    cls = NAMED[name].torchvision_class
    bypass_md5_checks(monkeypatch, cls)
    for train in (True, False):
        images, labels = load(name, tmp_path, train=train, download=False, check_md5=False)
        if name == "cifar10":
            ds = cls(str(tmp_path), train=train, download=False)
            assert torch.equal(images.permute(0, 2, 3, 1), torch.from_numpy(ds.data))  # torchvision holds HWC
            assert ds.classes == list(NAMED[name].classes)
        else:
            ds = cls(str(tmp_path / "SVHN"), split="train" if train else "test", download=False)
            assert torch.equal(images, torch.from_numpy(ds.data))
        assert labels.tolist() == list(ds.targets if name == "cifar10" else ds.labels)


def test_cifar_archive_is_extracted_and_kept(tmp_path: Path) -> None:
    written = write_synthetic_colour(tmp_path, "cifar10", N_TRAIN, N_TEST)
    archive = pack_cifar_archive(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    assert not folder.exists()
    archive_bytes = archive.read_bytes()
    # one file already there (a different one) is kept as it is; the others come from the archive
    folder.mkdir()
    kept = folder / "test_batch"
    kept.write_bytes(pickle.dumps({"data": written["train"][0][:3].reshape(3, -1), "labels": [1, 2, 3]}, protocol=2))
    kept_bytes = kept.read_bytes()

    assert ensure("cifar10", tmp_path, download=False, check_md5=False) == folder
    assert archive.read_bytes() == archive_bytes
    assert kept.read_bytes() == kept_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    assert sorted(snapshot(folder)) == sorted(colour.CIFAR10.files)  # readme.html not extracted
    images, labels = load("cifar10", tmp_path, train=True, download=False, check_md5=False)
    assert torch.equal(images, torch.from_numpy(written["train"][0]))
    assert torch.equal(labels, torch.from_numpy(written["train"][1]))
    _, test_labels = load("cifar10", tmp_path, train=False, download=False, check_md5=False)
    assert test_labels.tolist() == [1, 2, 3]


def test_cifar_archive_failing_md5_is_reported_and_kept(tmp_path: Path) -> None:
    write_synthetic_colour(tmp_path, "cifar10", N_TRAIN, N_TEST)
    archive = pack_cifar_archive(tmp_path)
    archive_bytes = archive.read_bytes()
    with pytest.raises(DataSourceError) as err:
        ensure("cifar10", tmp_path, download=True, check_md5=True)
    message = str(err.value)
    assert str(archive) in message and "md5 mismatch" in message and "data_batch_1" in message
    assert colour.CIFAR10_MD5["data_batch_1"] in message and "check_md5=False" in message
    assert archive.read_bytes() == archive_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-python.tar.gz"]  # nothing moved in, no staging


# --------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("name", COLOUR)
def test_md5_mismatch_names_the_file_and_leaves_it(tmp_path: Path, name: str) -> None:
    written = write_synthetic_colour(tmp_path, name, N_TRAIN, N_TEST)
    before = snapshot(written["folder"])
    first = next(iter(written["files"]))  # data_batch_1 or train_32x32.mat: checked first
    with pytest.raises(DataSourceError) as err:
        load(name, tmp_path, train=True, download=True, check_md5=True)
    message = str(err.value)
    assert str(written["files"][first]) in message and "md5 mismatch" in message
    assert NAMED[name].md5[first] in message  # expected
    assert hashlib.md5(before[first]).hexdigest() in message  # actual
    assert "Fix:" in message and "check_md5=False" in message
    assert snapshot(written["folder"]) == before


@pytest.mark.parametrize("name", COLOUR)
def test_truncated_file_is_rejected_on_loading_and_kept(tmp_path: Path, name: str) -> None:
    written = write_synthetic_colour(tmp_path, name, N_TRAIN, N_TEST)
    path = next(iter(written["files"].values()))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    before = snapshot(written["folder"])
    with pytest.raises(DataSourceError) as err:
        load(name, tmp_path, train=True, download=False, check_md5=False)
    message = str(err.value)
    assert str(path) in message and "Fix:" in message
    assert err.value.__cause__ is None
    assert snapshot(written["folder"]) == before


def test_cifar_batch_with_other_globals_is_refused(tmp_path: Path) -> None:
    write_synthetic_colour(tmp_path, "cifar10", N_TRAIN, N_TEST)
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (eval, (f"__import__('pathlib').Path({str(marker)!r}).touch()",))

    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": Evil()}, protocol=2))
    with pytest.raises(DataSourceError, match="forbidden global in pickle: .*eval") as err:
        load("cifar10", tmp_path, train=True, download=False, check_md5=False)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_cifar_batch_written_by_python3_default_pickle(tmp_path: Path) -> None:
    """A batch of one's own written with Python 3's default protocol (numpy arrays as _frombuffer) loads too."""
    write_synthetic_colour(tmp_path, "cifar10", N_TRAIN, N_TEST)
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps({b"data": data, b"labels": np.array([4, 9])}, protocol=pickle.HIGHEST_PROTOCOL))
    images, labels = load("cifar10", tmp_path, train=False, download=False, check_md5=False)
    assert torch.equal(images, torch.from_numpy(data.reshape(2, 3, 32, 32)))
    assert labels.tolist() == [4, 9]


# --------------------------------------------------------------------------- missing files


@pytest.mark.parametrize("name", COLOUR)
def test_missing_files_without_download(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataSourceError) as err:
        load(name, tmp_path / "data", train=True, download=False)
    message = str(err.value)
    folder = named(name, tmp_path / "data").folder.resolve()
    assert f"in {folder}" in message and "skipped (download=False)" in message
    assert all(file_name in message for file_name in NAMED[name].files)
    assert all(url in message for url in URLS[name])
    assert f"none known for {name}" in message
    assert err.value.__cause__ is None and "Traceback" not in message
    assert not (tmp_path / "data").exists()  # nothing created


@pytest.mark.parametrize("name", COLOUR)
def test_failing_download_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    calls = []

    def offline(self) -> None:
        calls.append(self.root)
        raise RuntimeError("Error downloading: no network in this test")

    monkeypatch.setattr(NAMED[name].torchvision_class, "download", offline)
    with pytest.raises(DataSourceError) as err:
        ensure(name, tmp_path, download=True)
    message = str(err.value)
    assert calls and all(Path(root).parent == tmp_path for root in calls)  # staged beside the folder
    assert "no network in this test" in message and "torchvision download" in message
    assert str(named(name, tmp_path).folder.resolve()) in message
    assert all(url in message for url in URLS[name])
    assert all(file_name in message for file_name in NAMED[name].files)
    assert list(tmp_path.iterdir()) == []  # no staging folder, no empty dataset folder left


def test_svhn_only_the_missing_file_is_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = write_synthetic_colour(tmp_path, "svhn", N_TRAIN, N_TEST)
    written["files"]["test_32x32.mat"].unlink()
    monkeypatch.setattr(torchvision.datasets.SVHN, "download", lambda self: 1 / 0)
    with pytest.raises(DataSourceError) as err:
        ensure("svhn", tmp_path, download=True, check_md5=False)
    message = str(err.value)
    assert "missing test_32x32.mat" in message and URLS["svhn"][1] in message and URLS["svhn"][0] not in message
    assert "ZeroDivisionError" in message


@pytest.mark.parametrize("name", COLOUR)
def test_download_is_staged_verified_and_moved_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  name: str) -> None:
    """A working download (faked: it writes the synthetic files where torchvision would) ends with the files in
    place, a file already there kept, and no staging folder left."""
    cls = NAMED[name].torchvision_class
    source = tmp_path / "source"
    written = write_synthetic_colour(source, name, N_TRAIN, N_TEST)

    def fake_download(self) -> None:
        target = Path(self.root) / ("cifar-10-batches-py" if name == "cifar10" else "")
        target.mkdir(parents=True, exist_ok=True)
        for file_name, path in written["files"].items():
            (target / file_name).write_bytes(path.read_bytes())

    monkeypatch.setattr(cls, "download", fake_download)
    bypass_md5_checks(monkeypatch, cls)
    data_dir = tmp_path / "data"
    folder = named(name, data_dir).folder
    folder.mkdir(parents=True)
    kept_name = list(written["files"])[-1]
    kept = folder / kept_name
    kept.write_bytes(written["files"][kept_name].read_bytes())
    kept_mtime = kept.stat().st_mtime_ns

    assert ensure(name, data_dir, download=True, check_md5=False) == folder
    assert snapshot(folder) == {f: p.read_bytes() for f, p in written["files"].items()}
    assert kept.stat().st_mtime_ns == kept_mtime
    assert sorted(p.name for p in data_dir.iterdir()) == [folder.name]
    images, labels = load(name, data_dir, train=True, download=False, check_md5=False)
    assert torch.equal(images, torch.from_numpy(written["train"][0]))

    # with the md5 check on, the fetched (synthetic) files fail it: nothing is moved in
    for path in folder.iterdir():
        path.unlink()
    with pytest.raises(DataSourceError) as err:
        ensure(name, data_dir, download=True, check_md5=True)
    assert "md5 mismatch" in str(err.value) and "<fetched>" in str(err.value)
    assert snapshot(folder) == {}
    assert sorted(p.name for p in data_dir.iterdir()) == [folder.name]


# --------------------------------------------------------------------------- the data module


@pytest.mark.parametrize("name", COLOUR)
def test_datamodule_on_colour_dataset(tmp_path: Path, name: str) -> None:
    written = write_synthetic_colour(tmp_path, name, 100, 20)
    dm = SemiSupervisedDataModule(dataset=name, data_dir=str(tmp_path), num_labelled=20, val_size=10, batch_size=10,
                                  labelled_batch_size=10, download=False, check_md5=False, binarize="none")
    assert dm.num_classes == 10 and dm.input_shape == (3, 32, 32)
    dm.prepare_data()
    dm.setup("fit")
    batch, batch_idx, dataloader_idx = next(iter(dm.train_dataloader()))
    batch = dm.on_after_batch_transfer(batch, 0)
    x, y = batch["labelled"]
    u = batch["unlabelled"]
    for images in (x, u):
        assert images.shape == (10, 3, 32, 32) and images.dtype == torch.float32
        assert 0 <= images.min() and images.max() <= 1
    assert y.dtype == torch.int64 and y.shape == (10,) and 0 <= y.min() and y.max() <= 9
    all_images = torch.from_numpy(written["train"][0]).float().div(255).flatten(1)
    match = (u.flatten(1)[:, None, :] == all_images[None]).all(-1)  # each unlabelled image is a training image
    assert (match.sum(1) == 1).all()


# --------------------------------------------------------------------------- the table


def test_class_names_of_every_dataset() -> None:
    for name, cls in NAMED.items():
        assert isinstance(cls.classes, tuple) and len(named(name).class_names) == 10, name
        assert all(isinstance(c, str) and c for c in cls.classes) and len(set(cls.classes)) == 10
    digits = tuple("0123456789")
    assert NAMED["mnist"].classes == NAMED["svhn"].classes == digits
    assert NAMED["fashion_mnist"].classes == ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                                     "Shirt", "Sneaker", "Bag", "Ankle boot")
    assert NAMED["kmnist"].classes == tuple(torchvision.datasets.KMNIST.classes)
    assert NAMED["cifar10"].classes == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                               "horse", "ship", "truck")


def test_colour_dataset_table(tmp_path: Path) -> None:
    svhn, cifar = NAMED["svhn"], NAMED["cifar10"]
    assert svhn.torchvision_class is torchvision.datasets.SVHN and cifar.torchvision_class is torchvision.datasets.CIFAR10
    assert (svhn.image_shape, svhn.train_size, svhn.test_size) == ((3, 32, 32), 73257, 26032)
    assert (cifar.image_shape, cifar.train_size, cifar.test_size) == ((3, 32, 32), 50000, 10000)
    assert svhn.md5 == {"train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
                            "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3"}
    assert set(cifar.md5) == {f"data_batch_{i}" for i in range(1, 6)} | {"test_batch", "batches.meta"}
    assert cifar.md5["test_batch"] == "40351d587109b95175f43aff81a1287e"
    assert named("cifar10", tmp_path).folder == tmp_path / "cifar-10-batches-py"
    assert named("svhn", tmp_path).folder == tmp_path / "SVHN"
    assert named("mnist", tmp_path).folder == tmp_path / "MNIST" / "raw"
