"""`ImageDataset`: uint8 images at model resolution, integer labels, and a caption function.

Every loader (Fashion-MNIST, captioned shapes, image folders) returns one of these. Images are stored as a uint8
tensor (N, C, H, W) so 60k Fashion-MNIST images take 61 MB; `to_float` maps a batch to [-1, 1] on the fly
(0 -> -1, 255 -> 1). Datasets are cached in-process by `load_dataset`: treat `images` and `labels` as read-only.
"""

from __future__ import annotations

import random
from typing import Callable

import numpy as np
import torch

from ldmkit.images import to_float, to_uint8

# caption(i, rng) -> str; rng None means the canonical (deterministic) caption of example i
Captioner = Callable[[int, "random.Random | None"], str]


class ImageDataset:
    """A captioned, labelled image dataset held in memory.

    Attributes:
        name: e.g. "fashion-mnist/train", "shapes/test", "folder:/data/cats/train".
        images: uint8 tensor (N, C, H, W) at model resolution (e.g. Fashion-MNIST padded 28 -> 32).
        labels: dict label name -> int64 tensor (N,); empty for image folders.
        label_names: dict label name -> list of the names of its values (index = label value).
        native_size: (H, W) of the content before padding; `crop` cuts model-resolution images back to it.
        channels: C (1 for Fashion-MNIST, 3 for shapes and folders unless asked otherwise).
        skipped: number of unreadable files skipped (image folders with skip_bad=True), else 0.
        meta: loader-specific facts (e.g. shapes' held-out combinations, skipped file names).
    """

    def __init__(self, name: str, images: torch.Tensor, labels: dict[str, torch.Tensor],
                 label_names: dict[str, list[str]], captioner: Captioner,
                 native_size: tuple[int, int] | None = None, pad: tuple[int, int] = (0, 0),
                 skipped: int = 0, meta: dict | None = None):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"{name}: images must be a uint8 (N, C, H, W) tensor, got {images.dtype} "
                             f"{tuple(images.shape)}")
        n = images.shape[0]
        for key, value in labels.items():
            if value.shape != (n,) or value.dtype != torch.int64:
                raise ValueError(f"{name}: label {key!r} must be int64 of shape ({n},), got {value.dtype} "
                                 f"{tuple(value.shape)}")
            if key not in label_names:
                raise ValueError(f"{name}: label {key!r} has no entry in label_names")
        self.name = name
        self.images = images
        self.labels = labels
        self.label_names = label_names
        self._captioner = captioner
        self.native_size = tuple(native_size) if native_size is not None else tuple(images.shape[2:])
        self._pad = pad  # (top, left) offset of the native content inside the model-resolution image
        self.skipped = skipped
        self.meta = dict(meta or {})

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        c, h, w = self.images.shape[1:]
        return f"ImageDataset({self.name!r}, n={len(self)}, {c}x{h}x{w}, labels={sorted(self.labels)})"

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) at model resolution."""
        return tuple(self.images.shape[2:])

    @property
    def crop_box(self) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the native content inside a model-resolution image."""
        return (*self._pad, *self.native_size)

    def caption(self, i: int, rng: random.Random | None = None) -> str:
        """Caption of example i: a random training wording drawn with `rng`, or the canonical one if rng is None."""
        if not 0 <= int(i) < len(self):
            raise IndexError(f"{self.name}: index {i} out of range for {len(self)} examples")
        return self._captioner(int(i), rng)

    def captions(self, indices, rng: random.Random | None = None) -> list[str]:
        """Captions of several examples (a list, a range or an int tensor of indices)."""
        return [self.caption(int(i), rng) for i in indices]

    @staticmethod
    def to_float(images: torch.Tensor) -> torch.Tensor:
        """uint8 batch -> float32 in [-1, 1]."""
        return to_float(images)

    @staticmethod
    def to_uint8(x: torch.Tensor) -> torch.Tensor:
        """float batch in [-1, 1] -> uint8 (clamped, rounded)."""
        return to_uint8(x)

    def crop(self, images: torch.Tensor | np.ndarray, channels_last: bool = False):
        """Cut model-resolution images back to `native_size` (Fashion-MNIST: 32x32 -> 28x28; others: unchanged).

        Works on torch tensors or numpy arrays shaped (..., H, W), or (..., H, W, C) with channels_last=True.
        """
        hw = tuple(images.shape[-3:-1] if channels_last else images.shape[-2:])
        if hw != self.image_size:
            raise ValueError(f"{self.name}: crop expects images of size {self.image_size}, got {hw} "
                             f"(shape {tuple(images.shape)}; pass channels_last=True for (N, H, W, C))")
        (top, left), (h, w) = self._pad, self.native_size
        if channels_last:
            return images[..., top:top + h, left:left + w, :]
        return images[..., top:top + h, left:left + w]
