"""A small feature network for a perceptual (LPIPS-style) distance, trained on the user's own images.

Why: LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric") compares
the unit-normalised activations of an ImageNet network. Those weights cannot be downloaded here, and an ImageNet
network is a poor fit for 28x28 grey clothes anyway. So when no pretrained backbone is given, ldmkit trains a
small convolutional network on the training images themselves, with its own seed, in about a minute on a CPU.

Objective (self-supervised, no labels): *distortion classification under nuisance transforms*. Each training image
is randomly translated by up to 2 pixels and randomly flipped left-right (nuisances), then one of six degradations
is applied: none, Gaussian blur, additive noise, pixelation (2x2 average then nearest upsampling), posterisation
(few grey levels) or contrast loss, each with a random strength. The network must say which one. To answer it
has to represent local image structure (edges, texture, intensity statistics) and how it degrades, while the
answer never depends on where the object sits, so its feature maps respond to loss of detail and care less about
small misalignments: the two properties a reconstruction loss should have. It uses no class labels, so it shares
nothing with the evaluation classifier.

Limits: the distance is calibrated to nothing human; its values are not comparable with published LPIPS numbers,
across datasets, or across featnet seeds (report which featnet an evaluation used). It is sensitive mainly to the
degradations it was trained to tell apart; a failure mode outside them (e.g. a wrong but sharp texture) may score
as close. The linear heads are all ones (every channel weighs the same) unless trained heads are loaded.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from ldmkit.checkpoint import load_safetensors, save_safetensors
from ldmkit.images import as_float_images

N_DISTORTIONS = 6  # none, blur, noise, pixelate, posterise, contrast


@dataclass(frozen=True)
class FeatNetConfig:
    in_channels: int = 1  # image channels
    widths: tuple[int, ...] = (16, 32, 64)  # channels per stage; each stage halves the resolution after the first
    max_shift: int = 2  # nuisance translation in pixels during training


class FeatNet(nn.Module):
    """Stages of two 3x3 conv + ReLU (2x2 average pool between stages); one LPIPS tap per stage."""

    def __init__(self, cfg: FeatNetConfig):
        super().__init__()
        self.cfg = cfg
        self.channels = tuple(cfg.widths)
        self.register_buffer("shift", torch.zeros(cfg.in_channels))  # per-channel data mean
        self.register_buffer("scale", torch.ones(cfg.in_channels))  # per-channel data std
        stages, prev = [], cfg.in_channels
        for w in cfg.widths:
            stages.append(nn.Sequential(nn.Conv2d(prev, w, 3, padding=1), nn.ReLU(),
                                        nn.Conv2d(w, w, 3, padding=1), nn.ReLU()))
            prev = w
        self.stages = nn.ModuleList(stages)
        self.classifier = nn.Linear(prev, N_DISTORTIONS)  # pretext head, unused by the distance

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images in [-1, 1] (B, C, H, W) -> one feature map per stage."""
        if x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"featnet expects {self.cfg.in_channels}-channel images, got {tuple(x.shape)}")
        h = (x - self.shift[None, :, None, None]) / self.scale[None, :, None, None]
        feats = []
        for i, stage in enumerate(self.stages):
            h = stage(h if i == 0 else F.avg_pool2d(h, 2))
            feats.append(h)
        return feats

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self(x)[-1].mean(dim=(2, 3)))  # (B, N_DISTORTIONS)


# ---- the pretext task -------------------------------------------------------------------------------------------

def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int = 4) -> torch.Tensor:
    """Separable Gaussian blur with a per-example sigma (B,), replicate padding: (B, C, H, W) -> same."""
    B, C, H, W = x.shape
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None].to(x.dtype)) ** 2)  # (B, 2r+1)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, dim=0)  # (B*C, 2r+1)
    h = F.pad(x.reshape(1, B * C, H, W), (radius,) * 4, mode="replicate")
    h = F.conv2d(h, k[:, None, None, :], groups=B * C)  # horizontal pass
    h = F.conv2d(h, k[:, None, :, None], groups=B * C)  # vertical pass
    return h.reshape(B, C, H, W)


