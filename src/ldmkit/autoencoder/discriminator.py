"""PatchGAN discriminator (Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial Networks";
the `NLayerDiscriminator` used by taming-transformers and latent diffusion).

A stack of 4x4 convs: the first `n_layers` halve the resolution, one more keeps it, and a last conv gives one logit
per overlapping patch, (B, 1, h, w). For a 32x32 input with n_layers=2 that is a 6x6 map of ~22-pixel patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class DiscriminatorConfig:
    in_channels: int = 3  # image channels
    base_channels: int = 64  # width of the first conv; doubles per layer up to 8x
    n_layers: int = 3  # stride-2 convs; 3 for 256px images, 2 suits 32px
    norm: str = "batch"  # "batch" (as in LDM) or "group" (independent of batch composition)

    def __post_init__(self):
        if self.norm not in ("batch", "group"):
            raise ValueError(f"DiscriminatorConfig.norm={self.norm!r}; use 'batch' or 'group'")
        if self.n_layers < 1:
            raise ValueError(f"DiscriminatorConfig.n_layers={self.n_layers} must be >= 1")


def _norm(cfg: DiscriminatorConfig, ch: int) -> nn.Module:
    return nn.BatchNorm2d(ch) if cfg.norm == "batch" else nn.GroupNorm(min(32, ch // 4) or 1, ch)


class NLayerDiscriminator(nn.Module):
    """(B, C, H, W) images in [-1, 1] -> (B, 1, h, w) patch logits."""

    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.base_channels
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, ch, 4, 2, 1), nn.LeakyReLU(0.2)]
        prev = ch
        for n in range(1, cfg.n_layers + 1):
            width = ch * min(2 ** n, 8)
            stride = 2 if n < cfg.n_layers else 1  # the last hidden conv keeps the resolution
            layers += [nn.Conv2d(prev, width, 4, stride, 1, bias=False), _norm(cfg, width), nn.LeakyReLU(0.2)]
            prev = width
        layers.append(nn.Conv2d(prev, 1, 4, 1, 1))  # one logit per patch
        self.main = nn.Sequential(*layers)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """All special init of the discriminator: convs N(0, 0.02), norm scales N(1, 0.02), biases 0 (DCGAN)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"discriminator expects {self.cfg.in_channels}-channel images, got {tuple(x.shape)}")
        return self.main(x)


PRESETS = {
    "tiny": DiscriminatorConfig(in_channels=1, base_channels=16, n_layers=2, norm="group"),
    "fashion-mnist": DiscriminatorConfig(in_channels=1, base_channels=32, n_layers=2, norm="group"),
    "shapes": DiscriminatorConfig(in_channels=3, base_channels=32, n_layers=2, norm="group"),
    "sd": DiscriminatorConfig(in_channels=3, base_channels=64, n_layers=3, norm="batch"),
}
