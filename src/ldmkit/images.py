"""Image conversions and grids: float [-1, 1] tensors <-> uint8 arrays, PNG grids written atomically."""

from __future__ import annotations

import io
import math
import os

import numpy as np
import torch
from PIL import Image

from ldmkit.checkpoint import write_bytes


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) floats in [-1, 1] -> (N, H, W, C) uint8 (round to nearest)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) uint8 -> (N, C, H, W) floats in [-1, 1]."""
    x = torch.as_tensor(np.asarray(x))
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1


def grid(images: np.ndarray, nrow: int | None = None, pad: int = 2, scale: int = 1) -> np.ndarray:
    """Tile (N, H, W, C) uint8 images into one (H', W', C) image, `nrow` images per row."""
    n, h, w, c = images.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / nrow))
    out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = images[i]
    if scale > 1:
        out = out.repeat(scale, 0).repeat(scale, 1)
    return out


def save_png(image: np.ndarray, path: str | os.PathLike) -> None:
    """Write an (H, W, C) uint8 array as PNG, atomically."""
    arr = image[..., 0] if image.shape[-1] == 1 else image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    write_bytes(path, buf.getvalue())


def save_grid(images: torch.Tensor | np.ndarray, path: str | os.PathLike, nrow: int | None = None,
              scale: int = 2) -> None:
    """Save float [-1, 1] (N, C, H, W) tensors or uint8 (N, H, W, C) arrays as a PNG grid."""
    arr = to_uint8(images) if isinstance(images, torch.Tensor) else np.asarray(images)
    save_png(grid(arr, nrow=nrow, scale=scale), path)
