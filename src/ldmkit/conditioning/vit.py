"""Vision Transformer (Dosovitskiy et al. 2021): patchify, position embeddings, pre-norm blocks, pooled vector.

Images (B, C, H, W) in [-1, 1] are cut into non-overlapping patches by a convolution whose stride equals its
kernel, each patch becomes a token, learned position embeddings are added (started from small random values or
from a 2-D sine-cosine table, `pos_init`), and pre-norm blocks (text.Block) mix
the tokens. The pooled vector is the class token's final state (`pool="cls"`) or the mean of the patch tokens
(`pool="mean"`), after the final LayerNorm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ldmkit.conditioning.text import Block, init_transformer_weights

POOLINGS = ("cls", "mean")
POS_INITS = ("normal", "sincos")
STEMS = ("patch", "conv")


def conv_stem(channels: int, width: int, patch_size: int) -> nn.Sequential:
    """log2(patch_size) stride-2 3x3 convolutions, GELU between them, channels doubling up to `width`.

    The convolutional stem of Xiao et al. 2021 ("Early convolutions help transformers see better"): each token
    sees its patch through small translation-equivariant filters, so a small object reads the same wherever it
    falls relative to the patch grid (a single patch_size-stride convolution is linear in the patch's pixels).
    """
    k = patch_size.bit_length() - 1
    chans = [channels] + [max(width >> (k - 1 - i), 1) for i in range(k)]  # ..., width / 2, width
    layers: list[nn.Module] = []
    for i in range(k):
        layers.append(nn.Conv2d(chans[i], chans[i + 1], kernel_size=3, stride=2, padding=1))
        if i < k - 1:
            layers.append(nn.GELU(approximate="tanh"))
    return nn.Sequential(*layers)


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position table (grid * grid, width), row-major patches (as in MAE, He et al. 2022).

    A quarter of the channels each hold sin and cos of the row and of the column at frequencies 10000^(-k / (D/4)),
    so every patch has a distinct code of unit scale.
    """
    d = width // 4
    omega = 1.0 / 10000 ** (torch.arange(d, dtype=torch.float64) / d)  # (d,)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    r, c = rows.flatten()[:, None] * omega, cols.flatten()[:, None] * omega  # (grid^2, d)
    return torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1).float()  # (grid^2, width)


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
    pos_init: str = "normal"  # learned position embeddings start as "normal" (std 0.02) or "sincos" (2-D table)
    stem: str = "patch"  # tokens from one patch_size-stride convolution ("patch") or stride-2 3x3 convs ("conv")

    def __post_init__(self):
        if self.pool not in POOLINGS:
            raise ValueError(f"ViTConfig.pool={self.pool!r} is not one of {POOLINGS}")
        if self.pos_init not in POS_INITS:
            raise ValueError(f"ViTConfig.pos_init={self.pos_init!r} is not one of {POS_INITS}")
        if self.stem not in STEMS:
            raise ValueError(f"ViTConfig.stem={self.stem!r} is not one of {STEMS}")
        if self.stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ValueError(f"ViTConfig.stem='conv' halves the resolution per layer, so patch_size must be a power "
                             f"of 2 >= 2, got {self.patch_size}")
        if self.pos_init == "sincos" and self.width % 4:
            raise ValueError(f"ViTConfig.pos_init='sincos' needs a width divisible by 4, got {self.width}")
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
        if c.stem == "conv":
            self.patch_embed = conv_stem(c.channels, c.width, c.patch_size)
        else:
            self.patch_embed = nn.Conv2d(c.channels, c.width, kernel_size=c.patch_size, stride=c.patch_size)
        n_tokens = c.num_patches + (c.pool == "cls")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.width)) if c.pool == "cls" else None
        self.position_embedding = nn.Parameter(torch.zeros(1, n_tokens, c.width))
        self.blocks = nn.ModuleList(Block(c.width, c.heads, c.mlp_ratio) for _ in range(c.layers))
        self.norm = nn.LayerNorm(c.width)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_transformer_weights(self)
        if isinstance(self.patch_embed, nn.Conv2d):
            w = self.patch_embed.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # patchify as a linear layer on flattened patches
        else:
            for conv in self.patch_embed:
                if isinstance(conv, nn.Conv2d):  # He-style init through the GELUs (fan-in)
                    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                    nn.init.zeros_(conv.bias)
        nn.init.trunc_normal_(self.position_embedding, std=0.02)
        if self.config.pos_init == "sincos":
            # The 0.02-std start is ~50x smaller than the patch embeddings, so position barely reaches the pooled
            # vector and is learned very late (the shapes CLIP ignored object position and shape with it); the
            # 2-D table gives every patch a distinct unit-scale code from the first step. It stays learnable.
            with torch.no_grad():
                n = self.config.num_patches
                self.position_embedding[0, -n:] = sincos_2d(self.config.image_size // self.config.patch_size,
                                                            self.config.width)
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
