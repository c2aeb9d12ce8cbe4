"""KL-regularised convolutional autoencoder (the "VAE" of latent diffusion).

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models": an encoder maps an image
(B, C, H, W) to the moments of a diagonal Gaussian over latents (B, c, H/f, W/f); the decoder maps a latent back
to an image. The downsampling factor f = 2 ** (len(block_out_channels) - 1).

The layout and parameter names follow diffusers' `AutoencoderKL` (encoder.down_blocks.i.resnets.j.conv1, ...,
mid_block.attentions.0.to_q, quant_conv, post_quant_conv), so Stable Diffusion VAE weights load with
`AutoencoderKL.from_diffusers(directory)`. Initialisation is PyTorch's default for every layer, as in the
reference; there is no special init.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.autoencoder.posterior import DiagonalGaussian, PointPosterior
from ldmkit.autoencoder.tiling import tiled_decode, tiled_encode_moments
from ldmkit.kernels import attention, group_norm, nearest_upsample_conv


@dataclass(frozen=True)
class AutoencoderConfig:
    in_channels: int = 3  # image channels read by the encoder
    out_channels: int = 3  # image channels written by the decoder
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # width per level; factor 2 ** (levels - 1)
    layers_per_block: int = 2  # resnets per encoder level; the decoder uses one more per level
    latent_channels: int = 4  # channels of the latent z
    norm_groups: int = 32  # GroupNorm groups; must divide every width
    mid_attention: bool = True  # single-head self-attention between the two mid-block resnets
    logvar_clamp: tuple[float, float] = (-30.0, 20.0)  # clamp of the posterior log-variance
    use_quant_conv: bool = True  # 1x1 conv on the moments after the encoder
    use_post_quant_conv: bool = True  # 1x1 conv on z before the decoder
    scaling_factor: float | None = None  # latent scale 1/std if known (SD 0.18215); None = estimate from data
    shift_factor: float | None = None  # latent shift subtracted before scaling (some diffusers VAEs); None = 0
    patch_size: int = 1  # p > 1: the encoder reads p x p pixel patches as channels (pixel_unshuffle) and the
    #                      decoder writes them (pixel_shuffle); the factor grows p-fold without a full-resolution level
    variational: bool = True  # False: a plain autoencoder (the encoder outputs z itself, no sampling, no KL term)
    pixel_space: bool = False  # no network at all: the "latent" is the image itself (f = 1), so a pipeline built on
    #                            it diffuses in pixel space and differs from a latent one in nothing else

    def __post_init__(self):
        if not self.block_out_channels:
            raise ValueError("block_out_channels is empty; give one width per level, e.g. (32, 64, 64)")
        for w in self.block_out_channels:
            if w % self.norm_groups:
                raise ValueError(f"width {w} in block_out_channels={self.block_out_channels} is not divisible by "
                                 f"norm_groups={self.norm_groups}; pick widths that are multiples of it")
        if self.layers_per_block < 1 or self.latent_channels < 1:
            raise ValueError(f"layers_per_block={self.layers_per_block} and latent_channels="
                             f"{self.latent_channels} must both be >= 1")
        if self.patch_size < 1:
            raise ValueError(f"patch_size={self.patch_size} must be >= 1 (1 = no patchifying)")
        if self.logvar_clamp[0] >= self.logvar_clamp[1]:
            raise ValueError(f"logvar_clamp={self.logvar_clamp} must be (low, high) with low < high")
        if self.pixel_space and self.latent_channels != self.in_channels:
            raise ValueError(f"pixel_space: the latent is the image, so latent_channels={self.latent_channels} must "
                             f"equal in_channels={self.in_channels}")

    @property
    def downsample_factor(self) -> int:
        if self.pixel_space:
            return 1
        return self.patch_size * 2 ** (len(self.block_out_channels) - 1)

    @property
    def moment_channels(self) -> int:
        """Channels the encoder outputs: mean and log-variance (VAE) or the latent itself (plain)."""
        return (2 if self.variational else 1) * self.latent_channels


def _norm(cfg: AutoencoderConfig, ch: int) -> nn.GroupNorm:
    return group_norm(ch, cfg.norm_groups, eps=1e-6)  # norm_groups divides every width (AutoencoderConfig checks)


class ResnetBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))) with a 1x1 shortcut when the width changes."""

    def __init__(self, cfg: AutoencoderConfig, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = _norm(cfg, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(cfg, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class SelfAttention(nn.Module):
    """Single-head spatial self-attention with a residual connection (diffusers' mid-block `Attention`)."""

    def __init__(self, cfg: AutoencoderConfig, ch: int):
        super().__init__()
        self.group_norm = _norm(cfg, ch)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, HW, C), free if channels_last
        qkv = F.linear(h, torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight]),
                       torch.cat([self.to_q.bias, self.to_k.bias, self.to_v.bias]))  # one (C, 3C) matmul
        q, k, v = qkv.chunk(3, dim=-1)  # (B, HW, C) each
        h = self.to_out[0](attention(q, k, v))  # softmax(q k^T / sqrt(C)) v, one head
        return x + h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # back to (B, C, H, W), channels_last strides


