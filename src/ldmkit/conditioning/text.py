"""Text transformer: token + position embeddings, pre-norm attention blocks with a padding mask, final LayerNorm.

Returns per-token states (B, T, D), used as cross-attention context, and a pooled vector (B, D). Pooling is the
state of the [EOS] token by default (`pool="eos"`, the last real token under right padding, as in CLIP, Radford et
al. 2021); attention is bidirectional, so that token has seen the whole prompt. `pool="mean"` averages the real
tokens instead. Padding never changes the real tokens' states: padded keys are masked out of every attention.
The pre-norm `Block` and the weight initialisation here are shared with the ViT (vit.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ldmkit.nn import Attention

POOLINGS = ("eos", "mean")


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 1024  # embedding rows; must be >= the tokenizer's vocabulary size
    max_length: int = 32  # positions; must be >= the tokenizer's max_length (counts [BOS] and [EOS])
    width: int = 128  # model dimension D
    layers: int = 4  # transformer blocks
    heads: int = 4  # attention heads; must divide width
    mlp_ratio: float = 4.0  # MLP hidden width / width
    pool: str = "eos"  # pooled vector: "eos" (state of the last real token) or "mean" (masked mean)

    def __post_init__(self):
        if self.pool not in POOLINGS:
            raise ValueError(f"TextConfig.pool={self.pool!r} is not one of {POOLINGS}")
        if self.width % self.heads:
            raise ValueError(f"TextConfig.width={self.width} is not divisible by heads={self.heads}")


def init_transformer_weights(module: nn.Module) -> None:
    """The one place for special init: truncated-normal(0.02) linears/embeddings, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=0.02)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask=mask)  # (B, T, D), padded keys excluded
        return x + self.mlp(self.norm2(x))  # (B, T, D)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens: (B, T, D), (B, T) bool -> (B, D)."""
    w = mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


class TextTransformer(nn.Module):
    """Token ids (B, T) + mask (B, T) -> (states (B, T, D), pooled (B, D))."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Parameter(torch.zeros(config.max_length, config.width))
        self.blocks = nn.ModuleList(Block(config.width, config.heads, config.mlp_ratio) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.width)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_transformer_weights(self)
        nn.init.trunc_normal_(self.position_embedding, std=0.01)

    def _check(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        cfg = self.config
        if ids.ndim != 2 or ids.dtype != torch.int64:
            raise ValueError(f"text ids must be int64 (B, T), got {ids.dtype} {tuple(ids.shape)}")
        if ids.shape[1] > cfg.max_length:
            raise ValueError(f"text length {ids.shape[1]} exceeds TextConfig.max_length={cfg.max_length}; "
                             "lower the tokenizer's max_length or raise the config's")
        if mask.shape != ids.shape or mask.dtype != torch.bool:
            raise ValueError(f"text mask must be bool {tuple(ids.shape)}, got {mask.dtype} {tuple(mask.shape)}")
        if not bool(mask[:, 0].all()):
            raise ValueError("every text row needs a real first token ([BOS]); an all-padding row cannot be encoded")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size):
            raise ValueError(f"token id outside [0, {cfg.vocab_size}); the tokenizer's vocabulary is larger than "
                             f"TextConfig.vocab_size={cfg.vocab_size}")

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        self._check(ids, mask)
        T = ids.shape[1]
        x = self.token_embedding(ids) + self.position_embedding[:T]  # (B, T, D)
        for block in self.blocks:
            x = block(x, mask=mask)  # (B, T, D)
        x = self.norm(x)  # (B, T, D)
        if self.config.pool == "eos":
            last = mask.long().sum(1) - 1  # (B,) index of [EOS] under right padding
            pooled = x[torch.arange(x.shape[0], device=x.device), last]  # (B, D)
        else:
            pooled = masked_mean(x, mask)  # (B, D)
        return x, pooled


PRESETS = {
    "tiny": TextConfig(vocab_size=512, max_length=16, width=32, layers=2, heads=2),
    "small": TextConfig(vocab_size=1024, max_length=32, width=128, layers=4, heads=4),
}
