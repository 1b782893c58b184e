"""TensorBoard pictures, each drawn only for a model that declares it (``models/declares.py``): reconstructions
and samples (``GenerativeImages``), the latent space (``LatentSpace``), the confusion matrix (``ConfusionMatrix``),
and the run's config beside its final metrics (``HParamsWithMetrics``). Each draws on a bounded number of
validation images, writes from global rank zero only, and does nothing without a TensorBoardLogger."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_warn

from ssvae_pl.callbacks.checkpoints import run_folder
from ssvae_pl.errors import ConfigError
from ssvae_pl.models.declares import AsksModel, check_declared, latent_name_of, pictures_of
from ssvae_pl.prediction import class_names




_said_no_tensorboard = False


def tensorboard_writer(trainer: pl.Trainer):
    """The ``SummaryWriter`` of the trainer's TensorBoardLogger, or None. With other loggers only, it says once that
    the pictures are skipped."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    global _said_no_tensorboard
    if trainer.loggers and not _said_no_tensorboard:

        _said_no_tensorboard = True
        rank_zero_warn(f"the TensorBoard pictures (reconstructions, samples, latent space, confusion matrix) need a "
                       f"TensorBoardLogger; with {type(trainer.loggers[0]).__name__} they are skipped.")
    return None


def _validation_due(trainer: pl.Trainer, every_n_epochs: int) -> bool:
    """Whether this validation draws: every ``every_n_epochs``-th epoch and the last one, never the sanity check."""
    last = trainer.max_epochs is not None and trainer.current_epoch == trainer.max_epochs - 1
    return not trainer.sanity_checking and ((trainer.current_epoch + 1) % every_n_epochs == 0 or last)


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
        return _validation_due(trainer, self.every_n_epochs)

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


class GenerativeImages(AsksModel, _EveryNValidations):
    """Image grids of a generative model (the VAE, M2 on images), made with torchvision's ``make_grid``:

    * ``images/reconstructions``: ``num_images`` validation images (top row) above their reconstructions;
    * ``images/prior_samples`` (VAE): ``num_samples`` images decoded from z ~ p(z);
    * ``images/class_samples`` (M2): one row per class, ``num_samples`` images from p(x|y,z), z ~ p(z);
    * ``images/analogies`` (M2, SSDGM fig. 1): each validation image, then its z decoded with every class.

    Each that the model declares, or those of ``pictures`` (each one the model must declare). Models that do not
    generate images (the latent classifier, M1+M2) are skipped. Every 10 epochs (and at ``max_epochs``)."""

    def __init__(self, every_n_epochs: int = 10, num_images: int = 8, num_samples: int = 10,
                 pictures: list[str] | None = None) -> None:
        super().__init__(every_n_epochs, num_images)
        if num_samples <= 0:
            raise ConfigError(f"GenerativeImages.num_samples must be positive, got {num_samples}.")
        self.num_samples, self.pictures = num_samples, pictures

    def check(self, model: pl.LightningModule) -> None:
        if self.pictures is not None:
            check_declared(model, self.pictures, pictures_of(model), "picture",
                           "trainer.callbacks.GenerativeImages.pictures")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.check(pl_module)

    def draw(self, writer, pl_module, x, y, step):
        shows, x, names = pictures_of(pl_module), x.float(), class_names_of(pl_module)
        shows = shows if self.pictures is None else shows & set(self.pictures)
        if "reconstructions" in shows:
            writer.add_figure("images/reconstructions", _grid_figure(
                torch.cat([x, pl_module.reconstruct(x)]), len(x), "validation images and their reconstructions",
                rows=["input", "reconstruction"]), step)
        if "class_samples" in shows:
            classes = torch.arange(len(names), device=pl_module.device)
            samples = pl_module.sample(classes, self.num_samples)  # (K * S, C, H, W), class by class
            writer.add_figure("images/class_samples", _grid_figure(
                samples, self.num_samples, "x ~ p(x|y, z), z ~ p(z): one row per class y", rows=names), step)
        if "analogies" in shows:
            rows = torch.cat([x.unsqueeze(1), pl_module.analogies(x)], dim=1)  # (B, 1 + K, C, H, W)
            writer.add_figure("images/analogies", _grid_figure(
                rows.flatten(0, 1), rows.shape[1], "analogies: each image's z decoded with every class (fig. 1)",
                columns=["input", *names]), step)
        if "prior_samples" in shows:
            side = self.num_samples
            writer.add_figure("images/prior_samples", _grid_figure(
                pl_module.sample(side * side), side, "x ~ p(x|z), z ~ p(z)"), step)


