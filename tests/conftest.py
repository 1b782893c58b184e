"""Shared fixtures: a small synthetic MNIST written as valid IDX files, data modules on it, a small VAE checkpoint.

No test here reads the real MNIST under ``data/`` or touches the network.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ssvae_pl.data.sources import idx as sources
from ssvae_pl.data.sources import named
from ssvae_pl.data.sources.idx import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, idx_bytes

# The models here are tiny: one intra-op thread is as fast, and it avoids the many-fold slow-down of OpenMP
# threads competing with other processes for a small machine's cores. Subprocesses get OMP_NUM_THREADS=1 too.
torch.set_num_threads(1)

N_TRAIN, N_TEST, NUM_CLASSES = 600, 200, 10
VAL_SIZE = 100  # the data module checks val_size against MNIST's 60,000; the synthetic train set holds 600

# Synthetic-data settings for SemiSupervisedDataModule (no download, no md5: the files are not the official ones).
SYNTHETIC = dict(dataset="mnist", val_size=VAL_SIZE, download=False, check_md5=False)



def synthetic_images(labels: np.ndarray, seed: int) -> np.ndarray:
    """28x28 uint8 grey images: a bright class-dependent block on a dim background, plus noise.

    Every pixel is strictly between 0 and 255, so a Bernoulli sample of any image is genuinely random.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    images = rng.integers(10, 60, size=(n, 28, 28))  # dim, noisy background
    for i, c in enumerate(labels):
        row, col = divmod(int(c), 5)  # classes 0-4 in the top half, 5-9 in the bottom half
        r0, c0 = 2 + 12 * row, 1 + 5 * col
        images[i, r0 : r0 + 12, c0 : c0 + 5] = rng.integers(180, 250, size=(12, 5))
    return images.astype(np.uint8)


def balanced_labels(n: int, seed: int) -> np.ndarray:
    """``n / 10`` labels of each class, shuffled."""
    return np.random.default_rng(seed).permutation(np.arange(n) % NUM_CLASSES).astype(np.uint8)


def write_synthetic_mnist(root: Path, n_train: int = N_TRAIN, n_test: int = N_TEST) -> dict[str, np.ndarray]:
    """Write the four MNIST IDX files into ``root/MNIST/raw``; return the arrays written."""
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    train_labels, test_labels = balanced_labels(n_train, 0), balanced_labels(n_test, 1)
    arrays = {
        sources.TRAIN_IMAGES: synthetic_images(train_labels, 2),
        sources.TRAIN_LABELS: train_labels,
        sources.TEST_IMAGES: synthetic_images(test_labels, 3),
        sources.TEST_LABELS: test_labels,
    }
    for name, array in arrays.items():
        magic = IDX_IMAGES_MAGIC if array.ndim == 3 else IDX_LABELS_MAGIC
        (raw / name).write_bytes(idx_bytes(array, magic))
    assert sorted(arrays) == sorted(sources.RAW_FILES)
    return arrays


def ensure(name: str, root, download: bool = True, check_md5: bool = True) -> Path:
    """The named dataset's files under ``root``, found, fetched and verified: their folder."""
    return named(name, root, download, check_md5).ensure_files()


def load(name: str, root, train: bool, download: bool = True, check_md5: bool = True):
    """One split of the named dataset under ``root``: uint8 images (N, C, H, W), int64 labels."""
    dataset = named(name, root, download, check_md5)
    dataset.ensure_files()
    return dataset.load(train)


