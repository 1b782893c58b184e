"""Callbacks the configs add: ``EpochTimer`` logs how fast training runs; ``GenerativeImages``, ``LatentSpace``,
``ConfusionMatrix`` and ``HParamsWithMetrics`` put the pictures and the run's configuration into TensorBoard."""

from __future__ import annotations

import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar, TQDMProgressBar, WeightAveraging
from pytorch_lightning.loggers import TensorBoardLogger

from ssvae_pl.errors import ConfigError
from ssvae_pl.prediction import class_names


class EpochTimer(pl.Callback):
    """Logs, at the end of every training epoch: ``time/epoch_seconds``, the training loop of the epoch (fetching
    batches and the steps); ``time/validation_seconds``, what the fit spent from the start of each validation to the
    next step or the epoch's end (validation, checkpoints, the pictures); ``time/train_samples_per_second``
    (training images per second of the loop, labelled and unlabelled, over all ranks); and
    ``time/elapsed_seconds`` since fitting started."""

    def __init__(self) -> None:
        self._fit_start = self._epoch_start = self._paused = 0.0
        self._validation_start: float | None = None
        self._samples = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(pl_module)
        self._epoch_start, self._paused, self._validation_start, self._samples = time.perf_counter(), 0.0, None, 0

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._sync(pl_module)
            self._validation_start = time.perf_counter()

    def _resume(self, pl_module: pl.LightningModule) -> None:
        if self._validation_start is not None:
            self._sync(pl_module)
            self._paused += time.perf_counter() - self._validation_start
            self._validation_start = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._resume(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._samples += _count_images(batch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resume(pl_module)
        now = time.perf_counter()
        seconds = now - self._epoch_start - self._paused
        rate = self._samples * trainer.world_size / max(seconds, 1e-9)
        pl_module.log_dict({"time/epoch_seconds": seconds, "time/validation_seconds": self._paused,
                            "time/train_samples_per_second": rate, "time/elapsed_seconds": now - self._fit_start},
                           rank_zero_only=True)

    @staticmethod
    def _sync(pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)


class LatentProbe(pl.Callback):
    """A cheap measure of a VAE's latents for the classifiers built on them: ``val/knn_acc``, the accuracy of the
    k-nearest-neighbour vote (Euclidean, on the posterior means) of the labelled training images for each validation
    image, logged after every validation of a fit. It votes with the posterior means that the model's
    ``validation_step`` returns (``z_mean``), without a second pass of the encoder over the validation images, and
    adds up the ranks' counts. Other models, and data without labelled images, are skipped."""

    def __init__(self, k: int = 5) -> None:
        self.k = k
        self.reference: tuple[torch.Tensor, torch.Tensor] | None = None  # the labelled images' means and labels
        self.counts: torch.Tensor | None = None  # correct votes, validation images

    def _active(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        from ssvae_pl.models.vae import VAE

        datamodule = getattr(trainer, "datamodule", None)
        return isinstance(pl_module, VAE) and not trainer.sanity_checking and trainer.state.fn == "fit" \
            and hasattr(datamodule, "labelled_dataset")

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.reference, self.counts = None, torch.zeros(2, dtype=torch.long, device=pl_module.device)

    @torch.no_grad()
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        if not self._active(trainer, pl_module) or not isinstance(outputs, dict) or "z_mean" not in outputs:
            return
        if self.reference is None:  # the weights validated (an average's, where one is swapped in)
            from ssvae_pl.data.datamodule import to_model_input

            labelled = trainer.datamodule.labelled_dataset()
            if labelled.labels is None or len(labelled) < self.k:
                return
            means = pl_module.latent_means(to_model_input(labelled.images.to(pl_module.device))).float()
            self.reference = means, labelled.labels.to(pl_module.device)
        means, labels = self.reference
        nearest = torch.cdist(outputs["z_mean"].float(), means).topk(self.k, largest=False).indices  # (B, k)
        votes = torch.nn.functional.one_hot(labels[nearest], pl_module.hparams.num_classes).sum(dim=1)
        y = batch[1].to(pl_module.device)
        self.counts += torch.stack([(votes.argmax(dim=1) == y).sum(), torch.tensor(len(y), device=y.device)])

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active(trainer, pl_module) or self.reference is None:
            return
        correct, total = trainer.strategy.reduce(self.counts, reduce_op="sum").tolist()  # every rank's share
        if total:
            pl_module.log("val/knn_acc", correct / total)


class EMAWeights(WeightAveraging):
    """An exponential moving average of the trainable weights (Polyak averaging): w_avg <- decay * w_avg +
    (1 - decay) * w after every training step. Validation, testing and every checkpoint's ``state_dict`` use the
    average; the current weights travel in the checkpoint too, so a resumed fit continues both (Lightning's
    ``WeightAveraging``). Buffers are not averaged (the models have no batch statistics).

    ``every_n_steps`` = n updates the average once every n steps instead, with the decay of n steps:
    w_avg <- decay^n * w_avg + (1 - decay^n) * w, the same average as n single steps if w had stayed where it is
    now; with decay 0.999 (a horizon of 1,000 steps) and n = 4 the two differ by far less than one step's change of
    w. The average catches up on the steps since its last update before every validation, checkpoint and the end
    of training, so what is validated and saved is never more than that approximation behind.

    The update is one foreach product over the trainable weights; frozen ones (M1's encoder in M1+M2, 26 times
    M2's own weights) never change, so their average stays their value and they are left out."""

    def __init__(self, decay: float = 0.999, every_n_steps: int = 1) -> None:
        if not 0 < decay < 1:
            raise ConfigError(f"EMAWeights.decay must be between 0 and 1, got {decay}.")
        if every_n_steps < 1:
            raise ConfigError(f"EMAWeights.every_n_steps must be a positive number of steps, got {every_n_steps}.")
        super().__init__(multi_avg_fn=self._update, use_buffers=False)
        self.decay, self.every_n_steps = decay, every_n_steps
        self._frozen: set[int] = set()  # data_ptr of the frozen weights, where the training runs
        self._steps = 1  # training steps since the last update: the exponent of the next one's decay

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._frozen = {p.data_ptr() for p in pl_module.parameters() if not p.requires_grad}

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and (step_idx + 1) % self.every_n_steps == 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.should_update(step_idx=trainer.global_step - 1):
            self._catch_up(trainer, pl_module)

    def _catch_up(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Average in the steps since the last update, if any: every ``every_n_steps``-th step, and the remainder
        before a validation, a checkpoint and the end of training."""
        if self._average_model is not None and trainer.global_step > self._latest_update_step:
            self._steps = trainer.global_step - self._latest_update_step
            self._average_model.update_parameters(pl_module)
            self._latest_update_step = trainer.global_step

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._catch_up(trainer, pl_module)
        super().on_validation_epoch_start(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._catch_up(trainer, pl_module)  # a no-op during a validation: it caught up at its start
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._catch_up(trainer, pl_module)
        super().on_train_end(trainer, pl_module)

    @torch.no_grad()
    def _update(self, averaged: list[torch.Tensor], current: list[torch.Tensor], _num_averaged) -> None:
        pairs = [(a, c) for a, c in zip(averaged, current) if c.data_ptr() not in self._frozen]
        if pairs:
            torch._foreach_lerp_([a for a, _ in pairs], [c for _, c in pairs], 1 - self.decay ** self._steps)


def _count_images(batch) -> int:
    if isinstance(batch, dict):  # {"labelled": (x, y), "unlabelled": x}
        return sum(_count_images(part) for part in batch.values())
    if isinstance(batch, (tuple, list)):
        return len(batch[0])
    return len(batch)


# ---- TensorBoard pictures ------------------------------------------------------------------------------------------
# Each callback below is configured in YAML (``trainer.callbacks``), draws on a bounded number of validation images,
# writes from global rank zero only, and does nothing without a TensorBoardLogger.


_said_no_tensorboard = False


def tensorboard_writer(trainer: pl.Trainer):
    """The ``SummaryWriter`` of the trainer's TensorBoardLogger, or None. With other loggers only, it says once that
    the pictures are skipped."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    global _said_no_tensorboard
    if trainer.loggers and not _said_no_tensorboard:
        from pytorch_lightning.utilities.rank_zero import rank_zero_warn

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


class GenerativeImages(_EveryNValidations):
    """Image grids of a generative model (the VAE, M2 on images), made with torchvision's ``make_grid``:

    * ``images/reconstructions``: ``num_images`` validation images (top row) above their reconstructions;
    * ``images/prior_samples`` (VAE): ``num_samples`` images decoded from z ~ p(z);
    * ``images/class_samples`` (M2): one row per class, ``num_samples`` images from p(x|y,z), z ~ p(z);
    * ``images/analogies`` (M2, SSDGM fig. 1): each validation image, then its z decoded with every class.

    Models that do not generate images (the latent classifier, M1+M2) are skipped. Every 10 epochs (and at
    ``max_epochs``) by default, like the other pictures."""

    def __init__(self, every_n_epochs: int = 10, num_images: int = 8, num_samples: int = 10) -> None:
        super().__init__(every_n_epochs, num_images)
        if num_samples <= 0:
            raise ConfigError(f"GenerativeImages.num_samples must be positive, got {num_samples}.")
        self.num_samples = num_samples

    def draw(self, writer, pl_module, x, y, step):
        if not hasattr(pl_module, "reconstruct") or not getattr(pl_module, "generates_images", True):
            return
        x = x.float()
        reconstructions = pl_module.reconstruct(x)  # (B, C, H, W)
        writer.add_figure("images/reconstructions", _grid_figure(
            torch.cat([x, reconstructions]), len(x), "validation images and their reconstructions",
            rows=["input", "reconstruction"]), step)
        names = class_names_of(pl_module)
        if hasattr(pl_module, "analogies"):  # M2: class-conditional samples and analogies
            classes = torch.arange(len(names), device=pl_module.device)
            samples = pl_module.sample(classes, self.num_samples)  # (K * S, C, H, W), class by class
            writer.add_figure("images/class_samples", _grid_figure(
                samples, self.num_samples, "x ~ p(x|y, z), z ~ p(z): one row per class y", rows=names), step)
            rows = torch.cat([x.unsqueeze(1), pl_module.analogies(x)], dim=1)  # (B, 1 + K, C, H, W)
            writer.add_figure("images/analogies", _grid_figure(
                rows.flatten(0, 1), rows.shape[1], "analogies: each image's z decoded with every class (fig. 1)",
                columns=["input", *names]), step)
        else:
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
        if not hasattr(pl_module, "latent_means"):
            return
        z = pl_module.latent_means(x.float()).float().cpu()  # (N, Z)
        labels, names, latent = y.cpu(), class_names_of(pl_module), latent_name(pl_module)
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


def latent_name(pl_module: pl.LightningModule) -> str:
    """Which latent a model's ``latent_means`` gives, in the paper's names."""
    kind = type(pl_module).__name__
    if hasattr(pl_module, "analogies"):  # M2, or M1+M2 on M1's z1
        return ("M1+M2's z2, mean of q(z2|z1,y)" if pl_module.hparams.get("vae_checkpoint")
                else "M2's z, mean of q(z|x,y)")
    if hasattr(pl_module, "classifier"):
        return "M1's z1 (the frozen encoder's mean), as the classifier sees it"
    return f"{'M1' if kind == 'VAE' else kind}'s z, mean of q(z|x)"


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
        return _validation_due(trainer, self.every_n_epochs) and hasattr(pl_module, "classifier")  # not the VAE

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


def run_folder(trainer: pl.Trainer) -> Path | None:
    """The run's folder (``trainer.log_dir``), or None without a logger. Under DDP this is a collective (rank 0's
    folder is broadcast): call it on every rank, never inside an ``is_global_zero`` branch."""
    if trainer.logger is None:
        return None
    log_dir = trainer.log_dir
    return Path(log_dir) if log_dir else None


def _run_config(folder: Path | None, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
    import yaml

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


# ---- Trust: numerical faults, interruptions, reproducible epochs ---------------------------------------------------


class LastCheckpoint(ModelCheckpoint):
    """``checkpoints/last.ckpt`` after every training epoch (and SIGTERM's mid-epoch state, ``SaveOnInterrupt``):
    the one file that is "the last checkpoint". Always the same name, replaced in place (no ``last-v1.ckpt``);
    ``--ckpt_path last`` resumes from it; ``BestCheckpoint`` keeps the best by validation."""

    def __init__(self) -> None:
        super().__init__(filename="last", save_top_k=1, monitor=None, enable_version_counter=False)
        self.restored_dirpath: str | None = None

    @property
    def state_key(self) -> str:
        return "LastCheckpoint"

    def load_state_dict(self, state_dict: dict) -> None:
        self.restored_dirpath = state_dict.get("dirpath")
        super().load_state_dict(same_folder_as_saved(self, state_dict))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A fit never replaces another fit's checkpoints: a checkpoint folder that already holds some is written
        to only by a fit resumed from that folder's run (``--ckpt_path`` there, or a checkpoint recording it)."""
        taken = None
        if trainer.is_global_zero and self.dirpath is not None and not trainer.fast_dev_run:
            folder = Path(self.dirpath).resolve()
            existing = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
            ckpt = trainer.ckpt_path
            ours = ckpt is not None and "://" not in str(ckpt) and (
                Path(ckpt).resolve().parent == folder
                or (self.restored_dirpath is not None and Path(self.restored_dirpath).resolve() == folder))
            taken = str(existing[-1]) if existing and not ours else None
        taken = trainer.strategy.broadcast(taken, 0)
        if taken:
            raise ConfigError(f"{taken} belongs to another fit, and this one would replace it: resume that run with "
                              f"--ckpt_path {taken}, or give this one a folder of its own (a new "
                              "--trainer.logger.init_args.version, or --trainer.default_root_dir).")

    @property
    def last_path(self) -> str | None:
        return None if self.dirpath is None else str(Path(self.dirpath) / f"last{self.FILE_EXTENSION}")


class BestCheckpoint(ModelCheckpoint):
    """``checkpoints/best-epochNNN.ckpt``: the best epoch by the model's validation metric, ``val/elbo`` for the VAE
    and ``val/acc`` for the classifiers (read from the model when fitting starts, so one callback serves every
    config)."""

    def __init__(self) -> None:
        super().__init__(monitor="val/acc", mode="max", filename="best-epoch{epoch:03d}", auto_insert_metric_name=False)

    @property
    def state_key(self) -> str:
        return "BestCheckpoint"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.monitor = "val/acc" if hasattr(pl_module, "classifier") else "val/elbo"
        super().setup(trainer, pl_module, stage)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(same_folder_as_saved(self, state_dict))


def same_folder_as_saved(callback: ModelCheckpoint, state_dict: dict) -> dict:
    """The saved state with its ``dirpath`` as this run writes it when both name the same folder (a resume from
    another working folder, or with the logger's save_dir given otherwise): Lightning compares them as text, and
    would otherwise forget the best score so far."""
    saved, now = state_dict.get("dirpath"), callback.dirpath
    if saved and now and saved != now and Path(saved).resolve() == Path(now).resolve():
        return {**state_dict, "dirpath": now}
    return state_dict


def _last_checkpoint_path(trainer: pl.Trainer) -> str | None:
    """Where ``LastCheckpoint`` keeps ``last.ckpt`` (its folder is known after setup)."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, LastCheckpoint):
            return callback.last_path
    return None


class NonFiniteGuard(pl.Callback):
    """Stops (or skips) a training step whose loss or gradients are NaN or infinite, before the optimiser uses them.

    After each backward pass and before the optimiser's step (``on_before_optimizer_step``), the step's loss and the
    norm of every gradient are checked for NaN/Inf on the device. Reading that verdict is a host synchronisation, which
    on a GPU makes the host wait for the device at every step; ``deferred`` reads it one step later instead, from a
    copy that travelled without blocking, so the host stays ahead of the device.

    Args:
        action: ``stop`` raises ``NumericalError`` naming the global step, the epoch and the metric (the loss, or the
            gradient of the first parameter that is not finite); the optimiser never takes that step and no checkpoint
            is written, so ``last.ckpt`` keeps the last good state (``ssvae`` prints one ``ssvae: error:`` line).
            ``skip`` drops the step instead (every gradient set to ``None``, so the optimiser leaves the weights and
            its own state untouched), counts it in ``train/skipped_steps``, and stops as above after ``max_skips``
            non-finite steps in a row.
        check_gradients: also check the gradients (with ``16-mixed`` precision the gradient scaler already skips
            steps with infinite gradients, so only the loss is checked there).
        max_skips: with ``skip``, the most non-finite steps skipped in a row before the run stops anyway.
        deferred: read each step's verdict at the next step (or at the epoch's end, or before a checkpoint): with
            ``stop``, the optimiser has then taken the bad step, and the run stops before it writes anything (the
            step is named as before). ``None`` (the default): deferred on a GPU with ``stop``; ``skip`` always decides
            before the step.

    A checkpoint is never written with non-finite weights: ``on_save_checkpoint`` refuses it with the same error.
    """

    def __init__(self, action: str = "stop", check_gradients: bool = True, max_skips: int = 10,
                 deferred: bool | None = None) -> None:
        if action not in ("stop", "skip"):
            raise ConfigError(f"NonFiniteGuard.action must be stop or skip, got {action!r}.")
        if max_skips < 0:
            raise ConfigError(f"NonFiniteGuard.max_skips must be >= 0, got {max_skips}.")
        if deferred and action == "skip":
            raise ConfigError("NonFiniteGuard.deferred needs action stop: skip decides before the optimiser's step.")
        self.action, self.check_gradients, self.max_skips, self.deferred = action, check_gradients, max_skips, deferred
        self._pending: tuple | None = None  # a deferred step's values (on the host), their copy's event, what they are
        self.skipped = 0  # steps skipped in this run (kept in the checkpoint)
        self.consecutive = 0
        self._losses: list[torch.Tensor] = []
        self._batch_idx = 0

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach().float().reshape(-1))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        losses, self._losses = self._losses, []
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        checked = list(losses)
        if self.check_gradients and scaler is None and params:
            norms = torch._foreach_norm([p.grad for p in params])
            checked.append(torch.stack([n.float() for n in norms]))
        if not checked:
            return
        values = torch.cat([c.to(checked[0].device) for c in checked])
        if self._defers(values.device):
            self._check_pending(trainer)
            self._defer(trainer, pl_module, values, len(losses), params)
            return
        bad = not bool(torch.isfinite(values).all())
        if trainer.world_size > 1:  # gradients are reduced already; the loss is per rank: decide together
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            self.consecutive = 0
            return
        what = self._describe(pl_module, losses, params)
        self.consecutive += 1
        if self.action == "stop" or self.consecutive > self.max_skips:
            self._stop(trainer, what)
        self.skipped += 1
        from pytorch_lightning.utilities.rank_zero import rank_zero_warn

        rank_zero_warn(f"NonFiniteGuard: skipped global step {trainer.global_step} (epoch {trainer.current_epoch}, "
                       f"batch {self._batch_idx}): non-finite {what}; {self.skipped} skipped so far.")
        if scaler is None:  # with a gradient scaler, its own inf check skips the step
            for p in params:
                p.grad = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.action == "skip":
            pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)

    def _defers(self, device: torch.device) -> bool:
        return self.deferred if self.deferred is not None else (self.action == "stop" and device.type == "cuda")

    def _defer(self, trainer: pl.Trainer, pl_module: pl.LightningModule, values: torch.Tensor, num_losses: int,
               params: list[torch.Tensor]) -> None:
        """Keep this step's values for the next check: on a GPU copied to pinned host memory without blocking
        (with an event that says when the copy is done); across processes with the count of bad ranks appended
        (an all-reduce on the device, no synchronisation)."""
        values = values.detach().float()
        if trainer.world_size > 1:
            bad_ranks = trainer.strategy.reduce((~torch.isfinite(values)).any().float(), reduce_op="sum")
            values = torch.cat([values, bad_ranks.reshape(1)])
        event = None
        if values.device.type == "cuda":
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            values = host
        where = (trainer.global_step, trainer.current_epoch, self._batch_idx)
        self._pending = (values, event, num_losses, params, pl_module, where)

    def _check_pending(self, trainer: pl.Trainer) -> None:
        """The verdict on the deferred step, if any: stop the run naming it when it was not finite."""
        if self._pending is None:
            return
        values, event, num_losses, params, pl_module, where = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()  # this step's copy only: the device runs on with the steps queued after it
        distributed = trainer.world_size > 1
        checked, bad_ranks = (values[:-1], float(values[-1])) if distributed else (values, 0.0)
        if bool(torch.isfinite(checked).all()) and bad_ranks == 0:
            return
        losses, norms = checked[:num_losses], checked[num_losses:]
        if not bool(torch.isfinite(losses).all()):
            what = f"training loss ({losses[~torch.isfinite(losses)][0].item()})"
        elif not bool(torch.isfinite(norms).all()):
            first = int((~torch.isfinite(norms)).nonzero()[0])
            name = next((n for n, p in pl_module.named_parameters() if p is params[first]), "a parameter")
            what = f"gradient of {name} ({'nan' if torch.isnan(norms[first]) else 'inf'})"
        else:
            what = "loss or gradient on another rank"
        self._stop(trainer, what, where=where)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_pending(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_pending(trainer)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._check_pending(trainer)
        weights = [p.detach() for p in pl_module.parameters()]
        if weights and not bool(torch.stack([torch.isfinite(w).all() for w in weights]).all()):
            name = next(n for n, p in pl_module.named_parameters() if not torch.isfinite(p.detach()).all())
            self._stop(trainer, f"weights ({name})", saving=True)

    @staticmethod
    def _describe(pl_module: pl.LightningModule, losses: list[torch.Tensor], params: list[torch.Tensor]) -> str:
        for loss in losses:
            if not torch.isfinite(loss).all():
                return f"training loss ({loss.flatten()[0].item()})"
        names = {id(p): n for n, p in pl_module.named_parameters()}
        for p in params:
            if not torch.isfinite(p.grad).all():
                kind = "nan" if torch.isnan(p.grad).any() else "inf"
                return f"gradient of {names.get(id(p), 'a parameter')} ({kind})"
        return "loss or gradient on another rank"

    def _stop(self, trainer: pl.Trainer, what: str, saving: bool = False, where: tuple | None = None) -> None:
        from ssvae_pl.errors import NumericalError

        last = _last_checkpoint_path(trainer)
        if last and Path(last).is_file():
            kept = f"{last} keeps the last good state. Resume from it with --ckpt_path last after"
        else:
            kept = "no checkpoint was written yet (the first epoch had not ended). Start again after"
        if saving:
            happened = f"refusing to write a checkpoint with non-finite {what} at global step {trainer.global_step}"
        elif where is not None:  # a deferred verdict: that step was taken, nothing was written since
            happened = (f"non-finite {what} at global step {where[0]} (epoch {where[1]}, batch {where[2]}); the run "
                        "stopped before writing anything after it")
        else:
            skips = f" after {self.consecutive - 1} skipped in a row" if self.action == "skip" else ""
            happened = (f"non-finite {what} at global step {trainer.global_step} (epoch {trainer.current_epoch}, "
                        f"batch {self._batch_idx}){skips}; the step was not taken")
        raise NumericalError(
            f"{happened}; {kept} lowering the learning rate (--optimizer.init_args.lr) or clipping gradients "
            "(--trainer.gradient_clip_val 1.0)."
        )


class SaveOnInterrupt(pl.Callback):
    """SIGTERM (a scheduler's preemption, ``kill``) or a first Ctrl-C stops training at the end of the current batch
    and writes that state to ``last.ckpt`` (through the trainer's checkpoint plugin: atomically with
    ``AtomicCheckpointIO``), so that the same command with ``--ckpt_path last`` resumes it. A second Ctrl-C
    interrupts at once and writes nothing. Lightning's own SIGTERM handler sets the flag its loops check; this
    callback routes the first SIGINT to the same flag. A run stopped by a numerical fault or any other error writes
    nothing here: ``last.ckpt`` keeps the last good state."""

    def __init__(self) -> None:
        self._previous_sigint = None
        self._signal_name = "SIGTERM"

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        connector = trainer._signal_connector

        def first_sigint(signum, frame) -> None:
            self._signal_name = "SIGINT"
            connector.received_sigterm = True  # the loops stop at the end of this batch
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: KeyboardInterrupt

        self._previous_sigint = signal.signal(signal.SIGINT, first_sigint)

    def _restore_sigint(self) -> None:
        import signal
        import threading

        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
        self._previous_sigint = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_sigint()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        self._restore_sigint()
        if isinstance(exception, KeyboardInterrupt):  # a second Ctrl-C: nothing saved now; the last one stands
            last = _last_checkpoint_path(trainer)
            exception.checkpoint = last if last is not None and Path(last).is_file() else None
            exception.run_folder = trainer.logger is not None
            return
        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking or trainer.global_step == 0:
            return
        if _training_finished(trainer):  # the signal came after the last epoch: last.ckpt holds the finished run
            exception.signal_name, exception.finished = self._signal_name, True
            return
        path = _last_checkpoint_path(trainer)
        if path is None:
            return
        trainer.save_checkpoint(path, weights_only=False)
        exception.signal_name, exception.checkpoint = self._signal_name, path  # for the `ssvae` command's message
        exception.run_folder = trainer.logger is not None  # whether the run has a folder to resume in
        exception.global_step, exception.epoch = trainer.global_step, trainer.current_epoch


def _training_finished(trainer: pl.Trainer) -> bool:
    """Whether the fit has done all its epochs or steps (a signal in the moments after that stops nothing)."""
    epochs, steps = trainer.max_epochs, trainer.max_steps
    completed = trainer.fit_loop.epoch_progress.current.completed
    return (epochs is not None and epochs >= 0 and completed >= epochs) or (steps >= 0 and trainer.global_step >= steps)


def _mix(*numbers: int) -> int:
    """A 63-bit seed from several integers (a hash, so that nearby inputs give unrelated seeds)."""
    import hashlib

    digest = hashlib.blake2b(repr(tuple(int(n) for n in numbers)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class SeedEachEpoch(pl.Callback):
    """Reseeds torch's global generator (CPU and every GPU), numpy's and Python's at the start of every training
    epoch, from the run's seed (``seed_everything``), the epoch and the global rank. Dynamic binarisation, the
    reparameterisation noise and anything else drawn from the global generators during an epoch then depend on
    nothing but (seed, epoch, rank): a run resumed from an epoch-end checkpoint draws exactly what the uninterrupted
    run drew, whatever validation or the sanity check consumed in between. The base seed is kept in the checkpoint
    (a run without ``seed_everything`` picks one at random)."""

    def __init__(self) -> None:
        self.base_seed: int | None = None

    def state_dict(self) -> dict:
        return {"base_seed": self.base_seed}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("base_seed") is not None:
            self.base_seed = int(state_dict["base_seed"])

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        import os

        if self.base_seed is None:
            seed = os.environ.get("PL_GLOBAL_SEED")
            self.base_seed = int(seed) if seed is not None else int(torch.randint(2**62, ()).item())

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a run resumed mid-epoch (a SIGTERM checkpoint) re-enters that epoch without on_train_epoch_start
        self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import random

        import numpy as np

        seed = _mix(self.base_seed, trainer.current_epoch, trainer.global_rank)
        torch.manual_seed(seed)  # every CUDA device too
        np.random.seed(seed % 2**32)
        random.seed(seed)


class ResumeWithNewOptimizerSettings(pl.Callback):
    """A resumed run whose optimiser arguments were changed on the command line (``--optimizer.init_args.lr``
    after a divergence) trains with them: Lightning restores the optimiser's state, settings included, so they are
    set again after the restore. A changed ``lr`` scales the restored rate (and a scheduler's base rates) by
    new / old, so a schedule keeps its shape; other arguments (betas, weight decay) are set as given."""

    def __init__(self, changes: dict[str, object]) -> None:
        self.changes = dict(changes)
        self._configured: list[dict] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._configured = [{k: v for k, v in group.items() if k != "params"}
                            for optimizer in trainer.optimizers for group in optimizer.param_groups]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from pytorch_lightning.utilities.rank_zero import rank_zero_info

        groups = [group for optimizer in trainer.optimizers for group in optimizer.param_groups]
        for group, configured in zip(groups, self._configured):
            for key in self.changes.keys() & configured.keys():
                if key == "lr":
                    scale = configured["initial_lr" if "initial_lr" in configured else "lr"] / group.get(
                        "initial_lr", group["lr"])
                    group["lr"] *= scale
                    if "initial_lr" in group:
                        group["initial_lr"] *= scale
                else:
                    group[key] = configured[key]
        for config in trainer.lr_scheduler_configs:
            if hasattr(config.scheduler, "base_lrs"):
                config.scheduler.base_lrs = [group.get("initial_lr", group["lr"])
                                             for group in config.scheduler.optimizer.param_groups]
        rank_zero_info(f"ssvae: resumed with the optimiser's {', '.join(sorted(self.changes))} set anew.")


class RunProgressBar(TQDMProgressBar):
    """Lightning's progress bar without ``v_num``, the last four characters of the run's version (``on_0`` for
    ``version_0``): the run's folder is named when it starts."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


def trainer_pieces(callbacks, plugins, optimizer_changes: dict[str, object], fitting: bool = True,
                   progress_bar: bool = True):
    """The config's callbacks and plugins with the always-on pieces added where the config has none of their kind:
    the trust pieces (``LastCheckpoint``, ``NonFiniteGuard``, ``SaveOnInterrupt``, ``SeedEachEpoch``, the
    ``AtomicCheckpointIO`` plugin), ``BestCheckpoint``, ``EpochTimer``, ``LatentProbe`` and the TensorBoard pictures
    (each skips a model that cannot draw it, and does nothing without a TensorBoard logger); plus
    ``ResumeWithNewOptimizerSettings`` when a resume changes the optimiser. A config that lists one of these with
    other settings (``NonFiniteGuard`` with ``action: skip``) keeps its own."""
    from ssvae_pl.checkpoint_io import AtomicCheckpointIO
    from pytorch_lightning.plugins.io import CheckpointIO

    callbacks = list(callbacks or [])
    # LastCheckpoint after BestCheckpoint (Lightning keeps checkpoint callbacks in this order, after the others), so
    # that last.ckpt holds the best-so-far state updated by this epoch's score
    always_on = (NonFiniteGuard(), SaveOnInterrupt(), SeedEachEpoch(), EpochTimer(), LatentProbe(), GenerativeImages(),
                 LatentSpace(), ConfusionMatrix(), HParamsWithMetrics())
    if fitting:  # test, validate and predict write no checkpoint
        always_on += (BestCheckpoint(), LastCheckpoint())
    callbacks += [piece for piece in always_on if not any(isinstance(callback, type(piece)) for callback in callbacks)]
    if progress_bar and not any(isinstance(callback, ProgressBar) for callback in callbacks):
        callbacks.append(RunProgressBar())
    if optimizer_changes:
        callbacks.append(ResumeWithNewOptimizerSettings(optimizer_changes))
    plugins = list(plugins or []) if isinstance(plugins, (list, tuple, type(None))) else [plugins]
    if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
        plugins.append(AtomicCheckpointIO())
    return callbacks, plugins
