"""M2 and M1+M2 (ssvae_pl/models/m2.py), their nets and bounds: the enumerated U(x), the efficient encoder, the
objective's terms, the frozen M1 encoder, generation, and both configs through the ``ssvae`` command."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from helpers.synthetic import SYNTHETIC
from helpers.trainers import quiet_trainer, assert_restored_equals
from ssvae_pl import elbo
from ssvae_pl.callbacks import grid_figure_inches
from ssvae_pl.data.datamodule import SemiSupervisedDataModule, to_model_input
from ssvae_pl.errors import CheckpointError, ConfigError
from ssvae_pl.models import M1M2, M2, VAE
from ssvae_pl.models.vae import FrozenEncoder, active_dims, load_frozen_encoder
from ssvae_pl.nets import ConditionalGaussianEncoder, GaussianEncoder, ImageClassifier
from test_cli import DEBUG, REPO, assert_one_line_user_error, data_args, ok
from helpers.cli import ssvae_here as ssvae

M2_CONFIG = str(REPO / "configs" / "mnist" / "m2.yaml")
M1M2_CONFIG = str(REPO / "configs" / "mnist" / "m1m2.yaml")
TINY_M2 = ["--model.init_args.hidden_dims", "[32]", "--model.init_args.classifier_hidden_dims", "[16]",
           "--model.init_args.latent_dim", "4"]
K = 10
TOL = dict(rtol=1e-5, atol=1e-4)  # float32 sums of 784 pixels, in a different order


def binary_images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.bernoulli(torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed)))


def tiny_m2(**kwargs) -> M2:
    """A small M2 whose objective knows N = 500 training images, 100 of them labelled, all 500 unlabelled."""
    torch.manual_seed(0)
    options = dict(hidden_dims=[32], classifier_hidden_dims=[16], latent_dim=4)
    options.update(kwargs)
    model = (M1M2 if "vae_checkpoint" in options else M2)(**options)
    model.set_data_sizes(num_labelled=100, num_unlabelled=500, num_train=500)
    return model


@pytest.fixture(params=["m2", "m1m2"])
def model_and_inputs(request, vae_checkpoint: Path):
    """(model, what it models for 6 images): the images for M2, the frozen encoder's latents for M1+M2."""
    x = binary_images(6)
    if request.param == "m2":
        return tiny_m2(), x
    model = tiny_m2(vae_checkpoint=str(vae_checkpoint), m1_active_threshold=0)
    model.eval()  # features are the posterior means
    return model, model.features(x)


def test_enumerated_unlabelled_bound_equals_a_loop_over_classes(model_and_inputs) -> None:
    """U(x) summed over the K classes at once equals sum_y q(y|x) L(x, y) + H(q(y|x)) computed one class at a time
    with the same noise, for M2 (Bernoulli) and M1+M2 (Gaussian)."""
    model, h = model_and_inputs
    eps = torch.randn(len(h), K, model.hparams.latent_dim)  # (B, K, Z)
    with torch.no_grad():
        enumerated = model.unlabelled_bound(h, eps)
        all_at_once = model.class_bounds(h, eps)  # (B, K)
        q = model.classifier(h).softmax(dim=-1)  # (B, K)
        loop = torch.zeros(len(h))
        for i in range(len(h)):
            for y in range(K):
                bound = model.labelled_bound(h[i : i + 1], torch.tensor([y]), eps[i : i + 1, y])
                torch.testing.assert_close(bound[0], all_at_once[i, y], **TOL)
                loop[i] += q[i, y] * bound[0] - q[i, y] * q[i, y].log()
    assert enumerated.shape == (len(h),) and enumerated.dtype == torch.float32
    torch.testing.assert_close(enumerated, loop, **TOL)
    # with a certain class, U(x) is that class's L(x, y)
    onehot = F.one_hot(torch.tensor([3]), K).float()
    torch.testing.assert_close(elbo.unlabelled_bound(onehot, all_at_once[:1]), all_at_once[:1, 3])


