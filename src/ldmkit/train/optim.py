"""Per-step optimisation helpers of the stage loops: learning-rate schedule, AdamW, gradient norm and clipping, EMA,
optimizer state layout.
Re-exported by `ldmkit.train.common`, where the stages reach them."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ldmkit.train.common import TrainConfig

def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at the last step."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    span = max(1, tc.steps - tc.warmup_steps)
    progress = min(1.0, (step - tc.warmup_steps) / span)
    floor = tc.lr * tc.min_lr_ratio
    return floor + 0.5 * (tc.lr - floor) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def adamw(params, lr: float, betas, weight_decay: float) -> torch.optim.AdamW:
    """torch's AdamW, fused (one kernel for all parameters) where torch has the fused form: on a CPU it makes the
    update ~2.7x faster than the per-parameter loop (5.5 vs 14.5 ms for the 2.7M-parameter autoencoder); same math."""
    params = list(params)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=can_fuse(params))


def can_fuse(params: list[torch.Tensor]) -> bool | None:
    """True where torch has the fused AdamW kernel for every parameter's device, else None (torch's default)."""
    return (bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)) or None


def make_adamw(params, tc: TrainConfig) -> torch.optim.Optimizer:
    """The stage's optimizer: AdamW, or with `tc.optimizer == "muon"` Muon on the weight matrices (train/muon.py)."""
    if tc.optimizer == "muon":
        from ldmkit.train.muon import MuonAdamW  # it imports this module
        return MuonAdamW(params, tc.lr, tc.betas, tc.weight_decay)
    return adamw(params, tc.lr, tc.betas, tc.weight_decay)


def clip_grad(params, max_norm: float) -> float:
    params = [p for p in params if p.grad is not None]
    if max_norm <= 0:
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))) if params else 0.0
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, halflife_steps: float) -> None:
    """ema <- lerp(ema, model, 1 - decay) with decay = 0.5 ** (1 / half-life); buffers are copied."""
    if halflife_steps <= 0:
        return
    weight = 1.0 - 0.5 ** (1.0 / halflife_steps)
    model = unwrap(model)
    e_params = list(ema.parameters())
    m_params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(e_params, m_params, weight)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)


def match_param_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give every optimizer state tensor shaped like its parameter the parameter's memory layout, in place.

    `Optimizer.load_state_dict` keeps the strides the state was saved with, and the CPU's fused AdamW walks
    parameter, gradient and state as flat memory: a channels-last parameter (the UNet's kernels) with a contiguous
    exp_avg (a checkpoint written before they were channels-last) would be updated with the wrong elements."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, v in state.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP or torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model
