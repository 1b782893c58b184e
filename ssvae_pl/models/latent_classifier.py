"""M1, stage two: a classifier on the latents of a frozen VAE encoder (SSDGM section 2.1).

The supervised term is cross-entropy on the labelled (z, y) pairs. The unlabelled latents can join in, as the
method intends (the paper uses a transductive SVM here):

* ``entropy``: minimise the entropy of q(y|z) on unlabelled latents while keeping the classes balanced by
  maximising the entropy of the batch's mean prediction (the role the TSVM's margin and balance constraint play);
* ``self_training``: the classifier labels the unlabelled images and trains on its own confident predictions,
  each pseudo-labelled example weighted by its confidence.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from ssvae_pl import elbo
from ssvae_pl.errors import ConfigError
from ssvae_pl.host import check_cuda_once
from ssvae_pl.models.declares import Declares
from ssvae_pl.models.inputs import unit_images
from ssvae_pl.models.step_scalars import StepScalars
from ssvae_pl.models.vae import frozen_encoder
from ssvae_pl.nets import Activation, Classifier, ImageClassifier
from ssvae_pl.prediction import check_data_settings, class_predictions
from ssvae_pl.ranking import CLASSIFIER_STRATEGIES


class LatentClassifier(Declares, pl.LightningModule):
    """A classifier trained on z ~ q(z|x) of a frozen VAE encoder.

    The defaults are configs/mnist/m1_classifier.yaml's model (one hidden layer of 100 units, entropy minimisation on
    the unlabelled latents), and ``configure_optimizers`` its Adam. ``forward``, ``latent_means`` and
    ``predict_step`` take images as floats in [0, 1] or the data module's uint8 batches.

    Args:
        vae_checkpoint: checkpoint of a trained ``VAE``; its encoder is loaded and frozen. Not needed to test or
            predict from this model's own checkpoint, which carries the encoder.
        input_shape, num_classes: linked from the data module.
        hidden_dims: hidden widths of the classifier; ``[]`` is multinomial logistic regression.
        latent: ``mean`` uses the posterior mean; ``sample`` draws z ~ q(z|x) afresh (augmentation).
        unlabelled_objective: ``entropy`` (the default), ``self_training`` or ``none`` (the labelled images
            alone); see the module docstring.
        unlabelled_weight: weight of the unlabelled term against the labelled cross-entropy.
        class_balance_weight: weight of the class-balance term of ``entropy``.
        confidence_threshold: ``self_training`` ignores predictions less confident than this.
        warmup_epochs: epochs of the supervised term alone before the unlabelled term starts.
        class_names: the classes' names, in label order; linked from the data module and kept in the checkpoint, so
            that ``ssvae predict`` writes them (an image folder's sub-folder names). ``None``: ``0`` ... ``K-1``.
        vae_hparams: the frozen encoder's shape, filled in from ``vae_checkpoint``; kept in this model's
            checkpoint so that it stands on its own.
    """

    def __init__(
        self,
        vae_checkpoint: str | None = None,
        input_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        hidden_dims: Sequence[int] = (100,),
        activation: Activation = "softplus",
        latent: Literal["mean", "sample"] = "mean",
        unlabelled_objective: Literal["none", "entropy", "self_training"] = "entropy",
        unlabelled_weight: float = 1.0,
        class_balance_weight: float = 1.0,
        confidence_threshold: float = 0.0,
        warmup_epochs: int = 0,
        vae_hparams: dict[str, Any] | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 <= confidence_threshold < 1.0:
            raise ConfigError(f"model.confidence_threshold must be in [0, 1), got {confidence_threshold}.")
        if vae_checkpoint is None and vae_hparams is None:
            raise ConfigError(
                "model.vae_checkpoint is required: pass the VAE's checkpoint, e.g. "
                "--model.vae_checkpoint lightning_logs/m1_vae/version_0/checkpoints/last.ckpt"
            )
        self.encoder, vae_hparams = frozen_encoder(vae_checkpoint, vae_hparams, input_shape)
        self.hparams["vae_hparams"] = vae_hparams  # this checkpoint then stands on its own
        self.classifier = Classifier(vae_hparams["latent_dim"], hidden_dims, num_classes, activation)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self._step_scalars = StepScalars()

    @torch.no_grad()
    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """What the classifier sees of images x: M1's posterior mean, or (``latent: sample``, training) a draw."""
        return self.encoder.latents(unit_images(x), sample=self.hparams.latent == "sample" and self.training)  # (B, Z)

    @torch.no_grad()
    def latent_means(self, x: torch.Tensor) -> torch.Tensor:
        """The means of M1's q(z|x), what the classifier sees at evaluation: (B, Z)."""
        return self.encoder(unit_images(x))[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, K) for images (B, C, H, W), floats in [0, 1] or the loaders' uint8."""
        return self.classifier(self.latents(x))

    def unlabelled_loss(self, logits: torch.Tensor) -> torch.Tensor:
        probs = logits.float().softmax(dim=-1)  # (B, K)
        if self.hparams.unlabelled_objective == "entropy":
            balance = elbo.categorical_entropy(probs.mean(dim=0))  # of the batch's mean prediction
            return elbo.categorical_entropy(probs).mean() - self.hparams.class_balance_weight * balance
        confidence, pseudo_label = probs.detach().max(dim=-1)
        weight = confidence * (confidence >= self.hparams.confidence_threshold)
        return (weight * F.cross_entropy(logits.float(), pseudo_label, reduction="none")).mean()

    def on_fit_start(self) -> None:
        check_cuda_once()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x, y = batch["labelled"]
        logits = self(x)
        loss = F.cross_entropy(logits.float(), y)
        self.train_acc.update(logits, y)
        scalars = {"train/classification": loss}
        hp = self.hparams
        if hp.unlabelled_objective != "none" and self.current_epoch >= hp.warmup_epochs:
            unlabelled = self.unlabelled_loss(self(batch["unlabelled"]))
            scalars["train/unlabelled"] = unlabelled
            loss = loss + hp.unlabelled_weight * unlabelled
        self._step_scalars.add(self, {**scalars, "train/loss": loss})
        return loss

    def on_train_epoch_end(self) -> None:
        self._step_scalars.log_epoch(self)
        self.log("train/acc", self.train_acc.compute())
        self.train_acc.reset()

    def _evaluate(self, stage: str, batch, metric: MulticlassAccuracy) -> dict[str, torch.Tensor]:
        """Loss and accuracy of one evaluation batch; returns the predicted classes (for the callbacks)."""
        x, y = batch
        logits = self(x)
        metric(logits, y)
        self.log(f"{stage}/loss", F.cross_entropy(logits.float(), y), sync_dist=True, batch_size=len(y))
        self.log(f"{stage}/acc", metric, prog_bar=True, batch_size=len(y))
        return {"pred": logits.argmax(dim=-1)}

    def validation_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._evaluate("val", batch, self.val_acc)

    def test_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._evaluate("test", batch, self.test_acc)

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        return class_predictions(self, batch)

    def image_classifier(self) -> ImageClassifier:
        """The classifier as a plain module, images -> logits, sharing this model's weights: the frozen encoder's
        posterior mean, then the classifier head (what ``forward`` computes in eval mode)."""
        return ImageClassifier(self.classifier, self.encoder)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_data_settings(self, checkpoint)

    def strategies(self) -> frozenset[str]:
        return CLASSIFIER_STRATEGIES

    def pictures(self) -> frozenset[str]:
        return frozenset({"latent_space", "confusion_matrix"})

    def latent_name(self) -> str:
        return "M1's z1 (the frozen encoder's mean), as the classifier sees it"

    def monitor(self) -> tuple[str, str]:
        return "val/acc", "max"

    def metrics(self) -> frozenset[str]:
        return frozenset({"val/acc", "val/loss"})

    def configure_optimizers(self):
        """Used when no ``optimizer`` is given (a plain ``Trainer``): configs/mnist/m1_classifier.yaml's Adam at 3e-3."""
        return torch.optim.Adam(self.classifier.parameters(), lr=3e-3)
