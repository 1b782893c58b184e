"""SemiSupervisedDataModule (ssvae_pl/data/datamodule.py) on a small synthetic MNIST: batches, binarisation,
splits, validation of its arguments and the record of the labelled indices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import CombinedLoader

from helpers.synthetic import N_TRAIN, SYNTHETIC, VAL_SIZE
from helpers.trainers import quiet_trainer
from ssvae_pl.data.sources import idx as sources
from ssvae_pl.data.batches import binarize, to_model_input
from ssvae_pl.data.datamodule import LABELLED_INDICES_FILE, SemiSupervisedDataModule
from ssvae_pl.errors import ConfigError


def epoch_batches(dm: SemiSupervisedDataModule) -> list[dict]:
    """One epoch of training batches, as Lightning's fit loop sees them (after ``on_after_batch_transfer``)."""
    loader = dm.train_dataloader()
    assert isinstance(loader, CombinedLoader) and loader._mode == "min_size"
    batches = []
    for item in loader:  # min_size yields (batch, batch_idx, dataloader_idx)
        batch, batch_idx, dataloader_idx = item
        assert (batch_idx, dataloader_idx) == (len(batches), 0)
        assert batch["unlabelled"].dtype == batch["labelled"][0].dtype == torch.uint8  # floats only on the device
        batches.append(dm.on_after_batch_transfer(batch, 0))
    return batches


def test_training_batches_have_labelled_and_unlabelled_parts(make_dm) -> None:
    """Each training batch is {"labelled": (x, y), "unlabelled": x}, binary floats and int64 labels; an epoch is
    one pass over the unlabelled images, and the labelled images it cycles through stay class-balanced."""
    torch.manual_seed(0)
    dm = make_dm(num_labelled=100, labelled_batch_size=20, batch_size=50, binarize="dynamic")
    dm.setup("fit")
    batches = epoch_batches(dm)
    assert len(batches) == (N_TRAIN - VAL_SIZE) // 50  # 10 unlabelled batches; 5 labelled ones per pass
    labels = []
    for batch in batches:
        assert set(batch) == {"labelled", "unlabelled"}
        x, y = batch["labelled"]
        u = batch["unlabelled"]
        assert x.shape == (20, 1, 28, 28) and u.shape == (50, 1, 28, 28)
        assert x.dtype == u.dtype == torch.float32 and y.dtype == torch.int64 and y.shape == (20,)
        for images in (x, u):
            assert ((images == 0) | (images == 1)).all()
        labels.append(y)
    # 10 batches of 20 = two full passes over the 100 labelled images, 10 per class each
    assert torch.bincount(torch.cat(labels), minlength=10).tolist() == [20] * 10


def test_labelled_stream_is_reshuffled_on_every_pass(make_dm) -> None:
    """With 20 labelled images in batches of 10, each pair of batches is one pass: a permutation of all 20, and
    consecutive passes come in different orders."""
    torch.manual_seed(0)
    dm = make_dm(num_labelled=20, labelled_batch_size=10, batch_size=50, binarize="none")
    dm.setup("fit")
    labelled = dm.labelled_dataset().images.float().div(255).flatten(1)  # (20, 784): grey images, all distinct
    order = []
    for batch in epoch_batches(dm):
        x, y = batch["labelled"]
        match = (x.flatten(1)[:, None, :] == labelled[None]).all(-1)  # (10, 20)
        assert (match.sum(1) == 1).all()
        which = match.int().argmax(1)
        assert torch.equal(y, dm.labelled_dataset().labels[which])
        order += which.tolist()
    passes = [order[i : i + 20] for i in range(0, len(order), 20)]
    assert len(passes) == 5
    for p in passes:
        assert sorted(p) == list(range(20))  # every image exactly once per pass
    assert all(a != b for a, b in zip(passes, passes[1:]))


def test_binarize_is_a_bernoulli_sample_of_each_pixel() -> None:
    """Black stays 0 and white 1 in every draw, a grey level p is 1 in a share p of the draws, and each draw is
    fresh."""
    torch.manual_seed(0)
    ends = torch.tensor([0.0, 1.0]).repeat(50_000)
    assert torch.equal(binarize(ends), ends)
    grey = torch.full((400_000,), 0.3)
    first, second = binarize(grey), binarize(grey)
    assert first.dtype == torch.float32 and ((first == 0) | (first == 1)).all()
    assert abs(first.mean().item() - 0.3) < 0.003  # 4 standard errors
    assert abs((first == second).float().mean().item() - (0.3**2 + 0.7**2)) < 0.003  # independent draws


