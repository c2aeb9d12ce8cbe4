"""LPIPS perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric"), eq. 1:

    d(x, y) = sum_l  mean_{h,w}  || w_l * (f_l(x)_{hw} / |f_l(x)_{hw}| - f_l(y)_{hw} / |f_l(y)_{hw}|) ||^2

with f_l the backbone's feature map at depth l (unit-normalised over channels at every pixel) and w_l >= 0 a
per-channel linear head (a 1x1 conv). Two backbones:

- `VGG16Features`: torchvision's VGG16 `features` layout (keys features.0.weight ...), tapped at relu1_2, relu2_2,
  relu3_3, relu4_3, relu5_3, with LPIPS' input scaling. ImageNet weights and the official linear heads
  (lin0.model.1.weight ... lin4.model.1.weight) are read from files the user passes; nothing is downloaded.
- `FeatNet` (featnet.py): a small network trained on the user's images; heads all ones by default.

The backbone is frozen; gradients flow to the inputs only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # LPIPS ScalingLayer: x in [-1, 1] -> (x - shift) / scale
LPIPS_SCALE = (0.458, 0.448, 0.450)
# torchvision vgg16.features up to relu5_3: a conv width, or "M" for a 2x2 max pool; each conv is followed by ReLU
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
VGG16_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in `features`
VGG16_CHANNELS = (64, 128, 256, 512, 512)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat state dict from .safetensors, or from a legacy .pth/.pt via torch.load(weights_only=True)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} not found")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a flat state dict of tensors")
    return state


class VGG16Features(nn.Module):
    """torchvision VGG16 `features[:30]` returning the five LPIPS taps; grey images are repeated to RGB."""

    def __init__(self):
        super().__init__()
        layers, prev = [], 3
        for item in VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(prev, item, 3, padding=1), nn.ReLU()]
                prev = item
        self.features = nn.Sequential(*layers)  # indices match torchvision's state-dict keys
        self.channels = VGG16_CHANNELS
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT)[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE)[None, :, None, None], persistent=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise ValueError(f"VGG16 LPIPS takes 1- or 3-channel images, got {tuple(x.shape)}")
        h, feats = (x - self.shift) / self.scale, []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in VGG16_TAPS:
                feats.append(h)
        return feats


def load_vgg16(path: str | Path) -> VGG16Features:
    """VGG16Features with ImageNet weights from a torchvision-layout file (classifier.* keys are ignored)."""
    state = {k: v for k, v in read_state_dict(path).items() if k.startswith("features.")}
    net = VGG16Features()
    want = net.state_dict()
    missing = sorted(set(want) - set(state))
    extra = sorted(k for k in state if k not in want and int(k.split(".")[1]) < 30)
    if missing or extra:
        raise ValueError(f"{path} is not a torchvision VGG16 state dict: missing {missing[:6]}, unexpected "
                         f"{extra[:6]}")
    for k, v in want.items():
        if state[k].shape != v.shape:
            raise ValueError(f"{path}: {k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}")
    net.load_state_dict({k: state[k] for k in want})
    return net


def load_lpips_heads(path: str | Path, channels: tuple[int, ...]) -> list[torch.Tensor]:
    """Official LPIPS linear heads (lin{l}.model.1.weight, shape (1, C_l, 1, 1)) -> list of (C_l,) weights."""
    state = read_state_dict(path)
    heads = []
    for i, c in enumerate(channels):
        key = f"lin{i}.model.1.weight"
        if key not in state:
            raise ValueError(f"{path} has no key {key!r}; expected the official LPIPS linear heads "
                             f"(lin0.model.1.weight ... lin{len(channels) - 1}.model.1.weight)")
        w = state[key]
        if tuple(w.shape) != (1, c, 1, 1):
            raise ValueError(f"{path}: {key} has shape {tuple(w.shape)}, expected (1, {c}, 1, 1)")
        heads.append(w.reshape(c).float())
    return heads


def unit_normalize(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Divide each pixel's channel vector by its L2 norm: (B, C, H, W) -> same."""
    return f / (f.square().sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """d(x, y) per example (B,) for images in [-1, 1]; `backbone(x)` returns a list of feature maps and has
    `.channels`. Frozen: no parameter takes gradients."""

    def __init__(self, backbone: nn.Module, heads: list[torch.Tensor] | None = None):
        super().__init__()
        self.backbone = backbone
        heads = heads if heads is not None else [torch.ones(c) for c in backbone.channels]
        if [h.numel() for h in heads] != list(backbone.channels):
            raise ValueError(f"head widths {[h.numel() for h in heads]} do not match backbone channels "
                             f"{list(backbone.channels)}")
        for i, h in enumerate(heads):
            if (h < 0).any():
                raise ValueError(f"LPIPS head {i} has negative weights; heads must be non-negative")
            self.register_buffer(f"head{i}", h.detach().float().clone())
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":  # the metric is frozen: always in eval mode
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        fx = self.backbone(torch.cat([x, y]))  # one batched pass over both images
        d = 0.0
        for i, f in enumerate(fx):
            a, b = unit_normalize(f.float()).chunk(2)  # (B, C_l, H_l, W_l) each
            w = getattr(self, f"head{i}")[None, :, None, None]
            d = d + (w * (a - b).square()).sum(1).mean(dim=(1, 2))  # eq. 1: head, then spatial mean
        return d  # (B,)


def lpips_vgg16(vgg_path: str | Path, heads_path: str | Path | None = None) -> LPIPS:
    """LPIPS-VGG from a torchvision VGG16 weights file and (optionally) the official linear heads file."""
    backbone = load_vgg16(vgg_path)
    heads = load_lpips_heads(heads_path, VGG16_CHANNELS) if heads_path is not None else None
    return LPIPS(backbone, heads)
