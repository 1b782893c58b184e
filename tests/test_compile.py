"""``model.compile``: training through torch.compile gives the same loss as eager, and the checkpoint it writes has
the eager model's keys (no ``_orig_mod.``), loading into a model built without compile."""

from __future__ import annotations

import shutil

import pytest
import torch

from helpers.trainers import quiet_trainer
from test_m2 import binary_images, tiny_m2
from ssvae_pl.errors import ConfigError
from ssvae_pl.models import M2

BACKEND = "aot_eager"  # dynamo's graph capture and AOT autograd without code generation: quick on any CPU


@pytest.fixture(autouse=True)
def compiling_on():
    """torch.compile as a user has it (the suite switches it off: conftest.py)."""
    with torch._dynamo.config.patch(disable=False):
        yield


def test_compiled_m2_trains_and_its_checkpoint_loads_without_compile(tmp_path, make_dm) -> None:
    eager, compiled = tiny_m2(), tiny_m2(compile=BACKEND)
    batch = {"labelled": (binary_images(8), torch.arange(8)), "unlabelled": binary_images(16, seed=1)}
    eps = dict(eps_labelled=torch.randn(8, 4), eps_unlabelled=torch.randn(16, 10, 4))
    loss = compiled._training_loss(batch, **eps)["loss"]
    assert torch.allclose(loss, eager.loss_terms(batch, **eps)["loss"], rtol=1e-5)
    assert compiled._training_loss is not compiled.loss_terms

    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, default_root_dir=str(tmp_path))
    trainer.fit(compiled, datamodule=make_dm())
    trainer.save_checkpoint(tmp_path / "compiled.ckpt")
    state = torch.load(tmp_path / "compiled.ckpt", weights_only=True)["state_dict"]
    assert state.keys() == eager.state_dict().keys() and not any("_orig_mod" in k for k in state)
    restored = M2.load_from_checkpoint(tmp_path / "compiled.ckpt", compile=False)
    assert restored._training_loss == restored.loss_terms
    for key, value in restored.state_dict().items():
        assert torch.equal(value, compiled.state_dict()[key])


def test_unknown_compile_backend_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="model.compile='nonsense'"):
        tiny_m2(compile="nonsense")


def test_compiling_on_a_cpu_without_a_cpp_compiler_is_a_config_error_before_the_first_step(make_dm,
                                                                                            tmp_path) -> None:
    """Inductor writes C++ for a CPU: without a working compiler the fit stops before its first step with a
    ConfigError naming model.compile and the compilers tried (inductor's own error, deep in the first step, before);
    a backend that writes no code (aot_eager) needs none."""
    from torch._inductor import config

    model = tiny_m2(compile=True)
    steps = []
    model.training_step = lambda batch, batch_idx: steps.append(batch_idx)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, default_root_dir=str(tmp_path))
    with config.patch({"cpp.cxx": (None, "/nonexistent/g++")}), \
            pytest.raises(ConfigError, match=r"model.compile=true .* \(tried /nonexistent/g\+\+\)"):
        trainer.fit(model, datamodule=make_dm())
    assert steps == []
    quiet_trainer(max_steps=1, limit_val_batches=0, default_root_dir=str(tmp_path / "b")).fit(
        tiny_m2(compile=BACKEND), datamodule=make_dm())


def test_a_torch_compile_mode_is_a_valid_setting() -> None:
    model = tiny_m2(compile="reduce-overhead")  # compiled lazily: building it compiles nothing
    assert model._training_loss is not model.loss_terms


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_give_the_eager_loss_step_after_step_and_train(tmp_path, make_dm) -> None:
    eager, graphed = tiny_m2().cuda(), tiny_m2(compile="reduce-overhead").cuda()
    graphed.load_state_dict(eager.state_dict())
    for seed in range(4):  # replays after the capture: each call's outputs are its own, not a stale buffer
        generator = torch.Generator().manual_seed(seed)
        batch = {"labelled": (binary_images(8, seed=seed).cuda(), torch.arange(8).cuda()),
                 "unlabelled": binary_images(16, seed=seed + 10).cuda()}
        eps = dict(eps_labelled=torch.randn(8, 4, generator=generator).cuda(),
                   eps_unlabelled=torch.randn(16, 10, 4, generator=generator).cuda())
        expected = eager.loss_terms(batch, **eps)["loss"]
        loss = graphed._training_loss(batch, **eps)["loss"]
        assert torch.allclose(loss, expected, rtol=1e-4), (seed, loss.item(), expected.item())
        graphed.zero_grad(set_to_none=True)  # as every optimiser step does: graphed gradients are not accumulated
        loss.backward()
    before = [p.detach().clone() for p in graphed.parameters()]
    trainer = quiet_trainer(accelerator="gpu", devices=1, max_steps=6, limit_val_batches=0,
                            default_root_dir=str(tmp_path))
    trainer.fit(graphed, datamodule=make_dm())
    after = list(graphed.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(b.cpu(), a.detach().cpu()) for b, a in zip(before, after))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_refuse_to_accumulate_gradients(make_dm) -> None:
    trainer = quiet_trainer(accelerator="gpu", devices=1, max_steps=2, limit_val_batches=0, accumulate_grad_batches=2)
    with pytest.raises(ConfigError, match="accumulate_grad_batches=2"):
        trainer.fit(tiny_m2(compile="reduce-overhead"), datamodule=make_dm())