def test_dynamic_static_and_no_binarisation(make_dm, synthetic_mnist) -> None:
    """The datasets give uint8 images; on the device, training batches become a fresh Bernoulli sample each time
    (dynamic), the same sample every time (static) or the grey levels uint8 / 255 (none)."""
    torch.manual_seed(0)
    raw_images = torch.from_numpy(synthetic_mnist[1][sources.TRAIN_IMAGES]).float().div(255).unsqueeze(1)

    def training_batch(dm, indices):
        return dm.on_after_batch_transfer({"unlabelled": dm.unlabelled_dataset().__getitems__(indices)}, 0)

    dynamic = make_dm(binarize="dynamic")
    dynamic.setup("fit")
    first, second = training_batch(dynamic, [3, 4])["unlabelled"], training_batch(dynamic, [3, 4])["unlabelled"]
    assert first.shape == (2, 1, 28, 28) and first.dtype == torch.float32
    assert ((first == 0) | (first == 1)).all() and ((second == 0) | (second == 1)).all()
    assert not torch.equal(first, second)
    # a fresh sample has the grey image as its mean: average many draws
    u8 = dynamic.labelled_dataset().__getitems__([0])[0]
    mean = torch.stack([to_model_input(u8, dynamic=True) for _ in range(400)]).mean(0)[0]
    grey = raw_images[dynamic.split.labelled[0]]
    assert (mean - grey).abs().mean() < 0.03
    # evaluation batches (tuples) are never binarised on the fly
    assert torch.equal(dynamic.on_after_batch_transfer((u8, None), 0)[0], u8.float() / 255)

    static = make_dm(binarize="static")
    static.setup("fit")
    first = training_batch(static, [0])["unlabelled"][0]
    assert ((first == 0) | (first == 1)).all() and not torch.equal(first, raw_images[static.split.train[0]].round())
    assert torch.equal(first, training_batch(static, [0])["unlabelled"][0])

    none = make_dm(binarize="none")
    none.setup("fit")
    x, y = to_model_input(none.labelled_dataset().__getitems__(list(range(100))))
    assert torch.equal(x, raw_images[none.split.labelled])
    assert torch.equal(y, torch.from_numpy(synthetic_mnist[1][sources.TRAIN_LABELS]).long()[none.split.labelled])
    assert torch.equal(training_batch(none, [0, 1])["unlabelled"], raw_images[none.split.train[:2]])


def test_evaluation_batches_are_deterministic(make_dm) -> None:
    """Validation and test batches use one fixed binarisation: two calls give identical batches."""
    dm = make_dm(binarize="dynamic", eval_batch_size=64)
    dm.setup("fit")
    for make_loader, n in ((dm.val_dataloader, VAL_SIZE), (dm.test_dataloader, 200)):
        first, second = list(make_loader()), list(make_loader())
        assert len(first) == -(-n // 64) and sum(len(b[1]) for b in first) == n
        for (x1, y1), (x2, y2) in zip(first, second):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
            assert ((x1 == 0) | (x1 == 255)).all() and x1.dtype == torch.uint8 and y1.dtype == torch.int64
    predict = [b[0] for b in dm.predict_dataloader()]
    assert all(torch.equal(a[0], b) for a, b in zip(list(dm.test_dataloader()), predict))


def test_unlabelled_images_all_or_rest(make_dm, synthetic_mnist) -> None:
    """By default the unlabelled part is every training image (labelled ones included); ``rest`` leaves the
    labelled images out."""
    raw_images = torch.from_numpy(synthetic_mnist[1][sources.TRAIN_IMAGES]).unsqueeze(1)
    dm = make_dm(binarize="none", num_labelled=50)
    dm.setup("fit")
    assert len(dm.unlabelled_dataset()) == N_TRAIN - VAL_SIZE
    assert torch.equal(dm.unlabelled_dataset().images, raw_images[dm.split.train])
    assert torch.isin(dm.split.labelled, dm.split.train).all()
    assert dm.unlabelled_dataset().labels is None

    rest = make_dm(binarize="none", num_labelled=50, unlabelled="rest")
    rest.setup("fit")
    assert torch.equal(rest.split.labelled, dm.split.labelled)
    assert len(rest.unlabelled_dataset()) == N_TRAIN - VAL_SIZE - 50
    kept = rest.split.train[~torch.isin(rest.split.train, rest.split.labelled)]
    assert torch.equal(rest.unlabelled_dataset().images, raw_images[kept])
    labelled_rows = raw_images[rest.split.labelled].flatten(1)
    unlabelled_rows = rest.unlabelled_dataset().images.flatten(1)
    assert not (unlabelled_rows[:, None] == labelled_rows[None]).all(-1).any()


def test_cached_features_cover_the_training_split_only(make_dm, synthetic_mnist) -> None:
    """``training_images`` yields the training split's images and never a validation one; after
    ``use_training_features`` the labelled and unlabelled datasets yield the rows of their own images, until the
    fit ends."""
    raw_images = torch.from_numpy(synthetic_mnist[1][sources.TRAIN_IMAGES]).unsqueeze(1)
    dm = make_dm(binarize="none", num_labelled=50)
    dm.setup("fit")
    seen = torch.cat(list(dm.training_images(chunk=300))).flatten(1)
    assert len(seen) == N_TRAIN - VAL_SIZE == dm.num_training_images
    val_rows = to_model_input(raw_images[dm.split.val]).flatten(1)
    assert not (seen[:, None] == val_rows[None]).all(-1).any()
    with pytest.raises(ValueError, match="one per training image"):
        dm.use_training_features(seen[:-1])
    dm.use_training_features(seen)
    assert torch.equal(dm.labelled_dataset().images, to_model_input(raw_images[dm.split.labelled]).flatten(1))
    assert torch.equal(dm.unlabelled_dataset().images, to_model_input(raw_images[dm.split.train]).flatten(1))
    dm.teardown("fit")
    assert torch.equal(dm.unlabelled_dataset().images, raw_images[dm.split.train])


def test_exposed_numbers_and_seeded_labelled_subset(make_dm) -> None:
    """num_classes and input_shape are exposed; the labelled subset depends on ``seed`` alone."""
    dm = make_dm(seed=0)
    assert dm.num_classes == 10 and dm.input_shape == (1, 28, 28)
    dm.setup("fit")
    same, other = make_dm(seed=0), make_dm(seed=1)
    same.setup("fit")
    other.setup("fit")
    assert len(dm.split.labelled) == 100 and len(dm.split.val) == VAL_SIZE
    assert torch.equal(dm.split.labelled, same.split.labelled) and torch.equal(dm.split.val, same.split.val)
    assert not torch.equal(dm.split.labelled, other.split.labelled)
    assert torch.bincount(dm.labelled_dataset().labels, minlength=10).tolist() == [10] * 10
    dm.setup("fit")  # a second setup keeps the split
    assert torch.equal(dm.split.labelled, same.split.labelled)


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("data.num_labelled", dict(num_labelled=0)),
        ("data.num_labelled", dict(num_labelled=105)),
        ("data.num_labelled", dict(num_labelled=-10)),
        ("data.val_size", dict(val_size=-1)),
        ("data.val_size", dict(val_size=60000)),
        ("data.dataset", dict(dataset="imagenet")),
        ("data.labelled_batch_size", dict(labelled_batch_size=0)),
        ("data.num_workers", dict(num_workers=-1)),
    ],
)
def test_bad_config_values_raise_config_error_naming_the_field(tmp_path: Path, field: str, kwargs: dict) -> None:
    """Values that cannot work are rejected at construction, before any data is read, naming the field."""
    options = dict(SYNTHETIC, data_dir=str(tmp_path / "nothing_here"))
    options.update(kwargs)
    with pytest.raises(ConfigError) as err:
        SemiSupervisedDataModule(**options)
    assert field in str(err.value)


