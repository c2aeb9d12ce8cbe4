"""Small layers shared by every model: timestep embedding, attention, normalisation, initialisation helpers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: (B, ...) -> (B,)."""
    return x.flatten(1).mean(1)


def sum_flat(x: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the first: (B, ...) -> (B,)."""
    return x.flatten(1).sum(1)


class _GroupNormNHWC(torch.autograd.Function):
    """GroupNorm of a channels-last (B, C, H, W) float32/float64 map, computed on its (B, HW, C) view.

    Statistics are two-pass (group means, then the mean square of the centred map), and the centred map is what the
    backward keeps: dx = A dy + P xc + Q with per-(example, channel) A = w rstd and per-group P, Q from the channel
    sums of dy and dy * xc."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float):
        B, C, H, W = x.shape
        k, n = C // groups, H * W * C // groups  # channels and elements per group
        xv = x.permute(0, 2, 3, 1).reshape(B, H * W, C)  # a view of channels-last memory
        mean = xv.sum(1).view(B, groups, k).sum(-1) / n  # (B, G)
        xc = xv - mean.repeat_interleave(k, 1)[:, None]  # (B, HW, C) centred
        rstd = torch.rsqrt(xc.square().sum(1).view(B, groups, k).sum(-1) / n + eps)  # (B, G)
        scale = rstd.repeat_interleave(k, 1) * weight  # (B, C)
        ctx.save_for_backward(xc, weight, rstd)
        ctx.groups = groups
        return torch.addcmul(bias, xc, scale[:, None]).view(B, H, W, C).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, dy):
        xc, weight, rstd = ctx.saved_tensors
        G = ctx.groups
        B, HW, C = xc.shape
        H, W = dy.shape[2:]
        k, n = C // G, HW * C // G
        dyv = dy.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(B, HW, C)
        sum_dy = dyv.sum(1)  # (B, C)
        sum_dy_xc = (dyv * xc).sum(1)  # (B, C)
        g_dy = (weight * sum_dy).view(B, G, k).sum(-1)  # (B, G): group sums of dy * w and dy * w * xc
        g_dy_xc = (weight * sum_dy_xc).view(B, G, k).sum(-1)
        p = (-rstd.pow(3) * g_dy_xc / n).repeat_interleave(k, 1)  # (B, C) coefficient of xc
        q = (-rstd * g_dy / n).repeat_interleave(k, 1)  # (B, C) constant
        r = rstd.repeat_interleave(k, 1)  # (B, C)
        dx = torch.addcmul(q[:, None], xc, p[:, None]).addcmul_(dyv, (r * weight)[:, None])  # dy coefficient w rstd
        return dx.view(B, H, W, C).permute(0, 3, 1, 2), (sum_dy_xc * r).sum(0), sum_dy.sum(0), None, None


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and state dict) that on the CPU normalises channels-last float maps with at
    most two channels per group on their (B, HW, C) view: torch's own channels-last kernel walks such groups one
    strided element at a time. UNet preset, batch 128, fp32, 32 channels in 32 groups at 8x8: forward 3-4x, forward
    + backward 2-2.8x faster; with four or more channels per group torch's kernel is as fast or faster, so it is
    kept there, for every other layout and dtype, and off the CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dim() == 4 and x.dtype in (torch.float32, torch.float64)
                and self.affine and self.num_channels // self.num_groups <= 2
                and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()):
            return _GroupNormNHWC.apply(x, self.weight.to(x.dtype), self.bias.to(x.dtype), self.num_groups, self.eps)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def group_norm(channels: int, groups: int = 32, eps: float = 1e-6) -> GroupNorm:
    """GroupNorm with the largest group count <= `groups` that divides `channels`."""
    g = math.gcd(channels, groups)
    return GroupNorm(g, channels, eps=eps, affine=True)


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
    """Multi-head attention over token sequences with `scaled_dot_product_attention`.

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
        B, T, D = x.shape
        ctx = x if context is None else context
        q = self.q(x).view(B, T, self.heads, D // self.heads).transpose(1, 2)  # (B, H, T, d)
        k, v = self.kv(ctx).view(B, ctx.shape[1], 2, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, S, d)
        attn_mask = None if mask is None else mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, S)
        if q.device.type == "cpu":
            # On the CPU the attention itself runs in float32, also under bf16 autocast: the bf16 SDPA backward is
            # several times slower there than the fp32 one (2.5-12x measured), and the fp32 softmax is the more
            # accurate. The projections around it keep the autocast dtype. GPUs keep their fused bf16/fp16 kernels.
            ct = torch.promote_types(q.dtype, torch.float32)  # float32 (float64 stays float64)
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.to(ct), k.to(ct), v.to(ct), attn_mask=attn_mask)
            y = y.to(q.dtype)  # (B, H, T, d)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, T, d)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v written out, the softmax in at least float32: the reference the fused kernel is
    tested against, and the faster form on the CPU for short sequences (the autoencoder's mid block)."""
    w = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        w = w.masked_fill(~mask, float("-inf"))
    return w.softmax(-1, dtype=torch.promote_types(w.dtype, torch.float32)).to(v.dtype) @ v


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
