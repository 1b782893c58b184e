"""Callbacks the configs add: ``EpochTimer`` logs how fast training runs; ``GenerativeImages``, ``LatentSpace``,
``ConfusionMatrix`` and ``HParamsWithMetrics`` put the pictures and the run's configuration into TensorBoard."""

from __future__ import annotations

import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from ssvae_pl.errors import ConfigError


class EpochTimer(pl.Callback):
    """Logs ``time/epoch_seconds`` (the training loop of an epoch, validation excluded) and
    ``time/train_samples_per_second`` (training images per second, labelled and unlabelled, over all ranks), and
    ``time/elapsed_seconds`` since fitting started, at the end of every training epoch."""

    def __init__(self) -> None:
        self._fit_start = self._epoch_start = 0.0
        self._samples = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(pl_module)
        self._epoch_start, self._samples = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._samples += _count_images(batch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(pl_module)
        now = time.perf_counter()
        seconds = now - self._epoch_start
        rate = self._samples * trainer.world_size / max(seconds, 1e-9)
        pl_module.log_dict({"time/epoch_seconds": seconds, "time/train_samples_per_second": rate,
                            "time/elapsed_seconds": now - self._fit_start}, rank_zero_only=True)

    @staticmethod
    def _sync(pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)


def _count_images(batch) -> int:
    if isinstance(batch, dict):  # {"labelled": (x, y), "unlabelled": x}
        return sum(_count_images(part) for part in batch.values())
    if isinstance(batch, (tuple, list)):
        return len(batch[0])
    return len(batch)


# ---- TensorBoard pictures ------------------------------------------------------------------------------------------
# Each callback below is configured in YAML (``trainer.callbacks``), draws on a bounded number of validation images,
# writes from global rank zero only, and does nothing without a TensorBoardLogger.


def tensorboard_writer(trainer: pl.Trainer):
    """The ``SummaryWriter`` of the trainer's TensorBoardLogger, or None."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


class _EveryNValidations(pl.Callback):
    """Keeps the first validation images and labels of an epoch (at most ``num_images``) and calls ``draw`` at the
    end of every ``every_n_epochs``-th validation (and the last epoch's), on global rank zero."""

    def __init__(self, every_n_epochs: int = 1, num_images: int = 8) -> None:
        for field, value in (("every_n_epochs", every_n_epochs), ("num_images", num_images)):
            if value <= 0:
                raise ConfigError(f"{type(self).__name__}.{field} must be positive, got {value}.")
        self.every_n_epochs, self.num_images = every_n_epochs, num_images
        self._x: list[torch.Tensor] = []
        self._y: list[torch.Tensor] = []

    def _due(self, trainer: pl.Trainer) -> bool:
        last = trainer.max_epochs is not None and trainer.current_epoch == trainer.max_epochs - 1
        return not trainer.sanity_checking and ((trainer.current_epoch + 1) % self.every_n_epochs == 0 or last)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._x, self._y = [], []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        held = sum(len(x) for x in self._x)
        if trainer.is_global_zero and self._due(trainer) and held < self.num_images:
            x, y = batch
            self._x.append(x[: self.num_images - held])
            self._y.append(y[: self.num_images - held])

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        writer = tensorboard_writer(trainer)
        if self._x and writer is not None and trainer.is_global_zero:
            with torch.no_grad():
                self.draw(writer, pl_module, torch.cat(self._x), torch.cat(self._y), trainer.global_step)
        self._x, self._y = [], []

    def draw(self, writer, pl_module: pl.LightningModule, x: torch.Tensor, y: torch.Tensor, step: int) -> None:
        raise NotImplementedError


class GenerativeImages(_EveryNValidations):
    """Image grids of a generative model (the VAE, M2 on images), made with torchvision's ``make_grid``:

    * ``images/reconstructions``: ``num_images`` validation images (top row) above their reconstructions;
    * ``images/prior_samples`` (VAE): ``num_samples`` images decoded from z ~ p(z);
    * ``images/class_samples`` (M2): one row per class, ``num_samples`` images from p(x|y,z), z ~ p(z);
    * ``images/analogies`` (M2, SSDGM fig. 1): each validation image, then its z decoded with every class.

    Models that do not generate images (the latent classifier, M1+M2) are skipped."""

    def __init__(self, every_n_epochs: int = 1, num_images: int = 8, num_samples: int = 10) -> None:
        super().__init__(every_n_epochs, num_images)
        if num_samples <= 0:
            raise ConfigError(f"GenerativeImages.num_samples must be positive, got {num_samples}.")
        self.num_samples = num_samples

    def draw(self, writer, pl_module, x, y, step):
        if not hasattr(pl_module, "reconstruct") or not getattr(pl_module, "generates_images", True):
            return
        x = x.float()
        reconstructions = pl_module.reconstruct(x)  # (B, C, H, W)
        writer.add_image("images/reconstructions", _grid(torch.cat([x, reconstructions]), len(x)), step)
        num_classes = getattr(pl_module.hparams, "num_classes", None)
        if hasattr(pl_module, "analogies"):  # M2: class-conditional samples and analogies
            classes = torch.arange(num_classes, device=pl_module.device)
            samples = pl_module.sample(classes, self.num_samples)  # (K * S, C, H, W), class by class
            writer.add_image("images/class_samples", _grid(samples, self.num_samples), step)
            rows = torch.cat([x.unsqueeze(1), pl_module.analogies(x)], dim=1)  # (B, 1 + K, C, H, W)
            writer.add_image("images/analogies", _grid(rows.flatten(0, 1), rows.shape[1]), step)
        else:
            side = self.num_samples
            writer.add_image("images/prior_samples", _grid(pl_module.sample(side * side), side), step)


def _grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    from torchvision.utils import make_grid

    return make_grid(images.float().clamp(0, 1).cpu(), nrow=nrow, pad_value=0.5)


class LatentSpace(_EveryNValidations):
    """The model's latent means (``latent_means``) of up to ``num_images`` validation images:

    * ``latent/pca``: a 2-D PCA projection as a scatter plot coloured by class (matplotlib);
    * ``latent/tsne`` with ``tsne: true``: the same by t-SNE (needs scikit-learn; a few seconds for 1,000 points);
    * with ``embedding: true``, the latents with their labels and thumbnails for TensorBoard's projector
      (``add_embedding``, tag ``latent``)."""

    def __init__(self, every_n_epochs: int = 5, num_images: int = 1000, tsne: bool = False,
                 embedding: bool = True) -> None:
        super().__init__(every_n_epochs, num_images)
        if tsne:
            try:
                import sklearn.manifold  # noqa: F401
            except ImportError:
                raise ConfigError("LatentSpace.tsne=true needs scikit-learn: pip install scikit-learn, or set "
                                  "tsne: false (the PCA picture needs nothing more).") from None
        self.tsne, self.embedding = tsne, embedding

    def draw(self, writer, pl_module, x, y, step):
        if not hasattr(pl_module, "latent_means"):
            return
        z = pl_module.latent_means(x.float()).float().cpu()  # (N, Z)
        labels = y.cpu()
        centred = z - z.mean(dim=0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)  # rows of v: principal directions
        writer.add_figure("latent/pca", _scatter(centred @ v[:2].T, labels, "PCA"), step)
        if self.tsne:
            from sklearn.manifold import TSNE

            points = TSNE(2, init="pca", random_state=0, perplexity=min(30.0, len(z) - 1.0)).fit_transform(z.numpy())
            writer.add_figure("latent/tsne", _scatter(torch.from_numpy(points), labels, "t-SNE"), step)
        if self.embedding:
            writer.add_embedding(z, metadata=labels.tolist(), label_img=x.float().cpu(), global_step=step,
                                 tag="latent")


def _scatter(points: torch.Tensor, labels: torch.Tensor, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 5))
    scatter = axes.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=6, vmin=-0.5, vmax=9.5)
    figure.colorbar(scatter, ax=axes, ticks=range(int(labels.max()) + 1), label="class")
    axes.set_title(f"latent means, {title}")
    return figure


