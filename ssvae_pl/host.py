"""Work the host repeats at every training step that a machine without CUDA devices need not do.

Lightning sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` when it is imported, so that asking whether CUDA is there does not
initialise CUDA (a check that keeps forked processes able to use it). torch answers that check afresh at every call
until CUDA is initialised, which a run on the CPU never does, and torch.optim's Adam asks at every step (its CUDA
graph check): NVML's library looked up through ``ctypes`` at each step, and, where it is missing, the CUDA runtime
asked as well (its cost: docs/why-cpu-kernels.md). Where NVML (or the runtime) finds no device, no forked process
can use CUDA anyway, so the check goes back to torch's own, which the CUDA runtime answers once.
"""

from __future__ import annotations

import os

import torch

NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def check_cuda_once() -> None:
    """torch's own CUDA check (asked once, then cached) in place of Lightning's per-call NVML one, where there is no
    CUDA device; nothing where there is one."""
    if os.environ.get(NVML_CHECK) == "1" and torch.cuda.device_count() == 0:
        os.environ[NVML_CHECK] = "0"
