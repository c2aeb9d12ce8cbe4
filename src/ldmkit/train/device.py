"""Where a run computes: the device, and the precision it really runs at there."""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

from ldmkit.nn import bf16_is_fast


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            return torch.device("cuda", local)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --set train.device=cpu")
    return dev


def autocast(device: torch.device, precision: str):
    """bf16 autocast where asked for and the hardware has bf16 arithmetic, otherwise a no-op (fp32).

    `precision="bf16"` means "bf16 where it is fast": on a CPU without native bf16 instructions (AVX512-BF16 or
    AMX) every bf16 kernel is emulated and a training step runs 10-20x slower than in fp32 (measured on an AVX2
    machine), so there the step runs in fp32 and the run's log says so (`effective_precision`).
    """
    if effective_precision(device, precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def effective_precision(device: torch.device, precision: str) -> str:
    """The precision `autocast(device, precision)` actually runs at."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown precision {precision!r}; use fp32 or bf16 (fp16 is very slow on CPU)")
    return "bf16" if precision == "bf16" and bf16_is_fast(device) else "fp32"