class ConfusionMatrix(pl.Callback):
    """``val/confusion_matrix``: the classifier's confusion matrix on the whole validation set (every rank's share,
    reduced by torchmetrics), drawn with torchmetrics' ``plot``, every ``every_n_epochs`` epochs."""

    def __init__(self, every_n_epochs: int = 1) -> None:
        if every_n_epochs <= 0:
            raise ConfigError(f"ConfusionMatrix.every_n_epochs must be positive, got {every_n_epochs}.")
        self.every_n_epochs = every_n_epochs
        self.matrix = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from torchmetrics.classification import MulticlassConfusionMatrix

        self.matrix = MulticlassConfusionMatrix(pl_module.hparams.num_classes).to(pl_module.device)

    def _due(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        last = trainer.max_epochs is not None and trainer.current_epoch == trainer.max_epochs - 1
        due = (trainer.current_epoch + 1) % self.every_n_epochs == 0 or last
        return not trainer.sanity_checking and due and hasattr(pl_module, "classifier")  # not the VAE

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        if self._due(trainer, pl_module):
            x, y = batch
            with torch.no_grad():
                self.matrix.to(pl_module.device).update(pl_module(x).argmax(dim=-1), y)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._due(trainer, pl_module):
            return
        matrix = self.matrix.compute()  # a collective under DDP: every rank calls it
        self.matrix.reset()
        writer = tensorboard_writer(trainer)
        if writer is not None and trainer.is_global_zero:
            figure, _ = self.matrix.plot(matrix.cpu())
            writer.add_figure("val/confusion_matrix", figure, trainer.global_step)


class HParamsWithMetrics(pl.Callback):
    """The run's configuration beside its final metrics, for TensorBoard's HParams tab: at the end of fitting
    (the last ``val/*`` metrics) and of testing (``test/*``), the flattened ``config.yaml`` of the run (else the
    model's and the data module's hyperparameters) is written with those metrics as ``hparams/<stage>_<name>``.
    Set the logger's ``default_hp_metric: false`` so that Lightning's placeholder ``hp_metric`` stays out."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, pl_module, "val/")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, pl_module, "test/")

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prefix: str) -> None:
        for name, value in trainer.callback_metrics.items():
            if name.startswith(prefix) and value.numel() == 1:
                self.metrics["hparams/" + name.replace("/", "_")] = float(value)
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if logger is None or not self.metrics or not trainer.is_global_zero:
            return
        logger.log_hyperparams(_flatten(_run_config(trainer, pl_module)), metrics=dict(self.metrics))


def _run_config(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
    import yaml

    config_file = Path(trainer.log_dir or "") / "config.yaml"
    if config_file.is_file():
        config = yaml.safe_load(config_file.read_text()) or {}
        config.pop("trainer", None)  # where it runs, not what it is
        return config
    config = {"model": dict(pl_module.hparams)}
    if trainer.datamodule is not None:
        config["data"] = dict(trainer.datamodule.hparams)
    return config


def _flatten(config: dict, prefix: str = "") -> dict[str, int | float | str | bool]:
    """Nested config -> {"model.init_args.alpha": 50000, ...}; lists and None as text (TensorBoard's types)."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
