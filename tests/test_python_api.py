"""The Python API: ``from ssvae_pl import ...``, the data module's ``model_kwargs``, constructor defaults that are the
shipped MNIST recipe, models that take the loaders' uint8 images, and the README's Python example."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers.synthetic import SYNTHETIC, write_synthetic_mnist

REPO = Path(__file__).resolve().parents[1]
MNIST_CONFIGS = REPO / "configs" / "mnist"
PUBLIC = ("VAE", "LatentClassifier", "M2", "M1M2", "SemiSupervisedDataModule")


def test_the_classes_import_from_the_package_and_import_ssvae_pl_stays_light() -> None:
    import ssvae_pl
    from ssvae_pl import M2, VAE, LatentClassifier, SemiSupervisedDataModule
    from ssvae_pl.data.datamodule import SemiSupervisedDataModule as DataModuleItself
    from ssvae_pl.models import M2 as M2Itself

    assert (M2, SemiSupervisedDataModule) == (M2Itself, DataModuleItself)
    assert {VAE.__name__, LatentClassifier.__name__} == {"VAE", "LatentClassifier"}
    assert set(PUBLIC) <= set(ssvae_pl.__all__) and set(PUBLIC) <= set(dir(ssvae_pl))
    with pytest.raises(AttributeError, match="no attribute 'NotAModel'"):
        ssvae_pl.NotAModel  # noqa: B018
    loaded = subprocess.run([sys.executable, "-c", "import sys, ssvae_pl; print('torch' in sys.modules)"],
                            capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "False"  # the classes load on first use


def test_the_data_module_hands_its_shapes_and_classes_to_a_model(make_dm) -> None:
    from ssvae_pl.models import M2

    dm = make_dm()
    kwargs = dm.model_kwargs()
    assert kwargs == {"input_shape": (1, 28, 28), "num_classes": 10, "class_names": [str(k) for k in range(10)]}
    model = M2(**kwargs, hidden_dims=[8], classifier_hidden_dims=[8], latent_dim=2)
    assert model.hparams.class_names == kwargs["class_names"] and model.hparams.num_classes == 10
    # the names the ssvae command links from the data module into every model
    cli = (REPO / "ssvae_pl" / "cli.py").read_text()
    assert set(kwargs) == set(re.findall(r'link_arguments\("data\.(\w+)"', cli))


def image_folder_kwargs(tmp_path: Path) -> dict:
    from PIL import Image

    for name in ("cat", "dog", "emu"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "a.png")
    from ssvae_pl import ImageFolder

    return dict(dataset=ImageFolder(str(tmp_path), image_size=[16, 12], channels=3), val_size=0, num_labelled=None)


def test_model_kwargs_of_an_image_folder_are_known_before_setup(tmp_path: Path) -> None:
    from ssvae_pl.data.datamodule import SemiSupervisedDataModule

    dm = SemiSupervisedDataModule(**image_folder_kwargs(tmp_path))
    assert dm.model_kwargs() == {"input_shape": (3, 16, 12), "num_classes": 3, "class_names": ["cat", "dog", "emu"]}


# ---- defaults: the shipped MNIST configs --------------------------------------------------------------------------


def config(name: str) -> dict:
    return yaml.safe_load((MNIST_CONFIGS / name).read_text())


def defaults(cls) -> dict:
    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def plain(value):
    return list(value) if isinstance(value, tuple) else value


def assert_optimizer_is_the_configs(model, config_name: str) -> None:
    """The optimizer a plain Trainer gets (``configure_optimizers``) is the config's."""
    options = config(config_name)["optimizer"]
    optimizer = model.configure_optimizers()
    assert f"torch.optim.{type(optimizer).__name__}" == options["class_path"]
    group = optimizer.param_groups[0]
    for key, value in options["init_args"].items():
        assert plain(group[key]) == value, key