def test_one_pass_over_labelled_and_unlabelled_rows_gives_each_rows_own_bound(model_and_inputs) -> None:
    """``mixed_bounds`` stacks labelled rows and (image, class) rows in one pass and broadcasts each unlabelled
    image over its K rows: each labelled row is its own ``labelled_bound``, each (image, class) row the bound of
    that image alone, for M2 (Bernoulli) and M1+M2 (Gaussian, a decoder that returns a pair)."""
    model, h = model_and_inputs
    h_l, y_l, h_u = h[:2], torch.tensor([3, 7]), h[2:]
    eps_l, eps_u = torch.randn(2, model.hparams.latent_dim), torch.randn(4, K, model.hparams.latent_dim)
    with torch.no_grad():
        bound_l, bounds_u = model.mixed_bounds(h_l, y_l, h_u, eps_l, eps_u)
        torch.testing.assert_close(bound_l, model.labelled_bound(h_l, y_l, eps_l), **TOL)
        for i in range(len(h_u)):
            torch.testing.assert_close(bounds_u[i], model.class_bounds(h_u[i : i + 1], eps_u[i : i + 1])[0], **TOL)


@pytest.mark.parametrize("hidden_dims", [[], [16], [16, 8]])
def test_efficient_encoder_equals_concat_onehot_encoder(hidden_dims: list[int]) -> None:
    """The encoder that adds a per-class bias to the image's first layer equals a plain encoder on
    [x, onehot(y)] with the same weights, for one class per image and for all K at once."""
    torch.manual_seed(0)
    efficient = ConditionalGaussianEncoder(784, K, hidden_dims, 5)
    naive = GaussianEncoder(784 + K, hidden_dims, 5)
    state = {
        "net.0.weight": torch.cat([efficient.input_layer.weight, efficient.class_bias.T], dim=1),
        "net.0.bias": efficient.input_layer.bias,
    }
    if hidden_dims:  # efficient.rest = [activation, *mlp(...)] mirrors naive.net[1:]
        for key, value in efficient.rest.state_dict().items():  # rest.i is net.(i + 1)
            index, name = key.split(".", 1)
            state[f"net.{int(index) + 1}.{name}"] = value
    naive.load_state_dict(state)

    x = binary_images(7)
    y = torch.tensor([0, 3, 9, 1, 1, 5, 2])
    with torch.no_grad():
        mean, std = efficient(x, y)
        naive_mean, naive_std = naive(torch.cat([x.flatten(1), F.one_hot(y, K).float()], dim=1))
        torch.testing.assert_close(mean, naive_mean)
        torch.testing.assert_close(std, naive_std)
        torch.testing.assert_close(efficient(x, F.one_hot(y, K).float()), (mean, std))  # soft labels path
        all_mean, all_std = efficient.all_classes(x)
        assert all_mean.shape == all_std.shape == (7, K, 5)
        for c in range(K):
            onehot = F.one_hot(torch.full((7,), c), K).float()
            torch.testing.assert_close(naive(torch.cat([x.flatten(1), onehot], dim=1)), (all_mean[:, c], all_std[:, c]))


def test_classification_term_sees_labelled_examples_only() -> None:
    """The model's -log q(y|x) is the cross-entropy of the labelled batch alone: other labels change it, other
    unlabelled images do not (though they change U(x)); the loss is the documented weighted sum (the paper's)."""
    model = tiny_m2(weighting="dataset")
    x_l, y_l, x_u = binary_images(5, 1), torch.tensor([0, 1, 2, 3, 4]), binary_images(8, 2)
    eps_l, eps_u = torch.randn(5, 4), torch.randn(8, K, 4)
    with torch.no_grad():
        terms = model.loss_terms({"labelled": (x_l, y_l), "unlabelled": x_u}, eps_l, eps_u)
        expected = F.cross_entropy(model.classifier(x_l), y_l, reduction="none")
        torch.testing.assert_close(terms["classification"], expected)

        relabelled = model.loss_terms({"labelled": (x_l, (y_l + 1) % K), "unlabelled": x_u}, eps_l, eps_u)
        assert not torch.allclose(relabelled["classification"], terms["classification"])
        other_u = model.loss_terms({"labelled": (x_l, y_l), "unlabelled": binary_images(8, 3)}, eps_l, eps_u)
        assert torch.equal(other_u["classification"], terms["classification"])
        assert torch.equal(other_u["elbo_labelled"], terms["elbo_labelled"])
        assert not torch.allclose(other_u["elbo_unlabelled"], terms["elbo_unlabelled"])

    # N = 500, N_l = 100, N_u = 500, alpha = 0.1 N: the weights are 0.2, 1 and 0.1
    assert model.objective_weights() == pytest.approx((0.2, 1.0, 0.1)) and model.alpha == pytest.approx(50.0)
    loss = -0.2 * terms["elbo_labelled"].mean() - terms["elbo_unlabelled"].mean() + 0.1 * expected.mean()
    torch.testing.assert_close(terms["loss"], loss)
    assert tiny_m2(alpha=5.0, weighting="dataset").objective_weights()[2] == pytest.approx(0.01)


