"""The precision a run gets when its config names none: the fastest one the processor computes natively.

bf16 autocast roughly doubles a CPU's matrix-product rate where the processor has bf16 instructions
(``avx512_bf16`` or ``amx_bf16`` among its flags) and is many times slower than fp32 where it has not; GPUs that
support bf16 gain as well. The bounds are reduced in fp32 either way (``elbo``).
"""

from __future__ import annotations

from pathlib import Path

import torch

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo(field: str) -> list[str]:
    """The values of ``field`` in Linux's /proc/cpuinfo, one per processor (none elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.split(":", 1)[0].strip() == field]


def cpu_flags() -> set[str]:
    """The processor's feature flags (Linux's /proc/cpuinfo; empty elsewhere)."""
    return {flag for flags in _cpuinfo("flags") for flag in flags.split()}


def describe_machine() -> str:
    """One line for a measurement's record: the processor, its cores, its bf16 flags, and the GPUs."""
    import os
    import platform

    names = _cpuinfo("model name")
    bf16 = [flag for flag in BF16_CPU_FLAGS if flag in cpu_flags()]
    cpu = f"{names[0] if names else platform.processor() or platform.machine()}, {os.cpu_count()} cores, " + \
        (f"flags {' '.join(bf16)}" if bf16 else "no bf16 flags (avx512_bf16, amx_bf16)")
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return cpu + ("; " + ", ".join(gpus) if gpus else "; no GPU")


def uses_cuda(accelerator: object = "auto") -> bool:
    """Whether a Trainer with this ``accelerator`` setting trains on a CUDA GPU."""
    name = accelerator if isinstance(accelerator, str) else type(accelerator).__name__.lower()
    return torch.cuda.is_available() and any(key in name for key in ("auto", "gpu", "cuda"))


def best_precision(accelerator: object = "auto") -> tuple[str, str]:
    """(Lightning's precision, why): ``bf16-mixed`` on a GPU that supports bf16 and on a CPU with bf16
    instructions, ``32-true`` elsewhere."""
    if uses_cuda(accelerator):
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", f"{torch.cuda.get_device_name()} supports bf16"
        return "32-true", f"{torch.cuda.get_device_name()} has no bf16"
    found = [flag for flag in BF16_CPU_FLAGS if flag in cpu_flags()]
    if found:
        return "bf16-mixed", f"this CPU has {' and '.join(found)}"
    return "32-true", "this CPU has no bf16 instructions (avx512_bf16, amx_bf16)"
