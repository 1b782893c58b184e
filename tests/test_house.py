"""A house for a family of models (issue 36, first part): models declare what they can show and how they are
judged, the callbacks read only that, and the always-on pieces are visible in ``--print_config``."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from test_refusals import ONE_STEP, data, home, refused, run, vae_fit  # noqa: F401  (home is a fixture)
from test_cli import REPO

M2_CONFIG = str(REPO / "configs" / "mnist" / "m2.yaml")


def test_a_model_that_declares_nothing_trains_tests_and_checkpoints(tmp_path: Path, home: Path) -> None:
    """No pictures, no probe, no best checkpoint (nothing to rank by), and last.ckpt written and tested."""
    config = tmp_path / "own.yaml"
    config.write_text(yaml.safe_dump({"model": {"class_path": "helpers.faulty_models.Undeclared"},
                                      "trainer": {"logger": {"init_args": {"name": "own"}}}}))
    common = ["-c", str(config), *data(home / "data")]
    assert run(tmp_path, "fit", *common, *ONE_STEP, "--trainer.max_epochs", "2") == 0
    folder = tmp_path / "lightning_logs" / "own" / "version_0"
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["last.ckpt"]
    events = EventAccumulator(str(folder)).Reload()
    assert events.Tags()["images"] == [] and "val/knn_acc" not in events.Tags()["scalars"]
    assert "val/acc" in events.Tags()["scalars"]
    assert run(tmp_path, "test", *common, "--ckpt_path", "last", "--trainer.enable_progress_bar", "false") == 0


def test_each_model_declares_its_pictures_and_monitor() -> None:
    from ssvae_pl.models import M2, VAE, LatentClassifier
    from ssvae_pl.models.declares import PICTURES, monitor_of, pictures_of

    vae, m2 = VAE(hidden_dims=[8], latent_dim=2), M2(hidden_dims=[8], classifier_hidden_dims=[8], latent_dim=2)
    assert pictures_of(vae) == {"reconstructions", "prior_samples", "latent_space", "knn_probe"} <= PICTURES
    assert pictures_of(m2) == {"reconstructions", "class_samples", "analogies", "latent_space", "confusion_matrix"}
    assert monitor_of(vae) == ("val/elbo", "max") and monitor_of(m2) == ("val/acc", "max")
    assert LatentClassifier.pictures(None) == {"latent_space", "confusion_matrix"}
    assert monitor_of(object()) is None and pictures_of(object()) == frozenset()


def test_print_config_lists_every_piece_that_runs_and_leave_out_drops_the_optional_ones(capsys) -> None:
    from ssvae_pl.callbacks.always_on import ALWAYS_ON, OPTIONAL

    assert run(Path.cwd(), "fit", "-c", M2_CONFIG, "--print_config") == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    listed = [c["class_path"].rsplit(".", 1)[-1] for c in printed["trainer"]["callbacks"]]
    assert listed == ["EMAWeights", *(piece.__name__ for piece in ALWAYS_ON)]
    assert [p["class_path"] for p in printed["trainer"]["plugins"]] == ["ssvae_pl.checkpoint_io.AtomicCheckpointIO"]

    leave_out = "[GenerativeImages, LatentSpace, ConfusionMatrix, LatentProbe, EpochTimer]"
    assert run(Path.cwd(), "test", "-c", M2_CONFIG, "--always_on.leave_out", leave_out, "--print_config") == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    listed = [c["class_path"].rsplit(".", 1)[-1] for c in printed["trainer"]["callbacks"]]
    assert listed == ["EMAWeights", "NonFiniteGuard", "SaveOnInterrupt", "SeedEachEpoch", "HParamsWithMetrics",
                      "RunProgressBar"]  # test writes no checkpoint
    assert "NonFiniteGuard" not in OPTIONAL
    assert run(Path.cwd(), "fit", "-c", M2_CONFIG, "--always_on.leave_out", "[NonFiniteGuard]") == 2
    assert "cannot be left out" in capsys.readouterr().err


def test_a_config_that_asks_for_a_picture_or_metric_the_model_lacks_is_one_error(home: Path, capsys) -> None:
    """BestCheckpoint's monitor and GenerativeImages' pictures name what the model declares, or the fit stops with
    one line naming the setting and what the model has, before anything is written; named well, they are obeyed."""
    config = home / "asks.yaml"
    asks = [({"class_path": "ssvae_pl.callbacks.BestCheckpoint", "init_args": {"monitor": "val/acc"}},
             ("trainer.callbacks.BestCheckpoint.monitor", "VAE has no validation metric 'val/acc'", "val/elbo")),
            ({"class_path": "ssvae_pl.callbacks.GenerativeImages", "init_args": {"pictures": ["class_samples"]}},
             ("trainer.callbacks.GenerativeImages.pictures", "VAE has no picture 'class_samples'", "prior_samples"))]
    for callback, names in asks:
        config.write_text(yaml.safe_dump({"trainer": {"callbacks": [callback]}}))
        refused(capsys, home, *vae_fit(home, "-c", str(config)), names=names)

    config.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "ssvae_pl.callbacks.BestCheckpoint", "init_args": {"monitor": "val/kl", "mode": "min"}},
        {"class_path": "ssvae_pl.callbacks.GenerativeImages", "init_args": {"pictures": ["reconstructions"]}}]}}))
    assert run(home, *vae_fit(home, "-c", str(config), "--trainer.logger.init_args.version", "asks")) == 0
    folder = home / "lightning_logs" / "m1_vae" / "asks"
    ckpt = torch.load(next((folder / "checkpoints").glob("best-epoch*.ckpt")), map_location="cpu", weights_only=False)
    assert ckpt["callbacks"]["BestCheckpoint"]["monitor"] == "val/kl"
    drawn = EventAccumulator(str(folder)).Reload().Tags()["images"]
    assert [tag for tag in drawn if tag.startswith("images/")] == ["images/reconstructions"]  # not prior_samples


def test_the_house_rules_hold_in_the_package() -> None:
    """No file in ssvae_pl/ over 450 lines and no function over 60; no ``hasattr`` of a model or a data module;
    the data module names no model and the models hand it no function (issue 36)."""
    import ast

    package = REPO / "ssvae_pl"
    too_long = []
    for path in sorted(package.rglob("*.py")):
        source = path.read_text()
        if len(source.splitlines()) > 450:
            too_long.append(f"{path.name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                too_long.append(f"{path.name}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert too_long == []
    asking = [f"{path.relative_to(package)}:{node.lineno}" for folder in ("callbacks", "models")
              for path in sorted((package / folder).glob("*.py"))
              for node in ast.walk(ast.parse(path.read_text()))
              if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "hasattr"
              and any(word in ast.unparse(node.args[0]) for word in ("module", "model", "self"))]
    assert asking == []
    data_code = "".join(p.read_text() for p in (package / "data").rglob("*.py"))
    module_code = (package / "data" / "datamodule.py").read_text() + (package / "data" / "batches.py").read_text()
    assert "ssvae_pl.models" not in data_code and "Callable" not in module_code
