"""CPU speed kernels: each computes what a plain torch layer computes, faster on a CPU, with its measured gain here.

The architectures (`diffusion/unet.py`, `diffusion/dit.py`, `autoencoder/vae.py`, `conditioning/text.py`) call
these and otherwise read as the papers draw them:
- `attention`: the one multi-head attention function every model calls;
- `group_norm`: the one normalisation factory (`GroupNorm`, a drop-in `nn.GroupNorm`);
- `ConvLinear`: a token-wise linear layer computed as a channels-last 1x1 convolution;
- `nearest_upsample_conv`: nearest x2 followed by a 3x3 conv, as one transposed conv on the small map;
- `fp32_under_autocast`: keeps normalisation inputs in float32 under CPU bf16 autocast.

Each has an equality test against the plain form (tests/test_kernels.py). Figures were measured on a 2-core Zen 5
(AVX512-BF16), torch 2.13 CPU; off the CPU every kernel falls back to the plain torch call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- attention

# Single-head attention over at most this many keys is written out on the CPU: the autoencoder's mid block
# (64 positions, 128 channels, batch 32) runs forward + backward in about half the time of the fused kernel. The
# (T, S) weights then live in memory, hence the cap (a Stable Diffusion VAE's 64x64 latents keep the fused kernel).
WRITTEN_OUT_MAX_KEYS = 1024


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int = 1,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head softmax(q k^T / sqrt(d)) v on token tensors: q (B, T, D), k and v (B, S, D), mask (B, S) bool
    (True = may be attended to) -> (B, T, D).

    On the CPU the fused kernel runs in float32 with autocast off, also inside bf16 autocast: its bf16 backward is
    2.5-12x slower there than the float32 one (fashion-mnist UNet, batch 128, bf16 training step: 224-241 ms
    against 270-297 ms with the core in bf16); the projections around it keep the autocast dtype. Single-head
    attention over few keys is written out instead (`WRITTEN_OUT_MAX_KEYS`). GPUs keep their fused bf16 kernels."""
    B, T, D = q.shape
    S, d = k.shape[1], D // heads
    q = q.reshape(B, T, heads, d).transpose(1, 2)  # (B, H, T, d)
    k = k.reshape(B, S, heads, d).transpose(1, 2)  # (B, H, S, d)
    v = v.reshape(B, S, heads, d).transpose(1, 2)  # (B, H, S, d)
    m = None if mask is None else mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, S)
    if q.device.type != "cpu":
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    elif heads == 1 and S <= WRITTEN_OUT_MAX_KEYS:
        y = written_out_attention(q, k, v, m)  # matmuls in the autocast dtype, softmax in float32
    else:
        ct = torch.promote_types(q.dtype, torch.float32)  # float32 (float64 stays float64)
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.to(ct), k.to(ct), v.to(ct), attn_mask=m).to(q.dtype)
    return y.transpose(1, 2).reshape(B, T, D)


def written_out_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v as three ops, the softmax in at least float32; `mask` broadcasts against the
    (..., T, S) weights, True = attend. The reference the fused kernel is tested against."""
    w = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        w = w.masked_fill(~mask, float("-inf"))
    return w.softmax(-1, dtype=torch.promote_types(w.dtype, torch.float32)).to(v.dtype) @ v


# ----------------------------------------------------------------------------- normalisation

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
    + backward 2-2.8x faster; whole-model sampling forward 1.06-1.08x. With four or more channels per group torch's
    kernel is as fast or faster, so it is kept there, for every other layout and dtype, and off the CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dim() == 4 and x.dtype in (torch.float32, torch.float64)
                and self.affine and self.num_channels // self.num_groups <= 2
                and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()):
            return _GroupNormNHWC.apply(x, self.weight.to(x.dtype), self.bias.to(x.dtype), self.num_groups, self.eps)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def group_norm(channels: int, groups: int = 32, eps: float = 1e-6) -> GroupNorm:
    """GroupNorm with the largest group count <= `groups` that divides `channels`."""
    return GroupNorm(math.gcd(channels, groups), channels, eps=eps, affine=True)


def fp32_under_autocast(x: torch.Tensor) -> torch.Tensor:
    """x in float32 while CPU autocast is on (GroupNorm is ~2x slower in bf16 on the CPU); x unchanged otherwise."""
    return x.float() if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") else x


# ----------------------------------------------------------------------------- linear layers and upsampling

class ConvLinear(nn.Linear):
    """`nn.Linear` (same parameters, same state_dict) that runs as a channels-last 1x1 convolution on the CPU.

    oneDNN's convolution is ~1.7x faster forward + backward than the MKL `addmm` behind `F.linear` (measured on
    token tensors (128, 16, C)). Token tensors (B, T, Din) are viewed as a channels-last batch of (Din, T, 1)
    images, which keeps oneDNN on its fast path, and channels-last feature maps *are* token tensors in memory, so
    moving between conv blocks and attention layers costs no copy. Other devices and 2-D inputs use F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() < 3:
            return F.linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        x4 = x.reshape(x.shape[0], -1, 1, self.in_features).permute(0, 3, 1, 2)  # (B, Din, T, 1), channels-last
        y = F.conv2d(x4, self.weight[:, :, None, None], self.bias)  # (B, Dout, T, 1), channels-last
        return y.permute(0, 2, 3, 1).reshape(*lead, self.out_features)  # (B, T, Dout), no copy


# Nearest x2 then a 3x3 conv, seen from the output: row 2y + p reads upsampled rows 2y + p - 1 .. 2y + p + 1, which
# are input rows (y - 1, y, y) for p = 0 and (y, y, y + 1) for p = 1. As a stride-2 transposed conv with a 4x4
# kernel and padding 1, output row 2y + p takes input row q through tap k = 2 (y - q) + p + 1: k = 0 <- w2 (p = 1,
# q = y + 1), k = 1 <- w1 + w2 (p = 0, q = y), k = 2 <- w0 + w1 (p = 1, q = y), k = 3 <- w0 (p = 0, q = y - 1).
_FOLD = ((0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))  # (4 taps, 3 kernel rows)


def folded_upsample_weight(w: torch.Tensor) -> torch.Tensor:
    """(O, I, 3, 3) conv kernel -> the (I, O, 4, 4) stride-2 transposed-conv kernel equal to nearest x2 + that conv."""
    m = torch.tensor(_FOLD, dtype=w.dtype, device=w.device)
    return torch.einsum("ak,oikl,bl->ioab", m, w, m)


def nearest_upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv3x3(nearest_x2(x)) with padding 1, without materialising the upsampled map: the kernel is folded into a
    4x4 stride-2 transposed conv on the small map (16 instead of 36 multiply-adds per output pixel and channel
    pair; forward + backward ~1.8x faster at the Fashion-MNIST autoencoder's sizes)."""
    return F.conv_transpose2d(x, folded_upsample_weight(weight), bias, stride=2, padding=1)