def class_names_of(pl_module: pl.LightningModule) -> list[str]:
    """The model's class names (kept in its hyperparameters), else 0 ... K-1."""
    return class_names(pl_module, None, int(pl_module.hparams.num_classes))


def grid_figure_inches(num_rows: int, per_row: int, tile_h: int = 30, tile_w: int = 30) -> tuple[float, float]:
    """(width, height) in inches of a picture grid: 0.45 inch per 30-pixel tile (an MNIST digit and its padding),
    plus room for the names and the title. TensorBoard shows it at 100 pixels per inch."""
    return 1.5 + 0.45 * per_row * tile_w / 30, 0.8 + 0.45 * num_rows * tile_h / 30


def _grid_figure(images: torch.Tensor, per_row: int, title: str, rows: list[str] | None = None,
                 columns: list[str] | None = None):
    """Images (N, C, H, W) in a grid of ``per_row`` columns (torchvision's ``make_grid``), drawn large enough to
    see (about 0.45 inch a tile), with the rows and columns named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    padding = 2
    grid = make_grid(images.float().clamp(0, 1).cpu(), nrow=per_row, padding=padding, pad_value=0.5)  # (3, H', W')
    tile_h, tile_w = images.shape[-2] + padding, images.shape[-1] + padding
    figure, axes = plt.subplots(figsize=grid_figure_inches(-(-len(images) // per_row), per_row, tile_h, tile_w))
    axes.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    axes.set_title(title, fontsize=9)
    axes.set_yticks([padding / 2 + tile_h * (i + 0.5) for i in range(len(rows))] if rows else [])
    axes.set_yticklabels(rows or [], fontsize=8)
    axes.set_xticks([padding / 2 + tile_w * (i + 0.5) for i in range(len(columns))] if columns else [])
    axes.set_xticklabels(columns or [], fontsize=8, rotation=45 if columns and max(map(len, columns)) > 3 else 0)
    axes.tick_params(length=0)
    figure.tight_layout()
    return figure


class LatentSpace(_EveryNValidations):
    """The model's latent means (``latent_means``) of up to ``num_images`` validation images:

    * ``latent/pca``: a 2-D PCA projection as a scatter plot coloured by class (matplotlib);
    * ``latent/tsne`` with ``tsne: true``: the same by t-SNE (needs scikit-learn; a few seconds for 1,000 points);
    * with ``embedding: true``, the latents with their labels and thumbnails for TensorBoard's projector
      (``add_embedding``, tag ``latent``)."""

    def __init__(self, every_n_epochs: int = 10, num_images: int = 1000, tsne: bool = False,
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
        if "latent_space" not in pictures_of(pl_module):
            return
        z = pl_module.latent_means(x.float()).float().cpu()  # (N, Z)
        labels, names, latent = y.cpu(), class_names_of(pl_module), latent_name_of(pl_module)
        centred = z - z.mean(dim=0)
        _, s, v = torch.linalg.svd(centred, full_matrices=False)  # rows of v: principal directions
        share = (s**2 / (s**2).sum()).tolist() + [0.0, 0.0]
        axes = (f"PC 1 ({share[0]:.0%} of the variance)", f"PC 2 ({share[1]:.0%})")
        writer.add_figure("latent/pca", _scatter(centred @ v[:2].T, labels, names, f"{latent}: PCA", axes), step)
        if self.tsne:
            from sklearn.manifold import TSNE

            points = TSNE(2, init="pca", random_state=0, perplexity=min(30.0, len(z) - 1.0)).fit_transform(z.numpy())
            writer.add_figure("latent/tsne", _scatter(torch.from_numpy(points), labels, names, f"{latent}: t-SNE",
                                                      ("t-SNE 1", "t-SNE 2")), step)
        if self.embedding:
            writer.add_embedding(z, metadata=labels.tolist(), label_img=x.float().cpu(), global_step=step,
                                 tag="latent")


def _scatter(points: torch.Tensor, labels: torch.Tensor, names: list[str], title: str, axis_names: tuple[str, str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 5))
    k = len(names)
    scatter = axes.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10" if k <= 10 else "tab20", s=6,
                           vmin=-0.5, vmax=k - 0.5)
    bar = figure.colorbar(scatter, ax=axes, ticks=range(k), label="class")
    bar.ax.set_yticklabels(names)
    axes.set_xlabel(axis_names[0])
    axes.set_ylabel(axis_names[1])
    axes.set_title(f"latent means of {len(points)} validation images\n{title}", fontsize=9)
    figure.tight_layout()
    return figure


class ConfusionMatrix(pl.Callback):
    """``val/confusion_matrix``: the classifier's confusion matrix on the whole validation set (every rank's share,
    reduced by torchmetrics), drawn with torchmetrics' ``plot``, every ``every_n_epochs`` epochs and the last. It
    counts the classes the model's ``validation_step`` predicted (its ``pred``), without a second forward pass."""

    def __init__(self, every_n_epochs: int = 10) -> None:
        if every_n_epochs <= 0:
            raise ConfigError(f"ConfusionMatrix.every_n_epochs must be positive, got {every_n_epochs}.")
        self.every_n_epochs = every_n_epochs
        self.matrix = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from torchmetrics.classification import MulticlassConfusionMatrix

        self.matrix = MulticlassConfusionMatrix(pl_module.hparams.num_classes).to(pl_module.device)

    def _due(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        return _validation_due(trainer, self.every_n_epochs) and "confusion_matrix" in pictures_of(pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        if self._due(trainer, pl_module):
            x, y = batch
            if isinstance(outputs, dict) and "pred" in outputs:
                predicted = outputs["pred"]
            else:  # a model whose validation_step returns no predictions
                with torch.no_grad():
                    predicted = pl_module(x).argmax(dim=-1)
            self.matrix.to(pl_module.device).update(predicted, y)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._due(trainer, pl_module):
            return
        matrix = self.matrix.compute()  # a collective under DDP: every rank calls it
        self.matrix.reset()
        writer = tensorboard_writer(trainer)
        if writer is not None and trainer.is_global_zero:
            matrix = matrix.cpu()
            accuracy = float(matrix.diagonal().sum() / matrix.sum().clamp(min=1))
            figure, axes = self.matrix.plot(matrix, labels=class_names_of(pl_module))
            axes.set_title(f"validation, epoch {trainer.current_epoch}: accuracy {accuracy:.4f}", fontsize=9)
            axes.set_xlabel("predicted class")
            axes.set_ylabel("true class")
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
        folder = run_folder(trainer)  # a collective under DDP: every rank asks
        for name, value in trainer.callback_metrics.items():
            if name.startswith(prefix) and value.numel() == 1:
                self.metrics["hparams/" + name.replace("/", "_")] = float(value)
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if logger is None or not self.metrics or not trainer.is_global_zero:
            return
        logger.log_hyperparams(_flatten(_run_config(folder, trainer, pl_module)), metrics=dict(self.metrics))


def _run_config(folder: Path | None, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:

    config_file = folder / "config.yaml" if folder is not None else None
    if config_file is not None and config_file.is_file():
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
