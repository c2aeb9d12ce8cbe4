"""Image conversions (the one place uint8 [0, 255] meets float [-1, 1]) and PNG grids written atomically."""

from __future__ import annotations

import io
import math
import os

import numpy as np
import torch
from PIL import Image

from ldmkit.checkpoint import write_bytes


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images of any shape -> float32 in [-1, 1] (0 -> -1, 255 -> 1)."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise TypeError(f"to_float expects a uint8 torch.Tensor (a batch of dataset.images), got {got}")
    return images.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Floats in [-1, 1] (any shape) -> uint8 tensor, clamped and rounded to nearest; the inverse of `to_float`."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) floats in [-1, 1] -> (N, H, W, C) uint8 numpy (the samples' layout)."""
    return to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8_nhwc(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) uint8 -> (N, C, H, W) floats in [-1, 1]."""
    if isinstance(x, np.ndarray) and not x.flags.writeable:
        x = x.copy()  # torch refuses to share read-only memory
    return to_float(torch.as_tensor(np.asarray(x)).permute(0, 3, 1, 2))


def as_float_images(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, C, H, W) uint8 -> float in [-1, 1]; float input is checked to lie in [-1, 1] and cast to `dtype`."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected an image tensor (B, C, H, W), got {got}")
    if x.dtype == torch.uint8:
        return x.to(dtype) / 127.5 - 1.0
    if not x.is_floating_point():
        raise ValueError(f"images must be uint8 or float in [-1, 1], got dtype {x.dtype}")
    if x.numel() and (x.min() < -1.001 or x.max() > 1.001):
        raise ValueError(f"float images must lie in [-1, 1], got range [{x.min():.3f}, {x.max():.3f}]; "
                         f"pass uint8 or rescale with x / 127.5 - 1")
    return x.to(dtype)


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
    arr = to_uint8_nhwc(images) if isinstance(images, torch.Tensor) else np.asarray(images)
    save_png(grid(arr, nrow=nrow, scale=scale), path)