def test_the_vae_defaults_are_configs_mnist_m1_vae() -> None:
    from ssvae_pl.models import VAE

    expected, given = config("m1_vae.yaml")["model"]["init_args"], defaults(VAE)
    assert {key: plain(given[key]) for key in expected} == expected
    assert_optimizer_is_the_configs(VAE(hidden_dims=[8], latent_dim=2), "m1_vae.yaml")


def test_the_latent_classifier_defaults_are_configs_mnist_m1_classifier(vae_checkpoint: Path) -> None:
    from ssvae_pl.models import LatentClassifier

    expected, given = config("m1_classifier.yaml")["model"]["init_args"], defaults(LatentClassifier)
    assert {key: plain(given[key]) for key in expected} == expected
    assert_optimizer_is_the_configs(LatentClassifier(vae_checkpoint=str(vae_checkpoint)), "m1_classifier.yaml")


def shipped_m2(**kwargs):
    """M2 with its defaults, knowing MNIST's sizes: N = 50,000 training images, N_l = 100 of them labelled."""
    from ssvae_pl.models import M2

    model = M2(**kwargs)
    model.set_data_sizes(num_labelled=100, num_unlabelled=50_000, num_train=50_000)
    return model


def test_the_m2_defaults_are_configs_mnist_m2() -> None:
    from ssvae_pl.models import M2

    expected, given = dict(config("m2.yaml")["model"]["init_args"]), defaults(M2)
    model = shipped_m2()
    assert "alpha" not in expected and model.alpha == 50_000  # alpha: None is N under weighting: batch
    assert model.likelihood == expected.pop("likelihood") == "bernoulli"  # likelihood: auto is bernoulli on images
    assert {key: plain(given[key]) for key in expected} == expected
    assert_optimizer_is_the_configs(model, "m2.yaml")


def test_the_data_module_defaults_are_configs_mnist_m2() -> None:
    from ssvae_pl.data.datamodule import SemiSupervisedDataModule

    expected, given = config("m2.yaml")["data"], defaults(SemiSupervisedDataModule)
    assert {key: plain(given[key]) for key in expected} == expected


def test_the_papers_objective_is_one_setting_away() -> None:
    """``weighting="dataset"`` alone gives the paper's J^alpha: the labelled and unlabelled bounds weighted by N_l/N
    and N_u/N, and alpha = 0.1 N."""
    paper = shipped_m2(weighting="dataset")
    assert paper.alpha == pytest.approx(5_000.0)
    assert paper.objective_weights() == pytest.approx((100 / 50_000, 1.0, 0.1))
    assert shipped_m2().objective_weights(100, 200) == pytest.approx((1 / 3, 2 / 3, 1 / 3 * 500))


# ---- the loaders' uint8 images ------------------------------------------------------------------------------------


@pytest.fixture(params=["dynamic", "none"])
def loader_batch(request, make_dm):
    """A validation batch as the loader yields it (uint8) and as the data module's hook hands it to the model."""
    dm = make_dm(binarize=request.param)
    dm.setup("fit")
    x, y = next(iter(dm.val_dataloader()))
    assert x.dtype == torch.uint8 and x.shape[1:] == (1, 28, 28)
    x_hook, y_hook = dm.on_after_batch_transfer((x, y), 0)
    assert x_hook.dtype == torch.float32 and torch.equal(y_hook, y)
    return x, x_hook, y


def tiny(name: str, vae_checkpoint: Path):
    from ssvae_pl.models import M1M2, M2, VAE, LatentClassifier

    torch.manual_seed(0)
    if name == "vae":
        return VAE(hidden_dims=[16], latent_dim=3)
    if name == "latent_classifier":
        return LatentClassifier(vae_checkpoint=str(vae_checkpoint), hidden_dims=[8])
    if name == "m1m2":
        return M1M2(vae_checkpoint=str(vae_checkpoint), m1_active_threshold=0, hidden_dims=[16],
                    classifier_hidden_dims=[8], latent_dim=3)
    return M2(hidden_dims=[16], classifier_hidden_dims=[8], latent_dim=3)


