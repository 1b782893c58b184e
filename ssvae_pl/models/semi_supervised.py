"""The semi-supervised objective J^alpha (SSDGM eq. 9), written once for every model of the family.

A subclass supplies the bounds: L(x, y) of the labelled images (B_l,), L(x, y) of every unlabelled image in every
class (B_u, K), and the logits of q(y|x) for both. ``SemiSupervised.objective`` turns them into the loss:

    U(x) = sum_y q(y|x) L(x, y) + H(q(y|x))                                        (eq. 7, as a bound)
    loss = w_l mean_l[-L(x, y)] + w_u mean_u[-U(x)] + w_c mean_l[-log q(y|x)]      (eq. 9 per datapoint)

with the weights of ``objective_weights`` (docs/why-m2-recipe.md: ``weighting`` dataset or batch, and alpha).
"""

from __future__ import annotations

from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from ssvae_pl import elbo
from ssvae_pl.errors import ConfigError
from ssvae_pl.host import check_cuda_once
from ssvae_pl.models.compiling import CompileSetting, check_compile, check_compile_can_train, compiled, fitting
from ssvae_pl.models.declares import Declares
from ssvae_pl.models.inputs import unit_images
from ssvae_pl.models.step_scalars import StepScalars
from ssvae_pl.prediction import check_data_settings, class_predictions
from ssvae_pl.ranking import CLASSIFIER_STRATEGIES

ALPHA_PER_DATAPOINT = 0.1  # the paper's alpha = 0.1 * N, "in all experiments" (weighting: dataset)
BATCH_ALPHA_PER_DATAPOINT = 1.0  # the shipped recipe's alpha = N (weighting: batch; configs/mnist/m2.yaml: 50,000)
TRAINING_TERMS = ("elbo_labelled", "elbo_unlabelled", "classification", "loss")


