"""Vision Transformer (Dosovitskiy et al. 2021): patchify, position embeddings, pre-norm blocks, pooled vector.

Images (B, C, H, W) in [-1, 1] are cut into non-overlapping patches by a convolution whose stride equals its
kernel, each patch becomes a token, learned position embeddings are added, and pre-norm blocks (text.Block) mix
the tokens. The pooled vector is the class token's final state (`pool="cls"`) or the mean of the patch tokens
(`pool="mean"`), after the final LayerNorm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ldmkit.conditioning.text import Block, init_transformer_weights

POOLINGS = ("cls", "mean")


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 32  # square input side in pixels
    channels: int = 3  # input channels (1 for Fashion-MNIST, 3 for shapes)
    patch_size: int = 4  # patch side; must divide image_size
    width: int = 128  # model dimension D
    layers: int = 4  # transformer blocks
    heads: int = 4  # attention heads; must divide width
    mlp_ratio: float = 4.0  # MLP hidden width / width
    pool: str = "cls"  # pooled vector: "cls" (class token) or "mean" (mean of patch tokens)

    def __post_init__(self):
        if self.pool not in POOLINGS:
            raise ValueError(f"ViTConfig.pool={self.pool!r} is not one of {POOLINGS}")
        if self.image_size % self.patch_size:
            raise ValueError(f"ViTConfig.patch_size={self.patch_size} does not divide image_size={self.image_size}")
        if self.width % self.heads:
            raise ValueError(f"ViTConfig.width={self.width} is not divisible by heads={self.heads}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class ViT(nn.Module):
    """Images (B, C, H, W) -> (pooled (B, D), tokens (B, N, D)); N patch tokens, plus the class token if pool="cls"."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = nn.Conv2d(c.channels, c.width, kernel_size=c.patch_size, stride=c.patch_size)
        n_tokens = c.num_patches + (c.pool == "cls")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.width)) if c.pool == "cls" else None
        self.position_embedding = nn.Parameter(torch.zeros(1, n_tokens, c.width))
        self.blocks = nn.ModuleList(Block(c.width, c.heads, c.mlp_ratio) for _ in range(c.layers))
        self.norm = nn.LayerNorm(c.width)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_transformer_weights(self)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # patchify as a linear layer on flattened patches
        nn.init.trunc_normal_(self.position_embedding, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        if x.ndim != 4 or x.shape[1:] != (c.channels, c.image_size, c.image_size):
            raise ValueError(f"ViT expects images (B, {c.channels}, {c.image_size}, {c.image_size}), got "
                             f"{tuple(x.shape)}; set ViTConfig.channels/image_size to match the data")
        if not x.is_floating_point():
            raise ValueError(f"ViT expects float images in [-1, 1], got {x.dtype}; convert with dataset.to_float")
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, D)
        x = x + self.position_embedding  # (B, N', D)
        for block in self.blocks:
            x = block(x)  # (B, N', D)
        x = self.norm(x)  # (B, N', D)
        pooled = x[:, 0] if self.cls_token is not None else x.mean(1)  # (B, D)
        return pooled, x


PRESETS = {
    "tiny": ViTConfig(image_size=32, channels=1, patch_size=8, width=32, layers=2, heads=2),
    "small": ViTConfig(image_size=32, channels=3, patch_size=4, width=128, layers=4, heads=4),
}
