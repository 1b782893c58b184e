"""Shared fixtures: the synthetic MNIST (helpers/synthetic.py) on disk, data modules on it, small checkpoints.

No test here reads the real MNIST under ``data/`` or touches the network.
"""

from __future__ import annotations

import os

# The shipped configs say model.compile auto; compiling each tiny test model would cost far more than it runs. So
# torch.compile is off here and in the tests' subprocesses (torch reads this when it is imported); the tests of
# compiling itself switch it back on (test_compile.py).
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import logging  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from helpers.synthetic import SYNTHETIC, VAL_SIZE, write_synthetic_mnist  # noqa: E402
from helpers.trainers import quiet_trainer  # noqa: E402

# The models here are tiny: one intra-op thread is as fast, and it avoids the many-fold slow-down of OpenMP
# threads competing with other processes for a small machine's cores. Subprocesses get OMP_NUM_THREADS=1 too.
torch.set_num_threads(1)


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