class SemiSupervised(Declares, pl.LightningModule):
    """A classifier q(y|x) trained with a generative model's bounds on labelled and unlabelled images (J^alpha).

    Subclasses define ``loss_terms(batch)`` (through ``objective``), ``bounds_by_class(x, noise)`` -> (logits,
    L(x, y) for every y), from which ``evaluation_terms`` -> (logits, U(x)), ``evaluation_noise(n, generator)`` and
    ``forward(x)`` -> logits. The numbers of the objective, N, N_l
    and N_u, come from the data module when fitting starts (or ``set_data_sizes``); alpha is in the paper's units,
    a sum over the N training images (``alpha``, else ``alpha_per_label`` * N_l, else N or 0.1 N).
    """

    def __init__(self, num_classes: int, num_train: int | None, alpha: float | None, alpha_per_label: float | None,
                 weighting: Literal["dataset", "batch"], compile: CompileSetting) -> None:
        super().__init__()
        self.save_hyperparameters()
        if num_train is not None and num_train <= 0:
            raise ConfigError(f"model.num_train must be positive, got {num_train}.")
        if alpha is not None and alpha < 0:
            raise ConfigError(f"model.alpha must be >= 0, got {alpha}.")
        if alpha_per_label is not None and not 0 <= alpha_per_label < float("inf"):
            raise ConfigError(f"model.alpha_per_label must be >= 0, got {alpha_per_label}.")
        self.num_labelled: int | None = None  # N_l and N_u: set_data_sizes(), from the data module
        self.num_unlabelled: int | None = None
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        check_compile(compile)
        self._training_loss = compiled(self.loss_terms, compile)
        self._validation_terms = compiled(self.evaluation_terms, compile)  # a fit's validations, not a lone test
        self._step_scalars = StepScalars()

    # ---- what the networks model (an M1 stage overrides both: ``m1_latents.OnM1Latents``) ----------------------

    def input_stage(self) -> tuple[int, ...]:
        """Build what comes before the networks, and return the shape of what they model: the images here."""
        return tuple(self.hparams.input_shape)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the networks model: the images, as floats in [0, 1] (uint8 ones converted)."""
        return unit_images(x)

    # ---- the numbers of the objective --------------------------------------------------------------------------

    def set_data_sizes(self, num_labelled: int, num_unlabelled: int, num_train: int | None = None) -> None:
        """N_l and N_u (and N, unless ``num_train`` was given) of J^alpha; ``setup`` takes them from the data
        module when fitting. The data module owns the split, so these numbers are read from it, not configured."""
        if self.hparams.num_train is None:
            self.hparams.num_train = num_train
        self.num_labelled, self.num_unlabelled = num_labelled, num_unlabelled

    def setup(self, stage: str) -> None:
        from ssvae_pl.data.datamodule import SemiSupervisedDataModule

        datamodule = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and isinstance(datamodule, SemiSupervisedDataModule):
            self.set_data_sizes(datamodule.num_labelled, datamodule.num_unlabelled, datamodule.num_train)
        elif stage == "fit" and (self.num_labelled is None or self.hparams.num_train is None):
            raise ConfigError(f"{type(self).__name__} needs the numbers of labelled and unlabelled training images: "
                              "fit it with SemiSupervisedDataModule, or call model.set_data_sizes(...) first.")

    @property
    def alpha(self) -> float:
        """alpha of J^alpha, in the paper's units: ``model.alpha``, ``model.alpha_per_label`` * N_l, or else N
        (``weighting: batch``) or 0.1 * N (``weighting: dataset``)."""
        if self.hparams.alpha is not None:
            return float(self.hparams.alpha)
        if self.hparams.alpha_per_label is not None:
            return float(self.hparams.alpha_per_label) * self._data_sizes()[0]
        per_datapoint = ALPHA_PER_DATAPOINT if self.hparams.weighting == "dataset" else BATCH_ALPHA_PER_DATAPOINT
        return per_datapoint * self._num_train()

    def _num_train(self) -> int:
        if self.hparams.num_train is None:
            raise RuntimeError(f"{type(self).__name__}.num_train is unknown: fit with the data module or call "
                               "set_data_sizes() first.")
        return self.hparams.num_train

    def _data_sizes(self) -> tuple[int, int]:
        """(N_l, N_u)."""
        if self.num_labelled is None:
            raise RuntimeError(f"{type(self).__name__}'s N_l and N_u are unknown: fit with the data module or call "
                               "set_data_sizes().")
        return self.num_labelled, self.num_unlabelled

    def objective_weights(self, batch_labelled: int = 1, batch_unlabelled: int = 1) -> tuple[float, float, float]:
        """(w_l, w_u, w_c): (N_l/N, N_u/N, alpha/N) for ``weighting: dataset``; for ``batch``, every image of the
        mixed batch (B_l labelled, B_u unlabelled) once, each label's -log q(y|x) weighing alpha/N_l its bound."""
        n = self._num_train()
        num_labelled, num_unlabelled = self._data_sizes()
        if self.hparams.weighting == "dataset":
            return num_labelled / n, num_unlabelled / n, self.alpha / n
        w_l = batch_labelled / (batch_labelled + batch_unlabelled)
        return w_l, 1.0 - w_l, w_l * self.alpha / num_labelled

    def objective(self, bound_l: torch.Tensor, logits_l: torch.Tensor, y_l: torch.Tensor,
                  class_bounds: torch.Tensor, logits_u: torch.Tensor) -> dict[str, torch.Tensor]:
        """J^alpha of a mixed batch: L(x, y) of the labelled images (B_l,) and their logits (B_l, K), L(x, y) of
        every unlabelled image in every class (B_u, K) and their logits (B_u, K) -> the per-example terms and the
        loss (the module docstring). Reduced in fp32."""
        classification = F.cross_entropy(logits_l.float(), y_l, reduction="none")  # (B_l,) -log q(y|x)
        bound_u = elbo.unlabelled_bound(logits_u.float().softmax(dim=-1), class_bounds)  # (B_u,)
        w_l, w_u, w_c = self.objective_weights(len(y_l), len(bound_u))
        loss = w_l * -bound_l.mean() + w_u * -bound_u.mean() + w_c * classification.mean()
        return {"elbo_labelled": bound_l, "elbo_unlabelled": bound_u, "classification": classification, "loss": loss}

    # ---- what a subclass defines ---------------------------------------------------------------------------------

    def loss_terms(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The terms of ``objective`` for a training batch {"labelled": (x, y), "unlabelled": x}."""
        raise NotImplementedError

    def bounds_by_class(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(y|x)'s logits (B, K) and L(x, y) of every class (B, K) for images x, with the fixed ``noise`` (B, ...)."""
        raise NotImplementedError

    def evaluation_terms(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(y|x)'s logits (B, K) and U(x) (B,) of evaluation images x, with the fixed ``noise`` (B, ...)."""
        logits, class_bounds = self.bounds_by_class(x, noise)
        return logits, elbo.unlabelled_bound(logits.float().softmax(dim=-1), class_bounds)

    def evaluation_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """The reparameterisation noise of ``evaluation_terms`` for n images, drawn with ``generator`` (B, ...)."""
        raise NotImplementedError

    def evaluation_piece(self, x: torch.Tensor) -> int:
        """Images per piece of an eager evaluation batch: the whole batch unless a subclass says less."""
        return max(len(x), 1)

    # ---- Lightning -----------------------------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        check_compile_can_train(self.hparams.compile, self.trainer)
        check_cuda_once()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        terms = self._training_loss(batch)
        self._step_scalars.add(self, {f"train/{name}": terms[name] for name in TRAINING_TERMS})
        return terms["loss"]

    def on_train_epoch_end(self) -> None:
        self._step_scalars.log_epoch(self)

    def _evaluate(self, stage: str, batch, batch_idx: int, metric: MulticlassAccuracy) -> dict[str, torch.Tensor]:
        """Accuracy and U(x) of one evaluation batch, with noise seeded by the batch's index (so ``val/elbo`` does
        not jitter); returns the predicted classes (for the confusion matrix)."""
        x, y = batch
        noise = self.evaluation_noise(len(x), torch.Generator().manual_seed(batch_idx)).to(x.device)
        terms = self._validation_terms if fitting(self) else self.evaluation_terms
        size = self.evaluation_piece(x) if terms == self.evaluation_terms else len(x)  # compiled: whole
        logits, bound = (torch.cat(parts) for parts in zip(*(terms(*piece) for piece in
                                                             zip(x.split(size), noise.split(size)))))
        metric(logits, y)
        self.log(f"{stage}/elbo", bound.mean(), sync_dist=True, batch_size=len(y))
        self.log_evaluation(stage, bound, len(y))
        self.log(f"{stage}/acc", metric, prog_bar=True, batch_size=len(y))
        return {"pred": logits.argmax(dim=-1)}

    def log_evaluation(self, stage: str, bound: torch.Tensor, batch_size: int) -> None:
        """More of an evaluation batch's scalars from its bounds (B,); none by default."""

    def validation_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._evaluate("val", batch, batch_idx, self.val_acc)

    def test_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._evaluate("test", batch, batch_idx, self.test_acc)

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        return class_predictions(self, batch)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_data_settings(self, checkpoint)

    def pictures(self) -> frozenset[str]:
        return frozenset({"latent_space", "confusion_matrix"})

    def strategies(self) -> frozenset[str]:
        return CLASSIFIER_STRATEGIES | {"bound"}  # and L(x, y) of every class: bounds_by_class

    def monitor(self) -> tuple[str, str]:
        return "val/acc", "max"

    def metrics(self) -> frozenset[str]:
        return frozenset({"val/acc", "val/elbo"})
