"""What a model declares to the callbacks: the pictures it can show, the name of its latent, the validation metrics
it logs and the one that picks its best checkpoint. A LightningModule that declares nothing trains, tests and writes
``last.ckpt``; it gets no pictures and no ``best-epochNNN.ckpt``. A config that asks a callback for a picture or a
metric the model does not declare gets one ``ConfigError`` naming it (``check_declared``)."""

from __future__ import annotations

from typing import Any, Iterable

from ssvae_pl.errors import ConfigError

PICTURES = frozenset({
    "reconstructions",  # images/reconstructions: needs reconstruct(x)
    "prior_samples",  # images/prior_samples: needs sample(n)
    "class_samples",  # images/class_samples: needs sample(classes, n)
    "analogies",  # images/analogies: needs analogies(x)
    "latent_space",  # latent/pca (and t-SNE, the projector): needs latent_means(x)
    "confusion_matrix",  # val/confusion_matrix: validation_step returns {"pred": ...}
    "knn_probe",  # val/knn_acc: validation_step returns {"z_mean": ...}, and latent_means(x)
})
CLASS_IMAGE_PICTURES = frozenset({"reconstructions", "class_samples", "analogies"})  # a class-conditional decoder's


class Declares:
    """Mixin of the models: override what applies. ``monitor``: (metric, "max" | "min"), or None for no best
    checkpoint."""

    def pictures(self) -> frozenset[str]:
        return frozenset()

    def latent_name(self) -> str:
        return f"{type(self).__name__}'s latent"

    def monitor(self) -> tuple[str, str] | None:
        return None

    def strategies(self) -> frozenset[str]:
        """The ``ssvae suggest`` strategies it can rank images by (``ranking.py``); none unless it classifies."""
        return frozenset()

    def metrics(self) -> frozenset[str]:
        """The validation metrics it logs (any of them can rank checkpoints); by default its monitor alone."""
        declared = self.monitor()
        return frozenset() if declared is None else frozenset({declared[0]})


def pictures_of(model: Any) -> frozenset[str]:
    """The pictures ``model`` declares (none for a model without ``Declares``)."""
    return model.pictures() if isinstance(model, Declares) else frozenset()


def monitor_of(model: Any) -> tuple[str, str] | None:
    return model.monitor() if isinstance(model, Declares) else None


def latent_name_of(model: Any) -> str:
    return model.latent_name() if isinstance(model, Declares) else f"{type(model).__name__}'s latent"


def metrics_of(model: Any) -> frozenset[str]:
    """The validation metrics ``model`` declares, with ``val/knn_acc`` where it asks for the k-NN probe."""
    if not isinstance(model, Declares):
        return frozenset()
    return model.metrics() | ({"val/knn_acc"} if "knn_probe" in model.pictures() else set())


def check_declared(model: Any, asked: Iterable[str], declared: frozenset[str], what: str, field: str) -> None:
    """One ``ConfigError`` naming ``field`` if ``asked`` holds a ``what`` (picture, metric) that ``model`` does not
    declare; a module without ``Declares`` is taken at its word."""
    missing = sorted(set(asked) - declared)
    if missing and isinstance(model, Declares):
        shown = ", ".join(sorted(declared)) or "none"
        raise ConfigError(f"{field}: {type(model).__name__} has no {what} {', '.join(map(repr, missing))} (it has: "
                          f"{shown}); name one of those, or leave {field.rsplit('.', 1)[-1]} out for the model's own.")


class AsksModel:
    """A callback that a config points at something the model declares: ``check(model)`` raises one
    ``ConfigError`` for what the model lacks. ``ssvae`` calls it before anything is written; ``setup`` too."""

    def check(self, model: Any) -> None:
        raise NotImplementedError