class Downsample(nn.Module):
    """Pad right and bottom by one pixel, then a stride-2 3x3 conv: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv: (B, C, H, W) -> (B, out_ch or C, 2H, 2W).

    Computed without materialising the upsampled map (`ldmkit.kernels.nearest_upsample_conv`). The parameters and
    their names are the plain form's (`conv.weight` (C, C, 3, 3)), so Stable Diffusion weights load unchanged."""

    def __init__(self, ch: int, out_ch: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(ch, out_ch or ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nearest_upsample_conv(x, self.conv.weight, self.conv.bias)


class Level(nn.Module):
    """One resolution level: `n` resnets, then an optional resampler (`downsamplers` or `upsamplers`)."""

    def __init__(self, cfg: AutoencoderConfig, c_in: int, c_out: int, n: int, resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cfg, c_in if i == 0 else c_out, c_out) for i in range(n)])
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(c_out)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(c_out)])
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resnets:
            x = block(x)
        if self.resample == "down":
            x = self.downsamplers[0](x)
        elif self.resample == "up":
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    """resnet -> (self-attention) -> resnet at the lowest resolution."""

    def __init__(self, cfg: AutoencoderConfig, ch: int):
        super().__init__()
        self.attentions = nn.ModuleList([SelfAttention(cfg, ch)] if cfg.mid_attention else [])
        self.resnets = nn.ModuleList([ResnetBlock(cfg, ch, ch), ResnetBlock(cfg, ch, ch)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """Image (B, C, H, W) -> moments (B, 2c, H/f, W/f): mean and log-variance stacked on channels."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch = cfg.block_out_channels
        self.patch_size = cfg.patch_size
        self.conv_in = nn.Conv2d(cfg.in_channels * cfg.patch_size ** 2, ch[0], 3, padding=1)
        levels, prev = [], ch[0]
        for i, c in enumerate(ch):
            levels.append(Level(cfg, prev, c, cfg.layers_per_block, "down" if i < len(ch) - 1 else None))
            prev = c
        self.down_blocks = nn.ModuleList(levels)
        self.mid_block = MidBlock(cfg, ch[-1])
        self.conv_norm_out = _norm(cfg, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], cfg.moment_channels, 3, padding=1)  # VAE: mean and logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.patch_size > 1:
            x = F.pixel_unshuffle(x, self.patch_size)
        h = self.conv_in(x)
        for level in self.down_blocks:
            h = level(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, c, h, w) -> image (B, C, h*f, w*f); levels in reverse order with one extra resnet each."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch = tuple(reversed(cfg.block_out_channels))
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(cfg, ch[0])
        levels, prev = [], ch[0]
        for i, c in enumerate(ch):
            levels.append(Level(cfg, prev, c, cfg.layers_per_block + 1, "up" if i < len(ch) - 1 else None))
            prev = c
        self.up_blocks = nn.ModuleList(levels)
        self.conv_norm_out = _norm(cfg, ch[-1])
        self.patch_size = cfg.patch_size
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels * cfg.patch_size ** 2, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            h = level(h)
        h = self.conv_out(F.silu(self.conv_norm_out(h)))
        return F.pixel_shuffle(h, self.patch_size) if self.patch_size > 1 else h


class AutoencoderKL(nn.Module):
    """Encoder + diagonal Gaussian posterior + decoder; images in [-1, 1]. With `variational=False` the same
    network is a plain autoencoder (a point posterior)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        c, m = cfg.latent_channels, cfg.moment_channels
        self.quant_conv = nn.Conv2d(m, m, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if cfg.use_post_quant_conv else None
        self._tiling: tuple[int, int] | None = None  # (tile, overlap) in latent cells; see enable_tiling

    def encode(self, x: torch.Tensor) -> DiagonalGaussian | PointPosterior:
        """(B, C, H, W) image -> posterior over (B, c, H/f, W/f) latents (a point mass for a plain autoencoder)."""
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"encode expects (B, {self.cfg.in_channels}, H, W) images, got {tuple(x.shape)}")
        f = self.cfg.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"image size {tuple(x.shape[2:])} is not divisible by the downsampling factor {f}; "
                             f"pad or resize the images")
        tile = self._tiling
        if tile is not None and max(x.shape[2:]) > tile[0] * f:
            moments = tiled_encode_moments(self, x, tile[0] * f, tile[1] * f)
        else:
            moments = self.encode_moments(x)
        if not self.cfg.variational:
            return PointPosterior(moments)
        return DiagonalGaussian(moments, self.cfg.logvar_clamp)

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(x)
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def enable_tiling(self, tile: int = 16, overlap: int = 4) -> AutoencoderKL:
        """Encode and decode in overlapping tiles of `tile` latent cells (`autoencoder.tiling`) whenever an input
        is larger than that; `disable_tiling()` turns it off."""
        if not 0 <= overlap < tile:
            raise ValueError(f"tiling needs 0 <= overlap < tile, got overlap={overlap}, tile={tile}")
        self._tiling = (tile, overlap)
        return self

    def disable_tiling(self) -> AutoencoderKL:
        self._tiling = None
        return self

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, c, h, w) latent -> (B, C, h*f, w*f) image (unbounded; clamp to [-1, 1] for display)."""
        if z.ndim != 4 or z.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"decode expects (B, {self.cfg.latent_channels}, h, w) latents, got {tuple(z.shape)}")
        if self._tiling is not None and max(z.shape[2:]) > self._tiling[0]:
            return tiled_decode(self, z, *self._tiling)
        return self.decode_untiled(z)

    def decode_untiled(self, z: torch.Tensor) -> torch.Tensor:
        z = z.to(self.decoder.conv_in.weight.dtype)  # posterior samples are float32; weights may be bf16
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """(reconstruction, posterior); with `sample`, z = mean + std * noise (noise: given, or drawn from
        `generator`), else the posterior mean."""
        posterior = self.encode(x)
        z = posterior.sample(generator, noise) if sample else posterior.mode()
        return self.decode(z), posterior

    def last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight, where the adaptive GAN weight compares gradients."""
        return self.decoder.conv_out.weight

    @classmethod
    def from_diffusers(cls, directory: str | Path) -> "AutoencoderKL":
        """Load a diffusers `AutoencoderKL` directory (config.json + diffusion_pytorch_model.safetensors)."""
        from ldmkit.autoencoder.diffusers_io import load_diffusers_autoencoder  # it imports this module
        cfg, state = load_diffusers_autoencoder(directory)
        model = cls(cfg)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"weights in {directory} do not match config.json: missing {missing[:8]}, "
                             f"unexpected {unexpected[:8]}")
        return model


