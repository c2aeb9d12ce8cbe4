"""Small layers shared by every model: precision, timestep embedding, attention, initialisation helpers.

The CPU speed kernels (attention core, GroupNorm, token linears) are in `ldmkit.kernels`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.kernels import attention


def bf16_is_fast(device: torch.device | str = "cpu") -> bool:
    """Whether the device does bf16 arithmetic natively: CUDA GPUs that report it; x86 CPUs with AVX512-BF16 or
    AMX. Elsewhere torch emulates bf16 and autocast makes CPU training 10-20x slower, so callers fall back to fp32."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


PRECISIONS = ("fp32", "bf16")


def in_precision(fn, precision: str, device: torch.device | str = "cpu"):
    """`fn` run under bf16 autocast when `precision` is "bf16" and the device computes bf16 natively (else as is),
    its tensor output returned in float32: the sampler's state and arithmetic stay fp32, only the network is bf16."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; use one of {PRECISIONS}")
    if precision == "fp32" or not bf16_is_fast(device):
        return fn
    kind = torch.device(device).type

    def run(*args, **kwargs):
        with torch.autocast(kind, dtype=torch.bfloat16):
            out = fn(*args, **kwargs)
        return out.float()
    return run


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` in place and return it (residual branches start as the identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def per_example(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-example value (B,) as (B, 1, ..., 1), to scale or shift `like` (B, ...) example by example."""
    return v.reshape(-1, *[1] * (like.ndim - 1))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: (B, ...) -> (B,)."""
    return x.flatten(1).mean(1)


def sum_flat(x: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the first: (B, ...) -> (B,)."""
    return x.flatten(1).sum(1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) times: (B,) -> (B, dim), cos half then sin half."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepMLP(nn.Module):
    """Sinusoidal features followed by a two-layer MLP: (B,) -> (B, out_dim)."""

    def __init__(self, freq_dim: int, out_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))


class Attention(nn.Module):
    """Multi-head attention over token sequences (`ldmkit.kernels.attention`).

    Self-attention when `context` is None, cross-attention otherwise. `mask` is a boolean (B, S) key mask,
    True where a key may be attended to (padding is False).
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by heads={heads}; pick heads that divide it")
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=bias)
        self.kv = nn.Linear(context_dim or dim, 2 * dim, bias=bias)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if context is None else context
        k, v = self.kv(ctx).chunk(2, dim=-1)  # (B, S, D) each
        return self.out(attention(self.q(x), k, v, self.heads, mask))  # (B, T, D)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