def test_labelled_indices_written_to_the_run_log_folder(mnist_dir: Path, tmp_path: Path) -> None:
    """With a logger attached, setup writes labelled_indices.json into the run's version folder, holding the
    indices (and labels) the data module actually uses."""
    from ssvae_pl.models import VAE

    torch.manual_seed(0)
    dm = SemiSupervisedDataModule(**SYNTHETIC, data_dir=str(mnist_dir), num_labelled=30, seed=3, batch_size=100,
                                  labelled_batch_size=30)
    logger = TensorBoardLogger(save_dir=str(tmp_path / "logs"), name="run")
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, logger=logger)
    trainer.fit(VAE(hidden_dims=[16], latent_dim=2), datamodule=dm)

    path = tmp_path / "logs" / "run" / "version_0" / LABELLED_INDICES_FILE
    assert path.is_file() and Path(trainer.log_dir) == path.parent
    record = json.loads(path.read_text())
    assert record["labelled_indices"] == dm.split.labelled.tolist()
    assert record["val_indices"] == dm.split.val.tolist()
    assert record["labelled_labels"] == dm.labelled_dataset().labels.tolist()
    assert sorted(record["labelled_labels"]) == sorted(list(range(10)) * 3)
    assert (record["dataset"], record["seed"], record["num_labelled"], record["val_size"]) == ("mnist", 3, 30,
                                                                                              VAL_SIZE)


def test_standalone_setup_writes_no_record(make_dm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a Trainer there is no log folder, and nothing is written."""
    monkeypatch.chdir(tmp_path)
    dm = make_dm()
    dm.setup("fit")
    assert list(tmp_path.iterdir()) == []


def test_batch_size_larger_than_the_unlabelled_set_is_rejected_or_still_trains(make_dm) -> None:
    """500 unlabelled images with batch_size=1000: either a ConfigError naming data.batch_size, or an epoch that
    has batches; never an epoch with no training step at all."""
    dm = make_dm(batch_size=1000, num_labelled=100, labelled_batch_size=100)
    try:
        dm.setup("fit")
        batches = epoch_batches(dm)
    except ConfigError as err:
        assert "data.batch_size" in str(err)
    else:
        assert len(batches) > 0
