"""A small second decoder for an autoencoder's latent space: several times cheaper than the full decoder.

Sampling pays for the decoder once per image, and at the Fashion-MNIST sizes the full decoder (2.7M-parameter
autoencoder, GroupNorm + SiLU residual blocks with a middle attention) costs more than a whole guided sampling
step of the denoiser. The fast decoder maps the same latents (unscaled, as `AutoencoderKL.decode` takes them) to
images with plain residual blocks (3x3 conv, ReLU; no normalisation, no attention) that narrow as the resolution
doubles, and the folded nearest-x2 + conv upsampler of the full decoder. It is trained afterwards with the
encoder frozen (`ldmkit train fast-decoder`), on posterior samples of the training images with the image itself
as the target, so the latent space, the denoiser and every sampler stay as they are; the full decoder remains the
reference and the default. In the spirit of tiny preview decoders for Stable Diffusion latents, trained here on the
user's own images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.autoencoder.vae import Upsample


@dataclass(frozen=True)
class FastDecoderConfig:
    latent_channels: int = 4
    out_channels: int = 1
    channels: tuple[int, ...] = (64, 32, 32)  # width per resolution, lowest first; len - 1 = number of 2x upsamplings
    blocks: int = 2                           # residual blocks per resolution

    def __post_init__(self):
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError(f"FastDecoderConfig.channels={self.channels}: give one positive width per resolution")
        if self.blocks < 0:
            raise ValueError(f"FastDecoderConfig.blocks={self.blocks} must be >= 0")

    @property
    def upsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


class Block(nn.Module):
    """x + conv(relu(conv(relu(x)))), 3x3 convs, width kept."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FastDecoder(nn.Module):
    """Latent (B, c, h, w) -> image (B, C, h * f, w * f), f = 2 ** (len(channels) - 1)."""

    def __init__(self, cfg: FastDecoderConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.channels
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.levels = nn.ModuleList([nn.Sequential(*[Block(c) for _ in range(cfg.blocks)]) for c in ch])
        self.upsamplers = nn.ModuleList([Upsample(a, b) for a, b in zip(ch[:-1], ch[1:])])
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"the fast decoder expects (B, {self.cfg.latent_channels}, h, w) latents, "
                             f"got {tuple(z.shape)}")
        h = self.conv_in(z.to(self.conv_in.weight.dtype))
        for i, level in enumerate(self.levels):
            h = level(h)
            if i < len(self.upsamplers):
                h = self.upsamplers[i](F.relu(h))
        return self.conv_out(F.relu(h))

    decode = forward  # the name AutoencoderKL uses, so either decoder fits where a decoder is called


def config_for(autoencoder_cfg, **kw) -> FastDecoderConfig:
    """A fast-decoder config matching an AutoencoderConfig's latent channels, image channels and factor."""
    levels = autoencoder_cfg.downsample_factor.bit_length()  # one width per resolution: log2(factor) + 1
    base = FastDecoderConfig(latent_channels=autoencoder_cfg.latent_channels,
                             out_channels=autoencoder_cfg.out_channels, **kw)
    if base.upsample_factor != autoencoder_cfg.downsample_factor:
        raise ValueError(f"fast decoder channels={base.channels} upsample {base.upsample_factor}x but the "
                         f"autoencoder downsamples {autoencoder_cfg.downsample_factor}x; give {levels} widths (one "
                         "per resolution, lowest first)")
    return base