def test_alpha_per_label_keeps_each_labelled_examples_weight_at_every_budget() -> None:
    """``alpha_per_label``: alpha = alpha_per_label * N_l, so the classification weight of each labelled example
    (alpha / N_l under ``weighting: batch``) does not shrink as labels are added; a given ``alpha`` wins."""
    model = tiny_m2(alpha_per_label=5.0, weighting="batch")  # N_l = 100: alpha 500
    assert model.alpha == pytest.approx(500.0)
    assert model.objective_weights(100, 100)[2] == pytest.approx(0.5 * 5.0)
    model.set_data_sizes(num_labelled=300, num_unlabelled=500)
    assert model.alpha == pytest.approx(1500.0) and model.objective_weights(100, 100)[2] == pytest.approx(0.5 * 5.0)
    fixed = tiny_m2(alpha=500.0, weighting="batch")
    fixed.set_data_sizes(num_labelled=300, num_unlabelled=500)
    assert fixed.objective_weights(100, 100)[2] == pytest.approx(0.5 * 500.0 / 300)  # alpha fixed: it shrinks
    both = tiny_m2(alpha=700.0, alpha_per_label=5.0)  # alpha wins: a command-line alpha over a config's per-label
    assert both.alpha == pytest.approx(700.0)
    with pytest.raises(ConfigError, match="model.alpha_per_label must be >= 0"):
        M2(alpha_per_label=-1.0)


def test_batch_weighting_counts_every_image_of_the_mixed_batch_once() -> None:
    """``weighting: batch`` (the default): [B_l mean_l(-L + alpha/N_l CE) + B_u mean_u(-U)] / (B_l + B_u)."""
    model = tiny_m2()
    x_l, y_l, x_u = binary_images(5, 1), torch.tensor([0, 1, 2, 3, 4]), binary_images(15, 2)
    eps_l, eps_u = torch.randn(5, 4), torch.randn(15, K, 4)
    with torch.no_grad():
        terms = model.loss_terms({"labelled": (x_l, y_l), "unlabelled": x_u}, eps_l, eps_u)
    # B_l = 5, B_u = 15, alpha = N = 500 (the default under weighting: batch), N_l = 100: each labelled CE weighs
    # alpha / N_l = 5 times its bound
    assert model.alpha == pytest.approx(500.0)
    assert model.objective_weights(5, 15) == pytest.approx((0.25, 0.75, 0.25 * 5))
    per_labelled = -terms["elbo_labelled"] + 5 * terms["classification"]
    expected = (per_labelled.sum() - terms["elbo_unlabelled"].sum()) / 20
    torch.testing.assert_close(terms["loss"], expected)


def test_one_pass_training_loss_equals_the_separate_bounds(model_and_inputs) -> None:
    """``loss_terms`` runs the labelled rows and the unlabelled (image, class) rows through the encoder and the
    decoder as one batch, and q(y|x) once over both; with the same noise its terms equal ``labelled_bound``,
    ``unlabelled_bound`` and the cross-entropy computed separately, for M2 and M1+M2, and so do the gradients."""
    model, h = model_and_inputs
    model.train()
    h_l, y_l, h_u = h[:2], torch.tensor([4, 7]), h[2:]
    eps_l, eps_u = torch.randn(2, model.hparams.latent_dim), torch.randn(4, K, model.hparams.latent_dim)
    if isinstance(model, M1M2):  # M1+M2 takes cached rows [mean, std] with std 0: z1 is the mean
        h_l, h_u = (torch.cat([t, torch.zeros_like(t)], dim=-1).unsqueeze(1) for t in (h_l, h_u))
    terms = model.loss_terms({"labelled": (h_l, y_l), "unlabelled": h_u}, eps_l, eps_u)
    terms["loss"].backward()
    fused = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    f_l, f_u = model.features(h_l), model.features(h_u)
    bound_l = model.labelled_bound(f_l, y_l, eps_l)
    bound_u = model.unlabelled_bound(f_u, eps_u)
    classification = F.cross_entropy(model.classifier(f_l), y_l, reduction="none")
    torch.testing.assert_close(terms["elbo_labelled"], bound_l, **TOL)
    torch.testing.assert_close(terms["elbo_unlabelled"], bound_u, **TOL)
    torch.testing.assert_close(terms["classification"], classification, **TOL)
    w_l, w_u, w_c = model.objective_weights(2, 4)
    (w_l * -bound_l.mean() + w_u * -bound_u.mean() + w_c * classification.mean()).backward()
    for a, b in zip(fused, [p.grad for p in model.parameters() if p.requires_grad]):
        torch.testing.assert_close(a, b, **TOL)


