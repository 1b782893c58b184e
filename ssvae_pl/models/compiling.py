"""The opt-in ``compile`` of the models: torch.compile applied to the training loss and to a fit's validation
terms, not to the module.

``model.compile`` takes ``true`` (inductor, torch.compile's default), ``auto`` (``true`` where inductor can compile
for the device, eager with one line saying why where it cannot: the shipped configs'), a torch.compile mode, or a
backend's name. The
mode ``reduce-overhead`` (and ``max-autotune``) also captures the compiled forward and backward passes in CUDA graphs
on a GPU: each step replays them with one launch each instead of hundreds, so a small model's step costs the GPU's
arithmetic rather than the host's kernel launches. On a CPU those modes compile like ``true``.
"""

from __future__ import annotations

from typing import Callable, Union

import torch
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from torch.utils._pytree import tree_leaves

from ssvae_pl.errors import ConfigError

CompileSetting = Union[bool, str]  # False, True, "auto", a torch.compile mode or a backend's name
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def check_compile(setting: CompileSetting) -> None:
    backends = torch._dynamo.list_backends(exclude_tags=())
    if isinstance(setting, str) and setting != "auto" and setting not in MODES and setting not in backends:
        raise ConfigError(f"model.compile={setting!r} is neither a torch.compile mode nor a backend; use true, auto, "
                          f"false, one of the modes {list(MODES)} or a backend of {sorted(backends)}.")


def why_not_compiled(device: str) -> str | None:
    """Why inductor cannot compile for ``device`` here (TorchDynamo switched off, no C++ compiler for a CPU, no
    Triton for a GPU), or None when it can: what ``model.compile auto`` asks."""
    if torch._dynamo.config.disable:
        return "torch.compile is switched off (TORCH_COMPILE_DISABLE=1)"
    if device == "cpu":
        tried = cxx_tried_in_vain()
        return None if tried is None else f"no working C++ compiler was found (tried {tried}; install g++)"
    if device == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed (pip install triton)"
    return f"inductor does not compile for {device}"


def cxx_tried_in_vain() -> str | None:
    """The C++ compilers inductor tried for a CPU (``CXX``, else g++), when none of them works; None when one does."""
    from torch._inductor import config
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        return ", ".join(c for c in (config.cpp.cxx if isinstance(config.cpp.cxx, (list, tuple)) else [config.cpp.cxx])
                         if c)
    return None


def resolve_auto(setting: CompileSetting, device: str, say: bool = False) -> CompileSetting:
    """``auto`` as it applies on ``device``: True where inductor can compile there, else False (with ``say``, one
    line saying why); any other setting as it is."""
    if setting != "auto":
        return setting
    why = why_not_compiled(device)
    if why is not None and say:
        rank_zero_info(f"model.compile auto: training eagerly on the {device}: {why}")
    return why is None


def check_compile_can_train(setting: CompileSetting, trainer) -> None:
    """Before a fit's first step, what would otherwise fail inside it: CUDA graphs write each step's gradients into
    the same buffers, so they cannot add up several batches' own; and inductor turns a CPU's graphs into C++, so it
    needs a working C++ compiler (``CXX``, else g++), which it would first look for in the middle of a step."""
    device = trainer.strategy.root_device.type
    setting = resolve_auto(setting, device, say=True)
    if setting is False:
        return
    accumulate = trainer.accumulate_grad_batches
    if setting in CUDA_GRAPH_MODES and accumulate > 1 and device == "cuda":
        raise ConfigError(f"model.compile={setting} (CUDA graphs) cannot accumulate gradients over "
                          f"trainer.accumulate_grad_batches={accumulate} batches; use model.compile true, or a "
                          f"batch {accumulate} times larger.")
    if device == "cpu" and (setting is True or setting in MODES) and (tried := cxx_tried_in_vain()) is not None:
        raise ConfigError(f"model.compile={str(setting).lower()} compiles the step into C++ on a CPU, and no "
                          f"working C++ compiler was found (tried {tried}): install one (g++, or name it in CXX), or "
                          "set model.compile false.")


def fitting(module) -> bool:
    """Whether ``module`` runs inside ``Trainer.fit``: its validations then repeat every epoch, so a compiled
    evaluation pays for its compilation; a lone ``test`` or ``predict`` runs eagerly."""
    return module._trainer is not None and module.trainer.state.fn == TrainerFn.FITTING


def compiled(fn: Callable, setting: CompileSetting) -> Callable:
    """``fn`` itself when ``setting`` is False, else ``fn`` through torch.compile with the given mode or backend.
    Compiling the bound loss method leaves the module and its state dict untouched: checkpoints carry no
    ``_orig_mod.`` keys and load without compile. With CUDA graphs, each call starts a new step
    (``cudagraph_mark_step_begin``): the previous step's outputs, already used, may be overwritten.

    On a CPU, inductor's code draws random numbers one at a time; there it calls ATen's vectorised generator instead
    (``fallback_random``, docs/why-cpu-kernels.md), so compiled and eager steps draw the same noise from one seed."""
    if setting is False:
        return fn
    if setting not in (True, "auto") and setting not in MODES:
        return torch.compile(fn, backend=setting)
    from torch._inductor import list_mode_options

    mode = "default" if setting in (True, "auto") else setting
    graphs: dict[str, Callable] = {}  # one per device type

    def step(*args, **kwargs):
        device = next((leaf.device.type for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)),
                      "cpu")
        graph = graphs.get(device)
        if graph is None:
            options = {**list_mode_options(mode), "fallback_random": device == "cpu"}
            graph = graphs[device] = fn if resolve_auto(setting, device) is False else torch.compile(fn,
                                                                                                   options=options)
        if device == "cuda" and mode in CUDA_GRAPH_MODES:
            torch.compiler.cudagraph_mark_step_begin()
        return graph(*args, **kwargs)

    return step
