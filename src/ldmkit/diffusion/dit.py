"""Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers") with text cross-attention.

Latents are cut into p x p patches (tokens), pass through adaLN-Zero blocks conditioned on the timestep embedding
plus the pooled text vector, attend to the per-token text states inside each block (as in PixArt-alpha: a plain
pre-norm cross-attention between self-attention and MLP), and a final adaLN layer maps tokens back to patches.
Token linears are `ConvLinear` (`ldmkit.kernels`); the conditioning contract and null embeddings are the
UNet's (`embed_condition`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.diffusion.unet import add_image_condition, embed_condition, init_condition_embeddings
from ldmkit.kernels import ConvLinear, attention
from ldmkit.nn import TimestepMLP, zero_module


def sincos_2d(h: int, w: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (h * w, dim): half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs width divisible by 4, got {dim}")
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for pos in (rows.reshape(-1), cols.reshape(-1)):
        args = pos[:, None] * freqs[None]  # (N, dim/4)
        parts += [torch.sin(args), torch.cos(args)]
    return torch.cat(parts, dim=1).float()  # (N, dim)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, N, D) * (1 + scale) + shift, scale/shift (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


@dataclass(frozen=True)
class DiTConfig:
    in_channels: int = 4  # latent channels in
    out_channels: int = 4  # channels out (eps / v / velocity prediction)
    input_size: int = 8  # latent height = width
    patch_size: int = 2  # p: tokens are p x p patches (1 or 2 for small latents)
    width: int = 192  # token width D
    depth: int = 4  # number of transformer blocks
    head_dim: int = 64  # width per attention head (heads = width // head_dim)
    mlp_ratio: float = 4.0  # MLP hidden width as a multiple of D
    context_dim: int = 128  # width of the text tokens (the text encoder's context_dim)
    pooled_dim: int = 128  # width of the pooled text vector; 0 = no pooled input
    image_dim: int = 0  # width of the image-embedding condition (CLIP's image tower); 0 = no image condition
    image_tokens: int = 0  # > 0: the image condition is this many tokens (cross-attended), not one vector
    freq_dim: int = 256  # sinusoidal timestep features fed to the timestep MLP
    pos_embed: Literal["sincos", "learned"] = "sincos"  # fixed 2-D sin-cos or learned position embeddings
    dropout: float = 0.0  # dropout on the MLP hidden layer

    def __post_init__(self):
        if self.input_size % self.patch_size:
            raise ValueError(f"DiTConfig.input_size={self.input_size} is not divisible by "
                             f"patch_size={self.patch_size}")
        if self.width % self.head_dim:
            raise ValueError(f"DiTConfig.width={self.width} is not a multiple of head_dim={self.head_dim}")
        if self.pos_embed == "sincos" and self.width % 4:
            raise ValueError(f"DiTConfig.width={self.width} must be divisible by 4 for sin-cos position embeddings")
        if self.context_dim < 1:
            raise ValueError(f"DiTConfig.context_dim={self.context_dim} must be >= 1 (the text encoder's width)")


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention, plain pre-norm cross-attention to the text tokens, adaLN-Zero MLP."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.width
        self.heads = D // cfg.head_dim
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.qkv = ConvLinear(D, 3 * D)
        self.proj = ConvLinear(D, D)
        self.norm2 = nn.LayerNorm(D, eps=1e-6)
        self.q = ConvLinear(D, D)
        self.kv = ConvLinear(cfg.context_dim, 2 * D)
        self.out = ConvLinear(D, D)  # zero-initialised: the cross-attention branch starts closed
        self.norm3 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        hidden = int(D * cfg.mlp_ratio)
        self.fc1 = ConvLinear(D, hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.fc2 = ConvLinear(hidden, D)
        self.ada = nn.Linear(D, 6 * D)  # zero-initialised: gates start at 0 (adaLN-Zero)

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=1)  # 6 x (B, D); c is SiLU'd
        q, k, v = self.qkv(modulate(self.norm1(x), shift1, scale1)).chunk(3, dim=-1)  # 3 x (B, N, D)
        x = x + gate1[:, None] * self.proj(attention(q, k, v, self.heads))
        k, v = self.kv(context).chunk(2, dim=-1)  # 2 x (B, T, D)
        x = x + self.out(attention(self.q(self.norm2(x)), k, v, self.heads, mask))
        h = self.fc2(self.drop(F.silu(self.fc1(modulate(self.norm3(x), shift2, scale2)))))
        return x + gate2[:, None] * h


class DiT(nn.Module):
    """Latent denoiser: `forward(x, t, context=None, context_mask=None, pooled=None, drop=None)` -> like x.

    x (B, C, S, S) with S = cfg.input_size; the other arguments as in `UNet.forward`.
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        D, p = cfg.width, cfg.patch_size
        self.grid = cfg.input_size // p
        self.null_context = nn.Parameter(torch.zeros(cfg.context_dim))
        self.null_pooled = nn.Parameter(torch.zeros(cfg.pooled_dim)) if cfg.pooled_dim > 0 else None
        self.time_embed = TimestepMLP(cfg.freq_dim, D)
        self.pooled_proj = nn.Linear(cfg.pooled_dim, D) if cfg.pooled_dim > 0 else None
        add_image_condition(self, cfg.image_dim, D, cfg.image_tokens, cfg.context_dim)
        self.patch = nn.Conv2d(cfg.in_channels, D, p, stride=p)
        if cfg.pos_embed == "learned":
            self.pos = nn.Parameter(torch.zeros(1, self.grid ** 2, D))
        else:
            self.register_buffer("pos", sincos_2d(self.grid, self.grid, D)[None], persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        self.final_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Linear(D, 2 * D)
        self.final = ConvLinear(D, p * p * cfg.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """All special initialisation (as in DiT): Xavier-uniform linears and patch embedding, N(0, 0.02^2)
        timestep MLP, null embeddings and learned positions; adaLN modulations, the cross-attention output and the
        final layer zero, so every block starts as the identity and the initial output is zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch.weight.view(self.patch.weight.shape[0], -1))
        nn.init.zeros_(self.patch.bias)
        init_condition_embeddings(self)
        if isinstance(self.pos, nn.Parameter):
            nn.init.normal_(self.pos, std=0.02)
        for m in [self.final_ada, self.final] + [m for b in self.blocks for m in (b.ada, b.out)]:
            zero_module(m)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, pooled: torch.Tensor | None = None,
                drop: torch.Tensor | None = None, image: torch.Tensor | None = None,
                drop_image: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        S, p = self.cfg.input_size, self.cfg.patch_size
        if (C, H, W) != (self.cfg.in_channels, S, S):
            raise ValueError(f"DiT expects (B, {self.cfg.in_channels}, {S}, {S}) (DiTConfig.input_size), "
                             f"got {tuple(x.shape)}")
        context, mask, c = embed_condition(self, t, B, context, context_mask, pooled, drop, image,
                                           drop_image)  # c (B, D)

        h = self.patch(x.contiguous(memory_format=torch.channels_last))  # (B, D, g, g), channels-last
        h = h.permute(0, 2, 3, 1).reshape(B, self.grid ** 2, -1) + self.pos  # (B, N, D)
        for block in self.blocks:
            h = block(h, c, context, mask)
        shift, scale = self.final_ada(c).chunk(2, dim=1)  # 2 x (B, D)
        h = self.final(modulate(self.final_norm(h), shift, scale))  # (B, N, p * p * C_out)
        g, Co = self.grid, self.cfg.out_channels
        h = h.view(B, g, g, p, p, Co).permute(0, 5, 1, 3, 2, 4)  # (B, C_out, g, p, g, p)
        return h.reshape(B, Co, S, S)


PRESETS = {
    "tiny": DiTConfig(width=32, depth=2, head_dim=16, mlp_ratio=2.0, context_dim=32, pooled_dim=32, freq_dim=32),
    "fashion-mnist": DiTConfig(),
}