def test_unlabelled_bound_alone_trains_the_classifier() -> None:
    """The gradient of U(x) alone reaches every parameter of q(y|x) (and the encoder and decoder)."""
    model = tiny_m2()
    model.unlabelled_bound(binary_images(8)).mean().backward()
    for name, module in [("classifier", model.classifier), ("encoder", model.encoder), ("decoder", model.decoder)]:
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert all(g.abs().sum() > 0 for g in grads), name


def test_an_eager_cpu_evaluation_runs_in_pieces_with_the_whole_batchs_numbers(monkeypatch) -> None:
    """An eager evaluation batch on a CPU goes through the K-class bound in pieces of at most EVAL_PIECE_VALUES
    decoder outputs (here 7 images of 10 x 784), whose bounds and predictions are the whole batch's."""
    import ssvae_pl.models.m2 as m2_module

    monkeypatch.setattr(m2_module, "EVAL_PIECE_VALUES", 7 * 10 * 784)
    torch.manual_seed(0)
    model = M2(hidden_dims=[16], classifier_hidden_dims=[16], latent_dim=3).eval()
    pieces, whole = [], model.evaluation_terms
    monkeypatch.setattr(model, "evaluation_terms", lambda x, eps: pieces.append(whole(x, eps)) or pieces[-1])
    x, y = torch.rand(20, 1, 28, 28), torch.randint(10, (20,))
    with torch.no_grad():
        predicted = model.validation_step((x, y), 0)["pred"]
        logits, bound = whole(x, torch.randn(20, 10, 3, generator=torch.Generator().manual_seed(0)))
    assert [len(piece_logits) for piece_logits, _ in pieces] == [7, 7, 6]
    torch.testing.assert_close(torch.cat([piece_bound for _, piece_bound in pieces]), bound)
    assert torch.equal(predicted, logits.argmax(dim=-1))


def test_sample_and_analogies_shapes() -> None:
    model = tiny_m2()
    samples = model.sample(torch.tensor([0, 7]), num_samples_per_class=3)
    assert samples.shape == (6, 1, 28, 28) and ((samples >= 0) & (samples <= 1)).all()
    assert model.analogies(binary_images(4)).shape == (4, K, 1, 28, 28)
    assert model.analogies(binary_images(4), torch.tensor([1, 2, 3, 4])).shape == (4, K, 1, 28, 28)


def test_m2_fit_logs_its_metrics_and_analogies(tmp_path: Path, make_dm) -> None:
    """A short fit takes N, N_l and N_u from the data module and writes the documented scalars, and, with the
    ``GenerativeImages`` callback, an analogy grid to TensorBoard."""
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ssvae_pl.callbacks import GenerativeImages

    torch.manual_seed(0)
    model = M2(hidden_dims=[16], classifier_hidden_dims=[16], latent_dim=3)
    logger = TensorBoardLogger(str(tmp_path), name="m2", version="v")
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, limit_test_batches=1,
                            logger=logger, log_every_n_steps=1, callbacks=[GenerativeImages()])
    dm = make_dm(unlabelled="rest")
    trainer.fit(model, datamodule=dm)
    assert (model.hparams.num_train, model.num_labelled, model.num_unlabelled) == (500, 100, 400)
    trainer.test(model, datamodule=dm)

    scalars, images = set(), {}
    for file in (tmp_path / "m2" / "v").glob("events.out.tfevents.*"):  # one for fit, one for test
        events = EventAccumulator(str(file), size_guidance={"images": 0, "scalars": 0})
        events.Reload()
        scalars |= set(events.Tags()["scalars"])
        images |= {tag: events.Images(tag) for tag in events.Tags()["images"]}
    for tag in ("elbo_labelled", "elbo_unlabelled", "classification", "loss"):
        assert f"train/{tag}_step" in scalars and f"train/{tag}_epoch" in scalars, tag
    assert {"val/acc", "val/elbo", "test/acc", "test/elbo"} <= scalars
    assert set(images) == {"images/reconstructions", "images/class_samples", "images/analogies"}
    (analogies,) = images["images/analogies"]
    # 8 rows (images) of 1 + K tiles of 28 pixels, with make_grid's 2-pixel padding
    width, height = grid_figure_inches(8, 1 + K)  # 8 rows (images) of 1 + K tiles
    assert (analogies.height, analogies.width) == (round(100 * height), round(100 * width))


