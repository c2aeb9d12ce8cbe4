"""A lean latent UNet: residual conv blocks, attention layers at low resolution, text cross-attention.

Built for small latents (8x8x4) on a CPU. Choices that make it fast there, measured on a 2-core Zen 5:
- feature maps stay channels-last from stem to output, and so do the conv kernels, so every conv runs on
  oneDNN's fast path without a layout conversion;
- every token-wise linear layer (attention projections, MLPs, context keys/values) is a `ConvLinear`
  (`ldmkit.kernels`): `nn.Linear`'s parameters, computed as a 1x1 convolution over channels-last memory, and
  channels-last feature maps *are* token tensors (B, H*W, C), so moving between conv blocks and attention layers
  costs no copy;
- attention layers are one flat pre-norm layer (self-attention with fused qkv, cross-attention, plain SiLU MLP)
  instead of a transformer block with proj_in / proj_out, GEGLU and reshapes (SiLU forward + backward costs a
  third of tanh-GELU's on CPU);
- few, small levels (8x8 -> 4x4 -> 2x2) with most parameters at the two lowest resolutions, where a parameter
  costs 4x / 16x fewer FLOPs than at 8x8; upsampling by a transposed 2x2 conv at the low resolution.

Conditioning follows the backbone contract: `forward(x, t, context, context_mask, pooled, drop)`; dropped examples
see the learned null embeddings (`null_context` at every token position, `null_pooled`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.kernels import ConvLinear, attention, fp32_under_autocast, group_norm
from ldmkit.nn import TimestepMLP, zero_module

# ----------------------------------------------------------------------------------------------------------------
# The conditioning prologue shared with dit.py


def embed_condition(model: nn.Module, t: torch.Tensor, batch: int, context, context_mask, pooled, drop,
                    image=None, drop_image=None):
    """The prologue both backbones share: validate `t` and the text condition (`prepare_condition`), then the
    conditioning vector silu(time_embed(t) + pooled_proj(pooled) + image_proj(image)). An image given as tokens
    (`image_tokens` > 0) enters the vector as the mean of its tokens and the cross-attention as extra context tokens
    (`image_context` of each). Returns (context, mask, vector)."""
    if t.shape != (batch,):
        raise ValueError(f"t must have shape ({batch},), got {tuple(t.shape)}")
    context, mask, pooled = prepare_condition(model.null_context, model.null_pooled, batch, context, context_mask,
                                              pooled, drop)
    emb = model.time_embed(t)
    if model.pooled_proj is not None:
        emb = emb + model.pooled_proj(pooled)
    if model.image_proj is not None:
        img = prepare_image(model.null_image, batch, image, drop_image, model.image_tokens)
        if model.image_tokens:
            emb = emb + model.image_proj(img.mean(1))
            extra = model.image_context(img).to(context.dtype)  # (B, N, Dc)
            context = torch.cat([context, extra], dim=1)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(batch, extra.shape[1])], dim=1)
        else:
            emb = emb + model.image_proj(img)
    elif image is not None:
        raise ValueError("this denoiser has no image condition (image_dim=0); train one with image_condition=true "
                         "to prompt it with images")
    return context, mask, F.silu(emb)


def add_image_condition(model: nn.Module, image_dim: int, emb_dim: int, image_tokens: int = 0,
                        context_dim: int = 0) -> None:
    """The image condition's parameters: a learned null embedding and a projection into the conditioning vector
    (zero at initialisation, `init_condition_embeddings`: the image input starts as a no-op). With image_tokens N > 0
    the image is N tokens of width image_dim (the image tower's last layer) and `image_context` maps each to a
    context token (also zero at initialisation). image_dim 0: none."""
    model.image_tokens = image_tokens if image_dim > 0 else 0
    model.null_image = nn.Parameter(torch.zeros(image_dim)) if image_dim > 0 else None
    model.image_proj = nn.Linear(image_dim, emb_dim) if image_dim > 0 else None
    model.image_context = nn.Linear(image_dim, context_dim) if model.image_tokens else None


def prepare_image(null_image: torch.Tensor, batch: int, image: torch.Tensor | None,
                  drop_image: torch.Tensor | None, tokens: int = 0) -> torch.Tensor:
    """The image condition each example sees, (B, Di) or with `tokens` N > 0 (B, N, Di): `null_image` (at every
    token) where `drop_image` is True or image is None."""
    shape = (batch, tokens, null_image.shape[0]) if tokens else (batch, null_image.shape[0])
    if image is None:
        return null_image.expand(shape)
    if image.shape != shape:
        want = f"(B={batch}, N={tokens}, image_dim={null_image.shape[0]})" if tokens else \
            f"(B={batch}, image_dim={null_image.shape[0]})"
        raise ValueError(f"image must be {want}, got {tuple(image.shape)}")
    if drop_image is None:
        return image
    if drop_image.dtype != torch.bool or drop_image.shape != (batch,):
        raise ValueError(f"drop_image must be a bool tensor of shape ({batch},), got {drop_image.dtype} "
                         f"{tuple(drop_image.shape)}")
    return torch.where(drop_image.view(-1, *[1] * (image.ndim - 1)), null_image.to(image.dtype), image)


def init_condition_embeddings(model: nn.Module) -> None:
    """N(0, 0.02^2) for the timestep MLP's weights and the null embeddings (both backbones, in this order); the
    image projection starts at zero."""
    for m in model.time_embed.mlp:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
    nn.init.normal_(model.null_context, std=0.02)
    if model.null_pooled is not None:
        nn.init.normal_(model.null_pooled, std=0.02)
    if model.null_image is not None:
        nn.init.normal_(model.null_image, std=0.02)
        zero_module(model.image_proj)
    if model.image_context is not None:
        zero_module(model.image_context)


def prepare_condition(null_context: torch.Tensor, null_pooled: torch.Tensor | None, batch: int,
                      context: torch.Tensor | None, context_mask: torch.Tensor | None,
                      pooled: torch.Tensor | None, drop: torch.Tensor | None):
    """Validate the conditioning and swap in the null embeddings where `drop` is True (or everywhere if no context).

    Returns (context (B, T, Dc), mask (B, T) bool or None when every token is real, pooled (B, Dp) or None).
    A dropped example sees `null_context` at every position with every position attended, `null_pooled` as pooled.
    """
    Dc = null_context.shape[0]
    if context is None:
        if pooled is not None or context_mask is not None:
            raise ValueError("context=None means unconditional; pass pooled/context_mask only together with context")
        ctx = null_context.expand(batch, 1, Dc)  # one null token == T null tokens under softmax
        return ctx, None, None if null_pooled is None else null_pooled.expand(batch, -1)
    if context.dim() != 3 or context.shape[0] != batch or context.shape[2] != Dc:
        raise ValueError(f"context must be (B={batch}, T, context_dim={Dc}), got {tuple(context.shape)}; "
                         "set the backbone's context_dim to the text encoder's context_dim")
    if context_mask is not None and (context_mask.dtype != torch.bool or context_mask.shape != context.shape[:2]):
        raise ValueError(f"context_mask must be a bool tensor of shape {tuple(context.shape[:2])} (True = real token), "
                         f"got {context_mask.dtype} {tuple(context_mask.shape)}")
    if null_pooled is not None and (pooled is None or pooled.shape != (batch, null_pooled.shape[0])):
        got = None if pooled is None else tuple(pooled.shape)
        raise ValueError(f"pooled must be (B={batch}, pooled_dim={null_pooled.shape[0]}) with context, got {got}")
    if null_pooled is None and pooled is not None:
        raise ValueError("this backbone has pooled_dim=0; do not pass pooled (or build it with pooled_dim > 0)")
    if drop is not None:
        if drop.dtype != torch.bool or drop.shape != (batch,):
            raise ValueError(f"drop must be a bool tensor of shape ({batch},), got {drop.dtype} {tuple(drop.shape)}")
        context = torch.where(drop[:, None, None], null_context.to(context.dtype), context)
        if context_mask is not None:
            context_mask = context_mask | drop[:, None]
        if pooled is not None:
            pooled = torch.where(drop[:, None], null_pooled.to(pooled.dtype), pooled)
    if context_mask is not None:
        if not bool(context_mask.any(1).all()):
            raise ValueError("context_mask has an example with no real token (all False); mark at least one True")
        if bool(context_mask.all()):
            context_mask = None
    return context, context_mask, pooled


# ----------------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4  # latent channels in
    out_channels: int = 4  # channels out (eps / v / velocity prediction)
    channels: int = 64  # width of the first (full-resolution) level
    channel_mults: tuple[int, ...] = (1, 2, 2)  # width multiplier per level; each further level halves H and W
    blocks_per_level: tuple[int, ...] = (1, 1, 1)  # residual blocks per level, down path and (mirrored) up path
    attention_levels: tuple[bool, ...] = (False, True, True)  # levels whose blocks carry an attention layer
    mid_attention: bool = False  # attention layer between the two middle residual blocks
    head_dim: int = 64  # width per attention head (heads = width // head_dim)
    mlp_ratio: float = 2.0  # hidden width of the attention layer's MLP, as a multiple of its width
    context_dim: int = 128  # width of the text tokens (the text encoder's context_dim)
    pooled_dim: int = 128  # width of the pooled text vector; 0 = no pooled input
    emb_dim: int = 256  # width of the timestep (+ pooled) embedding
    image_dim: int = 0  # width of the image-embedding condition (CLIP's image tower); 0 = no image condition
    image_tokens: int = 0  # > 0: the image condition is this many tokens (cross-attended), not one vector
    freq_dim: int = 128  # sinusoidal features fed to the timestep MLP
    dropout: float = 0.0  # dropout inside residual blocks
    norm_groups: int = 32  # GroupNorm groups (largest divisor of the width <= this)
    scale_shift: bool = True  # FiLM the second norm with the embedding (True) or add it (False)

    def __post_init__(self):
        n = len(self.channel_mults)
        for name in ("blocks_per_level", "attention_levels"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"UNetConfig.{name} has {len(getattr(self, name))} entries but channel_mults has "
                                 f"{n}; give one per level")
        if any(b < 1 for b in self.blocks_per_level):
            raise ValueError(f"UNetConfig.blocks_per_level={self.blocks_per_level}: every level needs >= 1 block")
        attended = [w for w, a in zip(self.widths, self.attention_levels) if a] + [self.widths[-1]] * self.mid_attention
        for w in attended:
            if w % self.head_dim:
                raise ValueError(f"UNetConfig: level width {w} is not a multiple of head_dim={self.head_dim}")
        if self.context_dim < 1:
            raise ValueError(f"UNetConfig.context_dim={self.context_dim} must be >= 1 (the text encoder's width)")

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.channels * m for m in self.channel_mults)


# ----------------------------------------------------------------------------------------------------------------
# Blocks


class ResBlock(nn.Module):
    """GN -> SiLU -> conv3x3 -> GN (+ embedding scale/shift or add) -> SiLU -> dropout -> conv3x3, plus a skip."""

    def __init__(self, cin: int, cout: int, cfg: UNetConfig):
        super().__init__()
        self.scale_shift = cfg.scale_shift
        self.norm1 = group_norm(cin, cfg.norm_groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(cfg.emb_dim, 2 * cout if cfg.scale_shift else cout)
        self.norm2 = group_norm(cout, cfg.norm_groups)
        self.drop = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)  # zero-initialised (initialize_weights)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(fp32_under_autocast(x))))  # (B, C, H, W)
        e = self.emb(emb)[:, :, None, None]  # (B, 2C or C, 1, 1); emb is already SiLU'd
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(fp32_under_autocast(h)) * (1 + scale) + shift  # FiLM (Dhariwal & Nichol 2021, "AdaGN")
        else:
            h = self.norm2(fp32_under_autocast(h) + e)
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class AttentionLayer(nn.Module):
    """Pre-norm self-attention, cross-attention to the text tokens and a SiLU MLP, each residual, on tokens."""

    def __init__(self, width: int, cfg: UNetConfig):
        super().__init__()
        self.heads = width // cfg.head_dim
        hidden = int(width * cfg.mlp_ratio)
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.qkv = ConvLinear(width, 3 * width)
        self.proj = ConvLinear(width, width)  # zero-initialised
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.q = ConvLinear(width, width)
        self.kv = ConvLinear(cfg.context_dim, 2 * width)
        self.out = ConvLinear(width, width)  # zero-initialised
        self.norm3 = nn.LayerNorm(width, eps=1e-6)
        self.fc1 = ConvLinear(width, hidden)
        self.fc2 = ConvLinear(hidden, width)  # zero-initialised

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, C, H, W = x.shape
        h = x.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, N, C); a view when x is channels-last
        q, k, v = self.qkv(self.norm1(h)).chunk(3, dim=-1)  # 3 x (B, N, C)
        h = h + self.proj(attention(q, k, v, self.heads))
        k, v = self.kv(context).chunk(2, dim=-1)  # 2 x (B, T, C)
        h = h + self.out(attention(self.q(self.norm2(h)), k, v, self.heads, mask))
        h = h + self.fc2(F.silu(self.fc1(self.norm3(h))))
        return h.view(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last


class UNetBlock(nn.Module):
    """A residual block, optionally followed by an attention layer."""

    def __init__(self, cin: int, cout: int, attend: bool, cfg: UNetConfig):
        super().__init__()
        self.res = ResBlock(cin, cout, cfg)
        self.attn = AttentionLayer(cout, cfg) if attend else None

    def forward(self, x, emb, context, mask):
        x = self.res(x, emb)
        return x if self.attn is None else self.attn(x, context, mask)


class Upsample(nn.Module):
    """2x upsampling by a stride-2 transposed 2x2 conv: each input pixel writes its own 2x2 output patch, so the
    cost is that of a 1x1 conv at the low resolution (a nearest + 3x3 conv upsampler costs 9x4 = 36x more per
    output channel)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.ConvTranspose2d(cin, cout, 2, stride=2)

    def forward(self, x):
        return self.conv(x)


# ----------------------------------------------------------------------------------------------------------------
# Model


class UNet(nn.Module):
    """Latent denoiser: `forward(x, t, context=None, context_mask=None, pooled=None, drop=None)` -> like x.

    x (B, C, H, W) with H, W divisible by 2^(levels - 1); t (B,) float model time; context (B, T, Dc) text tokens
    with context_mask (B, T) bool (True = real token); pooled (B, Dp); drop (B,) bool selects examples that see
    the learned null embeddings instead. context=None means every example is dropped.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        widths = cfg.widths
        self.null_context = nn.Parameter(torch.zeros(cfg.context_dim))
        self.null_pooled = nn.Parameter(torch.zeros(cfg.pooled_dim)) if cfg.pooled_dim > 0 else None
        self.time_embed = TimestepMLP(cfg.freq_dim, cfg.emb_dim)
        self.pooled_proj = nn.Linear(cfg.pooled_dim, cfg.emb_dim) if cfg.pooled_dim > 0 else None
        add_image_condition(self, cfg.image_dim, cfg.emb_dim, cfg.image_tokens, cfg.context_dim)
        self.stem = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)

        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        for i, w in enumerate(widths):
            self.down.append(nn.ModuleList([UNetBlock(w, w, cfg.attention_levels[i], cfg)
                                            for _ in range(cfg.blocks_per_level[i])]))
            if i + 1 < len(widths):
                self.downsample.append(nn.Conv2d(w, widths[i + 1], 3, stride=2, padding=1))
        wm = widths[-1]
        self.mid = nn.ModuleList([UNetBlock(wm, wm, cfg.mid_attention, cfg), UNetBlock(wm, wm, False, cfg)])

        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(widths))):
            w = widths[i]  # each block eats one skip of width w (concatenated)
            self.up.append(nn.ModuleList([UNetBlock(2 * w, w, cfg.attention_levels[i], cfg)
                                          for _ in range(cfg.blocks_per_level[i])]))
            if i > 0:
                self.upsample.append(Upsample(w, widths[i - 1]))
        self.out_norm = group_norm(widths[0], cfg.norm_groups)
        self.out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)
        self.initialize_weights()
        # Conv kernels stored channels-last like the feature maps: otherwise oneDNN converts every kernel on every
        # forward and backward call (~2% of a training step, fashion-mnist preset, batch 128, fp32). Same values,
        # same state_dict (safetensors files are written contiguous).
        self.to(memory_format=torch.channels_last)

    def initialize_weights(self):
        """All special initialisation: residual-branch outputs and the final conv start at zero (identity blocks,
        zero output), token linears Xavier-uniform, timestep MLP and null embeddings N(0, 0.02^2)."""
        for m in self.modules():
            if isinstance(m, ConvLinear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        init_condition_embeddings(self)
        for m in self.modules():
            if isinstance(m, ResBlock):
                zero_module(m.conv2)
            elif isinstance(m, AttentionLayer):
                for out in (m.proj, m.out, m.fc2):
                    zero_module(out)
        zero_module(self.out)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, pooled: torch.Tensor | None = None,
                drop: torch.Tensor | None = None, image: torch.Tensor | None = None,
                drop_image: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        k = 2 ** (len(self.cfg.channel_mults) - 1)
        if C != self.cfg.in_channels or H % k or W % k:
            raise ValueError(f"UNet expects (B, {self.cfg.in_channels}, H, W) with H, W divisible by {k}, "
                             f"got {tuple(x.shape)}")
        context, mask, emb = embed_condition(self, t, B, context, context_mask, pooled, drop, image,
                                             drop_image)  # emb (B, E)

        h = self.stem(x.contiguous(memory_format=torch.channels_last))  # (B, C0, H, W), channels-last
        skips = []
        for i, level in enumerate(self.down):
            for block in level:
                h = block(h, emb, context, mask)
                skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        for block in self.mid:
            h = block(h, emb, context, mask)
        for i, level in enumerate(self.up):
            for block in level:
                h = block(torch.cat([h, skips.pop()], dim=1), emb, context, mask)
            if i < len(self.upsample):
                h = self.upsample[i](h)
        h = self.out(F.silu(self.out_norm(fp32_under_autocast(h))))  # (B, out, H, W)
        return h.contiguous()


PRESETS = {
    # < 100k params: attention at both levels and in the middle, for tests
    "tiny": UNetConfig(channels=16, channel_mults=(1, 1), blocks_per_level=(1, 1), attention_levels=(True, True),
                       mid_attention=True, head_dim=8, context_dim=32, pooled_dim=32, emb_dim=32, freq_dim=32,
                       norm_groups=8),
    # ~4.0M params on 4x8x8 latents: 32 ch at 8x8, 128 at 4x4 and 2x2 (parameters where maps are small are cheap)
    "fashion-mnist": UNetConfig(channels=32, channel_mults=(1, 4, 4), mid_attention=True),
    # captioned shapes' 16x16 latents: 64 ch at 16x16, 128 at 8x8 and 4x4, attention at 8x8 and 4x4
    "shapes": UNetConfig(),
}
