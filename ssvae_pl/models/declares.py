"""What a model declares to the callbacks: the pictures it can show, the name of its latent, and the metric that
picks its best checkpoint. A LightningModule that declares nothing trains, tests and writes ``last.ckpt``; it gets
no pictures and no ``best-epochNNN.ckpt``."""

from __future__ import annotations

from typing import Any

PICTURES = frozenset({
    "reconstructions",  # images/reconstructions: needs reconstruct(x)
    "prior_samples",  # images/prior_samples: needs sample(n)
    "class_samples",  # images/class_samples: needs sample(classes, n)
    "analogies",  # images/analogies: needs analogies(x)
    "latent_space",  # latent/pca (and t-SNE, the projector): needs latent_means(x)
    "confusion_matrix",  # val/confusion_matrix: validation_step returns {"pred": ...}
    "knn_probe",  # val/knn_acc: validation_step returns {"z_mean": ...}, and latent_means(x)
})


class Declares:
    """Mixin of the models: override what applies. ``monitor``: (metric, "max" | "min"), or None for no best
    checkpoint."""

    def pictures(self) -> frozenset[str]:
        return frozenset()

    def latent_name(self) -> str:
        return f"{type(self).__name__}'s latent"

    def monitor(self) -> tuple[str, str] | None:
        return None


def pictures_of(model: Any) -> frozenset[str]:
    """The pictures ``model`` declares (none for a model without ``Declares``)."""
    return model.pictures() if isinstance(model, Declares) else frozenset()


def monitor_of(model: Any) -> tuple[str, str] | None:
    return model.monitor() if isinstance(model, Declares) else None


def latent_name_of(model: Any) -> str:
    return model.latent_name() if isinstance(model, Declares) else f"{type(model).__name__}'s latent"