@pytest.fixture(scope="module")
def m1m2_run(tmp_path_factory: pytest.TempPathFactory, shared_mnist_dir: Path, vae_checkpoint: Path):
    """M1+M2 on a copy of the session's VAE checkpoint, fitted for 3 steps: (model, trainer, start, dm, vae copy)."""
    root = tmp_path_factory.mktemp("m1m2")
    vae_copy = root / "vae_copy.ckpt"  # the session's VAE checkpoint is shared; a test deletes the copy
    shutil.copy(vae_checkpoint, vae_copy)
    torch.manual_seed(0)
    dm = SemiSupervisedDataModule(**SYNTHETIC, data_dir=str(shared_mnist_dir), num_labelled=100, batch_size=100,
                                  labelled_batch_size=50)
    dm.setup("fit")
    # the threshold between the spreads of M1's 4 posterior means (a VAE fitted for 2 steps): 2 of them active
    spread = load_frozen_encoder(str(vae_copy))[2]
    model = M1M2(vae_checkpoint=str(vae_copy), hidden_dims=[16], classifier_hidden_dims=[16], latent_dim=3,
               m1_active_threshold=spread.median().item())
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = quiet_trainer(max_steps=3, limit_val_batches=1, default_root_dir=str(root))
    trainer.fit(model, datamodule=dm)
    return model, trainer, start, dm, vae_copy


def test_m1m2_keeps_the_vae_encoder_frozen(vae_checkpoint: Path, m1m2_run) -> None:
    """M1's encoder comes frozen, stays in eval mode and bit-identical through training, while M2's nets move; M2
    models M1's 2 active latent dimensions with a Gaussian likelihood."""
    model, trainer, start, _, _ = m1m2_run
    assert trainer.global_step == 3 and model.likelihood == "gaussian"
    assert model.hparams.vae_hparams["latent_dim"] == 4 and model.encoder.input_layer.in_features == 2
    assert not model.m1_encoder.training and all(not p.requires_grad for p in model.m1_encoder.parameters())
    model.train()
    assert model.classifier.training and not any(m.training for m in model.m1_encoder.modules())
    ckpt_state = torch.load(vae_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    expected = {k.removeprefix("encoder."): v for k, v in ckpt_state.items() if k.startswith("encoder.")}
    actual = {k: v for k, v in model.m1_encoder.state_dict().items() if k != "active_dims"}  # M1+M2's own
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key
    for prefix in ("classifier.", "encoder.", "decoder."):
        assert any(not torch.equal(v, start[k]) for k, v in model.state_dict().items() if k.startswith(prefix))
    with pytest.raises(NotImplementedError, match="M1's decoder"):
        model.sample(torch.tensor([0]))


def test_m1_active_dimensions_are_handed_on_as_a_vector_of_their_number() -> None:
    """``active_dims`` keeps the latent dimensions whose posterior mean varies by more than the threshold (0 keeps
    them all); a frozen encoder hands on those dimensions only, sampled or not, as export's ImageClassifier does."""
    assert active_dims(torch.tensor([0.5, 0.01, 0.2]), 0.1) == [0, 2]
    assert active_dims(torch.tensor([0.5, 0.01, 0.2]), 0.0) == [0, 1, 2]
    torch.manual_seed(0)
    encoder, x = FrozenEncoder(784, [16], 3, input_shape=(1, 28, 28), active_dims=[0, 2]), binary_images(200)
    mean, std = encoder(x)
    torch.testing.assert_close(encoder.posterior(x), (mean[:, [0, 2]], std[:, [0, 2]]))
    sampled, means = encoder.latents(x, sample=True), encoder.latents(x)
    assert sampled.shape == means.shape == (200, 2) and torch.equal(means, mean[:, [0, 2]])
    assert not torch.equal(sampled, means)
    head = torch.nn.Linear(2, 10)
    assert torch.allclose(ImageClassifier(head, encoder)(x), head(means))


def test_m1m2_models_the_active_dimensions_the_vae_measured(m1m2_run, vae_checkpoint: Path) -> None:
    """The VAE measures how much each latent dimension's posterior mean varies over its validation images
    (``latent_mean_std``); M1+M2 models the dimensions above its threshold and keeps them in its hparams and its
    checkpoint. A VAE fitted without validation images has no such measure: refused unless every dimension is
    kept."""
    model, _, _, dm, _ = m1m2_run
    vae = VAE.load_from_checkpoint(vae_checkpoint, map_location="cpu")
    means = torch.cat([vae.latent_means(to_model_input(x)) for x, _ in dm.val_dataloader()])
    torch.testing.assert_close(vae.latent_mean_std, means.std(dim=0))
    expected = torch.nonzero(vae.latent_mean_std > model.hparams.m1_active_threshold).flatten()
    assert model.m1_encoder.active_dims.tolist() == expected.tolist() == model.hparams.vae_hparams["active_dims"]
    assert len(expected) == 2 and "m1_encoder.active_dims" in model.state_dict()
    unmeasured = VAE(hidden_dims=[8], latent_dim=3)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, default_root_dir=str(Path(vae_checkpoint).parent))
    trainer.fit(unmeasured, datamodule=dm)
    path = Path(vae_checkpoint).parent / "unmeasured.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(ConfigError, match="m1_active_threshold 0"):
        M1M2(vae_checkpoint=str(path))
    assert M1M2(vae_checkpoint=str(path), m1_active_threshold=0).m1_encoder.out_dim == 3
    with pytest.raises(ConfigError, match="none of the VAE's 4 latent dimensions"):
        M1M2(vae_checkpoint=str(vae_checkpoint), m1_active_threshold=100.0)


