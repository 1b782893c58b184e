"""The SVHN and CIFAR-10 configs (convolutional networks, discretised logistic likelihood) run through the ``ssvae``
command's code on small synthetic files in torchvision's layout: M1's VAE and classifier, M2, and M1+M2."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from helpers.colour_data import write_synthetic_colour

REPO = Path(__file__).resolve().parents[1]
DEBUG = str(REPO / "configs" / "presets" / "debug.yaml")


def run(*args: str) -> None:
    from ssvae_pl.cli import main

    with warnings.catch_warnings():  # LightningCLI warns that pytest's own arguments are in sys.argv
        warnings.simplefilter("ignore")
        main(list(args))


@pytest.mark.parametrize("dataset", ["svhn", "cifar10"])
def test_the_colour_configs_run(dataset: str, tmp_path: Path) -> None:
    write_synthetic_colour(tmp_path / "data", dataset, n_train=300, n_test=60)
    config = lambda model: str(REPO / "configs" / dataset / f"{model}.yaml")  # noqa: E731
    data = ["--data.data_dir", str(tmp_path / "data"), "--data.download", "false", "--data.check_md5", "false",
            "--data.num_labelled", "100", "--data.val_size", "50", "--data.batch_size", "50",
            "--data.labelled_batch_size", "20"]
    quiet = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    logs = tmp_path / "lightning_logs"
    # M1's conv VAE: two steps and a validation batch, so that it leaves a checkpoint for the models built on it
    run("fit", "-c", config("m1_vae"), *data, *quiet, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
        "--trainer.logger.init_args.save_dir", str(logs), "--trainer.logger.init_args.version", "vae")
    vae = logs / f"{dataset}_m1_vae" / "vae" / "checkpoints" / "last.ckpt"
    hparams = torch.load(vae, weights_only=True)["hyper_parameters"]
    assert hparams["conv_channels"] == [32, 64, 128] and hparams["likelihood"] == "discretized_logistic"
    assert list(hparams["input_shape"]) == [3, 32, 32]
    # fast_dev_run (one batch of each stage, nothing written) of M2 on the images, M1+M2 and M1's classifier
    run("fit", "-c", config("m2"), "-c", DEBUG, *data, *quiet)
    # (a VAE fitted for 2 steps uses no latent dimension yet, so M1+M2 keeps them all: m1_active_threshold 0)
    run("fit", "-c", config("m1m2"), "-c", DEBUG, *data, *quiet, "--model.init_args.vae_checkpoint", str(vae),
        "--model.init_args.m1_active_threshold", "0")
    run("fit", "-c", config("m1_classifier"), "-c", DEBUG, *data, *quiet, "--model.init_args.vae_checkpoint", str(vae))