def random_translate(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Shift each image by integer (dy, dx) in [-max_shift, max_shift], replicate padding at the border."""
    B, C, H, W = x.shape
    if max_shift == 0:
        return x
    p = F.pad(x, (max_shift,) * 4, mode="replicate")
    off = torch.randint(0, 2 * max_shift + 1, (2, B), generator=g)
    rows = (off[0][:, None] + torch.arange(H))[:, None, :, None].expand(B, C, H, W + 2 * max_shift)
    p = p.gather(2, rows)
    cols = (off[1][:, None] + torch.arange(W))[:, None, None, :].expand(B, C, H, W)
    return p.gather(3, cols)


def distort(x: torch.Tensor, kind: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Apply distortion `kind[b]` in 0..5 with a random strength to each image b of x in [-1, 1]."""
    B = x.shape[0]
    u = torch.rand(B, generator=g)[:, None, None, None]  # strength in [0, 1)
    sel = [(kind == i)[:, None, None, None] for i in range(N_DISTORTIONS)]
    blur = gaussian_blur(x, 0.5 + 1.2 * u.flatten())
    noise = x + (0.03 + 0.12 * u) * torch.randn(x.shape, generator=g)
    pix = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2.0, mode="nearest")
    levels = torch.randint(3, 9, (B, 1, 1, 1), generator=g).float()
    post = torch.round((x + 1) / 2 * (levels - 1)) / (levels - 1) * 2 - 1
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = mean + (0.5 + 0.35 * u) * (x - mean)
    out = torch.where(sel[1], blur, x)
    for s, y in zip(sel[2:], (noise, pix, post, contrast)):
        out = torch.where(s, y, out)
    return out


def pretext_batch(x: torch.Tensor, max_shift: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(distorted images, distortion labels) from clean images in [-1, 1]."""
    x = random_translate(x, max_shift, g)
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    kind = torch.randint(0, N_DISTORTIONS, (x.shape[0],), generator=g)
    return distort(x, kind, g), kind


def train_featnet(images: torch.Tensor, steps: int = 500, seed: int = 0, batch_size: int = 64, lr: float = 2e-3,
                  cfg: FeatNetConfig | None = None, log=None) -> FeatNet:
    """Train a FeatNet on images (N, C, H, W), uint8 or float in [-1, 1], with the distortion-classification
    objective above. Deterministic for a given seed and thread count. `log(step, loss, acc)` is called every
    50 steps if given."""
    x_all = as_float_images(images)
    cfg = cfg or FeatNetConfig(in_channels=x_all.shape[1])
    if cfg.in_channels != x_all.shape[1]:
        raise ValueError(f"FeatNetConfig.in_channels={cfg.in_channels} but images have {x_all.shape[1]} channels")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FeatNet(cfg)
    net.shift.copy_(x_all.mean(dim=(0, 2, 3)))
    net.scale.copy_(x_all.std(dim=(0, 2, 3)).clamp_min(1e-3))
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for step in range(steps):
        idx = torch.randint(0, x_all.shape[0], (batch_size,), generator=g)
        xb, yb = pretext_batch(x_all[idx], cfg.max_shift, g)
        for group in opt.param_groups:  # cosine decay to 0
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        logits = net.logits(xb)
        loss = F.cross_entropy(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log is not None and (step % 50 == 0 or step == steps - 1):
            log(step, loss.item(), (logits.argmax(1) == yb).float().mean().item())
    net.train_info = {"objective": "distortion-classification", "steps": steps, "seed": seed,
                      "batch_size": batch_size, "lr": lr, "final_loss": float(loss.detach()) if steps else None}
    return net.eval().requires_grad_(False)


def save_featnet(net: FeatNet, path: str | Path) -> None:
    """Weights + config (+ training info) in one safetensors file."""
    meta = {"config": json.dumps(asdict(net.cfg)), "train_info": json.dumps(getattr(net, "train_info", {}))}
    save_safetensors(net.state_dict(), path, metadata=meta)


def load_featnet(path: str | Path) -> FeatNet:
    path = Path(path)
    state = load_safetensors(path)  # clear error if missing or unreadable
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{path} has no 'config' metadata; it was not written by save_featnet")
    d = json.loads(meta["config"])
    net = FeatNet(FeatNetConfig(**{**d, "widths": tuple(d["widths"])}))
    net.load_state_dict(state)
    net.train_info = json.loads(meta.get("train_info", "{}"))
    return net.eval().requires_grad_(False)