@pytest.mark.parametrize("copies", [1, 3, "grey"])
def test_m1m2_cached_posterior_trains_the_same_model(m1m2_run, copies) -> None:
    """The fast path: q(z1|x) of every training image computed once and held by the data module; each step draws
    z1 from it. With the same images and noise its loss equals the loss of today's path (M1's encoder at every
    step); the rows hold one fixed binarisation per copy (the grey image for ``grey``), the same at every start."""
    model, _, _, dm, _ = m1m2_run
    model = M1M2(vae_hparams=model.hparams.vae_hparams, hidden_dims=[16], classifier_hidden_dims=[16], latent_dim=3,
               m1_cache=copies, m1_active_threshold=model.hparams.m1_active_threshold).eval()
    model.set_data_sizes(100, 400, 500)
    model.load_state_dict(m1m2_run[0].state_dict())
    images = to_model_input(dm.labelled_dataset().images[:6])
    rows = model.posterior_rows(images, torch.Generator().manual_seed(0))
    a = model.m1_encoder.out_dim
    assert rows.shape == (6, 1 if copies == "grey" else copies, 2 * a)
    assert torch.equal(rows, model.posterior_rows(images, torch.Generator().manual_seed(0)))
    binarised = images if copies == "grey" else torch.bernoulli(images, generator=torch.Generator().manual_seed(0))
    y = torch.arange(6)
    batch_images = {"labelled": (binarised, y), "unlabelled": binarised}
    batch_rows = {"labelled": (rows[:, :1], y), "unlabelled": rows[:, :1]}
    model.train()
    losses = []
    for batch in (batch_images, batch_rows):
        torch.manual_seed(1)
        losses.append(model.loss_terms(batch)["loss"])
    torch.testing.assert_close(losses[0], losses[1])
    torch.manual_seed(1)
    drawn = model.features(rows)  # one of the copies per image, then z1 ~ N(mean, std^2)
    assert drawn.shape == (6, a) and torch.isfinite(drawn).all()


def test_m1m2_fit_caches_the_posterior_and_refuses_a_cache_too_large(m1m2_run, monkeypatch, tmp_path: Path) -> None:
    """A fit of M1+M2 trains on the data module's cached rows, which it drops when the fit ends; a cache larger
    than half the free memory is one ConfigError naming model.init_args.m1_cache."""
    model, _, _, dm, vae_copy = m1m2_run
    seen = []
    model2 = M1M2(vae_hparams=model.hparams.vae_hparams, hidden_dims=[16], classifier_hidden_dims=[16], latent_dim=3,
                m1_cache=2)
    model2.on_train_batch_start = lambda batch, batch_idx: seen.append(batch["unlabelled"].shape)
    quiet_trainer(max_steps=2, limit_val_batches=0, default_root_dir=str(tmp_path)).fit(model2, datamodule=dm)
    assert seen == [(100, 2, 2 * model.m1_encoder.out_dim)] * 2 and dm._train_features is None
    monkeypatch.setattr("ssvae_pl.models.m1_latents.free_memory", lambda device: 1000)
    with pytest.raises(ConfigError, match="model.init_args.m1_cache"):
        quiet_trainer(max_steps=1, limit_val_batches=0, default_root_dir=str(tmp_path)).fit(model2, datamodule=dm)
    with pytest.raises(ConfigError, match="model.m1_cache"):
        M1M2(vae_hparams=model.hparams.vae_hparams, m1_cache=0)