@pytest.fixture
def mnist_dir(tmp_path: Path) -> Path:
    """A fresh ``data_dir`` holding the synthetic MNIST (600 train, 200 test images) under ``MNIST/raw``."""
    write_synthetic_mnist(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def synthetic_mnist(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """The synthetic MNIST written once per session, for tests that only read it: (data_dir, arrays by file name)."""
    root = tmp_path_factory.mktemp("synthetic_data")
    return root, write_synthetic_mnist(root)


@pytest.fixture(scope="session")
def shared_mnist_dir(synthetic_mnist) -> Path:
    """``data_dir`` of the session's synthetic MNIST."""
    return synthetic_mnist[0]


@pytest.fixture
def make_dm(shared_mnist_dir: Path):
    """Factory of ``SemiSupervisedDataModule`` on the synthetic data; keyword arguments override the defaults."""
    from ssvae_pl.data.datamodule import SemiSupervisedDataModule

    def make(**kwargs) -> SemiSupervisedDataModule:
        options = dict(SYNTHETIC, data_dir=str(shared_mnist_dir), num_labelled=100, batch_size=50,
                       labelled_batch_size=20, eval_batch_size=64)
        options.update(kwargs)
        return SemiSupervisedDataModule(**options)

    return make


def quiet_trainer(**kwargs):
    """A CPU ``pl.Trainer`` without progress bar, model summary or sanity check; keyword arguments override."""
    import pytorch_lightning as pl

    options = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0, logger=False, enable_checkpointing=False)
    options.update(kwargs)
    return pl.Trainer(**options)


@pytest.fixture(autouse=True)
def _quiet_lightning():
    """Lightning's info lines and its warnings about tiny CPU runs are noise here."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*number of training batches.*")
        warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
        yield


@pytest.fixture(scope="session")
def vae_checkpoint(tmp_path_factory: pytest.TempPathFactory, shared_mnist_dir: Path) -> Path:
    """A checkpoint of a small VAE (hidden [32], z of 4) fitted for 2 steps on the synthetic data by a Trainer, then
    validated once (which measures its ``latent_mean_std``, as every fit with validation images does)."""
    from ssvae_pl.data.datamodule import SemiSupervisedDataModule
    from ssvae_pl.models import VAE

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("vae")
    dm = SemiSupervisedDataModule(**SYNTHETIC, data_dir=str(shared_mnist_dir), num_labelled=100, batch_size=50,
                                  labelled_batch_size=20)
    model = VAE(hidden_dims=[32], latent_dim=4)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, default_root_dir=str(root))
    trainer.fit(model, datamodule=dm)
    quiet_trainer(limit_val_batches=1, default_root_dir=str(root)).validate(model, datamodule=dm)
    path = root / "vae.ckpt"
    trainer.save_checkpoint(path)
    return path


def assert_restored_equals(restored, model, x) -> None:
    """A model restored from its checkpoint predicts exactly as the trained one, and holds the same tensors."""
    model.eval()
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


@pytest.fixture(scope="session")
def classifier_checkpoint(tmp_path_factory: pytest.TempPathFactory, shared_mnist_dir: Path,
                          vae_checkpoint: Path) -> Path:
    """``last.ckpt`` of a LatentClassifier (hidden [8]) on the small VAE, fitted for 2 steps through the ``ssvae``
    command's code in this process (so the checkpoint is exactly what ``ssvae fit`` writes)."""
    from ssvae_pl.cli import main

    root = tmp_path_factory.mktemp("classifier")
    config = Path(__file__).resolve().parents[1] / "configs" / "mnist" / "m1_classifier.yaml"
    with warnings.catch_warnings():  # LightningCLI warns that pytest's own arguments are in sys.argv
        warnings.simplefilter("ignore")
        main(["fit", "-c", str(config), "--model.vae_checkpoint", str(vae_checkpoint),
              "--model.init_args.hidden_dims", "[8]", "--data.data_dir", str(shared_mnist_dir), "--data.download",
              "false", "--data.check_md5", "false", "--data.val_size", str(VAL_SIZE), "--data.batch_size", "100",
              "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
              "--trainer.logger.init_args.save_dir", str(root / "lightning_logs")])
    return root / "lightning_logs" / "m1_classifier" / "version_0" / "checkpoints" / "last.ckpt"