METHODS = {  # what takes images, by model
    "vae": ["forward", "latent_means", "reconstruct", "predict_step"],
    "latent_classifier": ["forward", "latent_means", "predict_step"],
    "m2": ["forward", "latent_means", "reconstruct", "analogies", "predict_step"],
    "m1m2": ["forward", "latent_means", "predict_step"],
}


@pytest.mark.parametrize("name, method", [(name, method) for name, methods in METHODS.items() for method in methods])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_model_takes_the_loaders_uint8_images(name: str, method: str, mode: str, loader_batch,
                                                vae_checkpoint: Path) -> None:
    """``model(x)`` (and the other methods that take images) on the loader's uint8 batch equals the same on the batch
    the data module's ``on_after_batch_transfer`` makes of it, with the same random draws."""
    x, x_hook, y = loader_batch
    model = tiny(name, vae_checkpoint)
    model.train(mode == "train")
    call = getattr(model, method)

    def run(images):
        torch.manual_seed(1)
        with torch.no_grad():
            return call((images, y), 0) if method == "predict_step" else call(images)

    torch.testing.assert_close(run(x), run(x_hook), rtol=0, atol=0)


# ---- the README's example ----------------------------------------------------------------------------------------------


def readme_python(marker: str, doc: str = "README.md") -> str:
    """The one Python block of ``doc`` (the README, or another page) that contains ``marker``."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / doc).read_text(), flags=re.S)
    found = [block for block in blocks if marker in block]
    assert len(found) == 1, f"{doc} holds one Python block with {marker!r}"
    return found[0]


def documented_example() -> str:
    return readme_python("SemiSupervisedDataModule(")


def test_the_documented_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's Python example, as written, on the synthetic MNIST in ``./data`` (no download, no md5
    check, a validation hold-out of 100 of its 600 images)."""
    import ssvae_pl
    from ssvae_pl.data.datamodule import SemiSupervisedDataModule

    code = documented_example()
    assert 15 <= len(code.strip().splitlines()) <= 25
    write_synthetic_mnist(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ssvae_pl, "SemiSupervisedDataModule",
                        lambda **kwargs: SemiSupervisedDataModule(**{**kwargs, **SYNTHETIC}))
    namespace: dict = {"__name__": "__main__"}
    exec(compile(code, "README.md", "exec"), namespace)

    x, probs, trainer = namespace["x"], namespace["probs"], namespace["trainer"]
    assert x.dtype == torch.uint8 and trainer.global_step > 0
    assert probs.shape == (len(x), 10)
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(len(x)))


def test_a_source_of_ones_own_is_chosen_by_class_path_and_kept_in_the_checkpoint(tmp_path: Path) -> None:
    """``data.dataset`` takes any ``ImageSource`` by class path: M2 fits and tests on it through the ``ssvae``
    command, and the checkpoint keeps the source's class path and arguments beside its class names."""
    from ssvae_pl.cli import main

    logs = tmp_path / "logs"
    common = ["-c", str(MNIST_CONFIGS / "m2.yaml"), "--data.dataset", "helpers.own_source.Stripes", "--data.dataset.n", "120",
              "--data.num_labelled", "10", "--data.val_size", "20", "--data.batch_size", "20",
              "--data.labelled_batch_size", "10", "--model.init_args.hidden_dims", "[16]",
              "--model.init_args.classifier_hidden_dims", "[16]", "--model.init_args.latent_dim", "2",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
              "--trainer.logger.init_args.save_dir", str(logs), "--trainer.logger.init_args.version", "run"]
    main(["fit", *common, "--trainer.max_epochs", "1"])
    checkpoint = torch.load(logs / "m2" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["class_names"] == ["row", "column"]
    assert checkpoint["hyper_parameters"]["input_shape"] == (1, 8, 8)
    assert checkpoint["datamodule_hyper_parameters"]["dataset"] == {"class_path": "helpers.own_source.Stripes",
                                                                     "init_args": {"n": 120, "seed": 0}}
    main(["test", *common[:-2], "--ckpt_path", str(logs / "m2" / "run" / "checkpoints" / "last.ckpt")])