def test_m1m2_checkpoint_is_self_contained(tmp_path: Path, m1m2_run) -> None:
    """The M1+M2 checkpoint carries M1's encoder: it loads and predicts the same with the VAE file gone."""
    model, trainer, _, dm, vae_copy = m1m2_run
    ckpt = tmp_path / "m1m2.ckpt"
    trainer.save_checkpoint(ckpt)
    vae_copy.unlink(missing_ok=True)

    restored = M1M2.load_from_checkpoint(ckpt, map_location="cpu")
    assert restored.hparams.vae_checkpoint == str(vae_copy) and not vae_copy.exists()
    x, _ = to_model_input(next(iter(dm.test_dataloader())))
    assert_restored_equals(restored, model, x)
    assert all(not p.requires_grad for p in restored.m1_encoder.parameters())


def test_bad_vae_checkpoints_raise_checkpoint_error(tmp_path: Path, vae_checkpoint: Path, m1m2_run) -> None:
    """Missing, truncated and not-a-VAE checkpoints raise CheckpointError naming model.vae_checkpoint and the
    file; M1+M2 without a checkpoint, or on images of another shape, is refused too."""
    missing = tmp_path / "missing.ckpt"
    with pytest.raises(CheckpointError) as err:
        M1M2(vae_checkpoint=str(missing))
    assert "model.vae_checkpoint" in str(err.value) and str(missing) in str(err.value)

    truncated = tmp_path / "truncated.ckpt"
    data = vae_checkpoint.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot be read") as err:
        M1M2(vae_checkpoint=str(truncated))
    assert "model.vae_checkpoint" in str(err.value) and str(truncated) in str(err.value)

    _, trainer, _, _, _ = m1m2_run
    not_a_vae = tmp_path / "m1m2.ckpt"
    trainer.save_checkpoint(not_a_vae)
    with pytest.raises(CheckpointError) as err:
        M1M2(vae_checkpoint=str(not_a_vae))
    assert "model.vae_checkpoint" in str(err.value) and str(not_a_vae) in str(err.value)

    with pytest.raises(ConfigError, match="model.vae_checkpoint is required"):
        M1M2()
    with pytest.raises(ConfigError, match="that is M1\\+M2, class_path ssvae_pl.models.M1M2"):
        M2(likelihood="gaussian")
    with pytest.raises(CheckpointError, match="shape"):
        M1M2(vae_checkpoint=str(vae_checkpoint), input_shape=(3, 32, 32))


def test_m2_config_debug_run_through_the_command(tmp_path: Path, shared_mnist_dir: Path) -> None:
    """``ssvae fit -c m2.yaml -c debug.yaml`` with the label budget as one flag runs one batch of each stage and
    writes nothing."""
    result = ssvae(tmp_path, "fit", "-c", M2_CONFIG, "-c", DEBUG, *data_args(shared_mnist_dir), *TINY_M2,
                   "--data.num_labelled", "200")
    ok(result)
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())


def test_m1m2_config_debug_run_through_the_command(tmp_path: Path, shared_mnist_dir: Path,
                                                   vae_checkpoint: Path) -> None:
    """m1m2.yaml runs on a VAE checkpoint with the debug preset; without one it stops with one line naming
    model.vae_checkpoint."""
    data = data_args(shared_mnist_dir)
    # a VAE fitted for 2 steps uses none of its latent dimensions yet: one line naming the setting, nothing written
    too_strict = ssvae(tmp_path, "fit", "-c", M1M2_CONFIG, "-c", DEBUG, *data, *TINY_M2,
                       "--model.vae_checkpoint", str(vae_checkpoint))
    assert_one_line_user_error(too_strict, "model.m1_active_threshold")
    ok(ssvae(tmp_path, "fit", "-c", M1M2_CONFIG, "-c", DEBUG, *data, *TINY_M2,
             "--model.vae_checkpoint", str(vae_checkpoint), "--model.init_args.m1_active_threshold", "0"))
    assert not any(tmp_path.iterdir())
    assert_one_line_user_error(ssvae(tmp_path, "fit", "-c", M1M2_CONFIG, "-c", DEBUG, *data, *TINY_M2),
                               "model.vae_checkpoint")