SEEN: list[bool] = []  # torch.is_grad_enabled() of each graph the counting backend compiled


@torch._dynamo.register_backend
def ssvae_test_counting(graph, example_inputs):
    """aot_eager, counting its graphs: those compiled without gradients are evaluation graphs."""
    from torch._dynamo.backends.debugging import aot_eager

    SEEN.append(torch.is_grad_enabled())
    return aot_eager(graph, example_inputs)


@pytest.mark.parametrize("name", ["m2", "vae"])
def test_a_fits_validation_runs_compiled_and_a_lone_test_does_not(name, make_dm) -> None:
    from ssvae_pl.models import VAE

    torch._dynamo.reset()
    SEEN.clear()
    model = tiny_m2(compile="ssvae_test_counting") if name == "m2" else \
        VAE(hidden_dims=[16], latent_dim=4, compile="ssvae_test_counting")
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=2, limit_test_batches=2)
    trainer.fit(model, datamodule=make_dm())
    assert True in SEEN and False in SEEN, SEEN  # the training loss and the validation terms
    compiled_in_fit = len(SEEN)
    trainer.test(model, datamodule=make_dm())
    assert len(SEEN) == compiled_in_fit  # a test runs once: no compilation to wait for

    x = binary_images(6, seed=3)
    with torch.no_grad():
        if name == "m2":
            eps = torch.randn(6, 10, 4)
            for compiled_term, eager_term in zip(model._validation_terms(x, eps), model.evaluation_terms(x, eps)):
                torch.testing.assert_close(compiled_term, eager_term)
        else:  # the VAE's bound draws z: the posterior means are the deterministic part
            torch.testing.assert_close(model._validation_terms(x)["z_mean"], model.evaluation_terms(x)["z_mean"])


@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor's CPU code needs a C++ compiler")
def test_compiled_on_the_cpu_the_bound_draws_the_eager_noise() -> None:
    """inductor's own CPU generator draws one number at a time (15 times slower than ATen's); the compiled models
    use ATen's, so the same seed gives the same sampled bound as eager."""
    from ssvae_pl.models import VAE

    torch._dynamo.reset()
    model = VAE(hidden_dims=[16], latent_dim=4, compile=True)
    x = binary_images(6, seed=4)
    torch.manual_seed(7)
    eager = model(x)["elbo"]
    torch.manual_seed(7)
    torch.testing.assert_close(model._training_terms(x)["elbo"], eager, rtol=1e-4, atol=1e-4)


def test_auto_compiles_with_inductor_where_a_compiler_is_found(make_dm, tmp_path, monkeypatch) -> None:
    """model.compile auto (the shipped configs'): the training step goes through torch.compile with inductor's
    options where the CPU has a C++ compiler (this machine has g++)."""
    from ssvae_pl.models import compiling

    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(kwargs) or fn)
    assert compiling.why_not_compiled("cpu") is None
    quiet_trainer(max_steps=1, limit_val_batches=0, default_root_dir=str(tmp_path)).fit(
        tiny_m2(compile="auto"), datamodule=make_dm())
    assert calls and calls[0]["options"]["fallback_random"] is True and "backend" not in calls[0]


def test_auto_trains_eagerly_without_a_compiler_and_says_why(make_dm, tmp_path, monkeypatch) -> None:
    """model.compile auto on a CPU without a working C++ compiler: no error, one line naming what is missing, and
    the eager step (torch.compile never called)."""
    from torch._inductor import config

    from ssvae_pl.models import compiling

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: pytest.fail("compiled without a compiler"))
    said: list[str] = []
    monkeypatch.setattr(compiling, "rank_zero_info", said.append)  # Lightning's console logger, as printed
    with config.patch({"cpp.cxx": (None, "/nonexistent/g++")}):
        quiet_trainer(max_steps=2, limit_val_batches=0, default_root_dir=str(tmp_path)).fit(
            tiny_m2(compile="auto"), datamodule=make_dm())
    assert said == ["model.compile auto: training eagerly on the cpu: no working C++ compiler was found (tried "
                    "/nonexistent/g++; install g++)"]