class PixelSpace(nn.Module):
    """The identity "autoencoder" of pixel-space diffusion: encode gives the image itself as a point posterior,
    decode returns the latent unchanged. Same interface as `AutoencoderKL`; its one (empty) tensor only carries
    the device."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        if not cfg.pixel_space:
            raise ValueError("PixelSpace needs AutoencoderConfig(pixel_space=True)")
        self.cfg = cfg
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    def encode(self, x: torch.Tensor) -> PointPosterior:
        return PointPosterior(self.encode_moments(x))

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"encode expects (B, {self.cfg.in_channels}, H, W) images, got {tuple(x.shape)}")
        return x.float()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"decode expects (B, {self.cfg.latent_channels}, h, w) images, got {tuple(z.shape)}")
        return z

    decode_untiled = decode

    def enable_tiling(self, tile: int = 16, overlap: int = 4) -> PixelSpace:
        return self  # nothing to tile: every pixel is its own latent

    def disable_tiling(self) -> PixelSpace:
        return self

    def forward(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, PointPosterior]:
        posterior = self.encode(x)
        return posterior.mean, posterior


def make_autoencoder(cfg: AutoencoderConfig) -> AutoencoderKL | PixelSpace:
    """The autoencoder a config describes: `PixelSpace` for pixel_space=True, else `AutoencoderKL`."""
    return PixelSpace(cfg) if cfg.pixel_space else AutoencoderKL(cfg)


PRESETS = {
    # seconds to train in tests: 32x32 -> 8x8x4, 62k params
    "tiny": AutoencoderConfig(in_channels=1, out_channels=1, block_out_channels=(8, 16, 16), layers_per_block=1,
                              latent_channels=4, norm_groups=4),
    # Fashion-MNIST padded to 32x32 -> 8x8x4 (factor 4), 1.69M params; (32, 64, 128) is 2.7M, (32, 64, 64) 0.95M
    "fashion-mnist": AutoencoderConfig(in_channels=1, out_channels=1, block_out_channels=(32, 64, 96),
                                       layers_per_block=1, latent_channels=4, norm_groups=16),
    # captioned shapes, RGB 32x32 -> 8x8x4
    "shapes": AutoencoderConfig(in_channels=3, out_channels=3, block_out_channels=(32, 64, 96),
                                layers_per_block=1, latent_channels=4, norm_groups=16),
    # pixel-space diffusion: no autoencoder (channels come from the data)
    "pixels": AutoencoderConfig(in_channels=1, out_channels=1, latent_channels=1, variational=False,
                                pixel_space=True),
    # the Stable Diffusion v1/v2 VAE layout (83.7M params), factor 8
    "sd": AutoencoderConfig(scaling_factor=0.18215),
}