class RecordClassifierWeights(pl.Callback):
    """The classifier's first weight matrix after every training step."""

    def __init__(self) -> None:
        self.weights = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.weights.append(pl_module.classifier.net[0].weight.detach().clone())


def test_ema_weights_average_every_step_and_travel_in_the_checkpoint(make_dm, tmp_path: Path) -> None:
    """EMAWeights: after the fit (and in its checkpoint's state_dict) the weights are w_avg, updated after every step
    as decay * w_avg + (1 - decay) * w from the first step's weights on; the checkpoint keeps the current weights
    too, for a resumed fit."""
    from ssvae_pl.callbacks import EMAWeights

    record, decay = RecordClassifierWeights(), 0.9
    model = tiny_m2()
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, default_root_dir=str(tmp_path),
                            callbacks=[record, EMAWeights(decay)])
    trainer.fit(model, datamodule=make_dm(batch_size=100, labelled_batch_size=50))
    average = record.weights[0]
    for w in record.weights[1:]:
        average = decay * average + (1 - decay) * w
    torch.testing.assert_close(model.classifier.net[0].weight, average)
    trainer.save_checkpoint(tmp_path / "ema.ckpt")
    ckpt = torch.load(tmp_path / "ema.ckpt", weights_only=False)
    torch.testing.assert_close(ckpt["state_dict"]["classifier.net.0.weight"], average)
    with pytest.raises(ConfigError, match="decay"):
        EMAWeights(1.0)


def test_ema_weights_every_n_steps_use_the_decay_of_n_steps_and_catch_up_at_the_end(make_dm, tmp_path: Path) -> None:
    """EMAWeights(every_n_steps=2) over 5 steps: the first update (step 2) takes the weights, step 4 averages with
    decay^2, and the end of training catches up on step 5 with decay^1; the checkpoint's state_dict is that average."""
    from ssvae_pl.callbacks import EMAWeights

    record, decay = RecordClassifierWeights(), 0.9
    model = tiny_m2()
    trainer = quiet_trainer(max_steps=5, limit_val_batches=0, default_root_dir=str(tmp_path),
                            callbacks=[record, EMAWeights(decay, every_n_steps=2)])
    trainer.fit(model, datamodule=make_dm(batch_size=100, labelled_batch_size=50))
    w = record.weights
    average = decay**2 * w[1] + (1 - decay**2) * w[3]
    average = decay * average + (1 - decay) * w[4]
    torch.testing.assert_close(model.classifier.net[0].weight, average)
    trainer.save_checkpoint(tmp_path / "ema.ckpt")
    ckpt = torch.load(tmp_path / "ema.ckpt", weights_only=False)
    torch.testing.assert_close(ckpt["state_dict"]["classifier.net.0.weight"], average)
    with pytest.raises(ConfigError, match="every_n_steps"):
        EMAWeights(every_n_steps=0)


def test_ema_weights_leave_the_frozen_encoder_out_of_the_update(m1m2_run, make_dm, tmp_path: Path) -> None:
    """M1+M2 with EMAWeights: the per-step update touches M2's trainable weights only (one foreach product), and
    the averaged model still holds M1's frozen encoder unchanged."""
    from ssvae_pl.callbacks import EMAWeights

    model = M1M2(vae_hparams=m1m2_run[0].hparams.vae_hparams, hidden_dims=[16], classifier_hidden_dims=[16],
               latent_dim=3, m1_active_threshold=m1m2_run[0].hparams.m1_active_threshold)
    encoder = {k: v.clone() for k, v in model.m1_encoder.state_dict().items()}
    ema, updated = EMAWeights(0.9), []
    lerp = torch._foreach_lerp_
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, default_root_dir=str(tmp_path), callbacks=[ema])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "_foreach_lerp_", lambda a, c, w: updated.append(sum(t.numel() for t in a)) or lerp(a, c, w))
        trainer.fit(model, datamodule=make_dm(batch_size=100, labelled_batch_size=50))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert updated == [trainable, trainable]  # steps 2 and 3 (the first copies the weights)
    for key, value in model.m1_encoder.state_dict().items():
        assert torch.equal(value, encoder[key]), key
