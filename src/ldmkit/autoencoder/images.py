"""Image tensor conventions at the autoencoder's boundary: uint8 in [0, 255] or float in [-1, 1]."""

from __future__ import annotations

import torch


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
