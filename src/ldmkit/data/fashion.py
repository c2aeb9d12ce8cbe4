"""Fashion-MNIST from its four idx files (Debian package `dataset-fashion-mnist`, or any folder holding them).

The 28x28 grayscale images are padded with black (uint8 0, which `to_float` maps to -1) to the model resolution,
32x32 by default, so the autoencoder's downsampling divides evenly; `native_size` is (28, 28) and
`ImageDataset.crop` removes the padding again. Splits: "train" (60000) and "test" (10000, the t10k files),
both in idx order.
"""

from __future__ import annotations

import gzip
import os
import random
import zlib
from pathlib import Path

import numpy as np
import torch

from ldmkit.data.base import ImageDataset
from ldmkit.data.captions import FASHION_CLASSES, fashion_caption

DEFAULT_FASHION_DIR = Path(os.environ.get("LDMKIT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
NATIVE = 28
_MAGIC = {2049: 1, 2051: 3}  # idx magic number (unsigned byte data) -> number of dimensions


def fashion_files_present(data_dir: str | os.PathLike | None = None) -> bool:
    """True when all four idx files are in data_dir (default: DEFAULT_FASHION_DIR)."""
    d = Path(data_dir) if data_dir is not None else DEFAULT_FASHION_DIR
    return all(_find(d, name) is not None for pair in FILES.values() for name in pair)


def _find(data_dir: Path, name: str) -> Path | None:
    """The .gz file, or its decompressed twin (same name without .gz)."""
    for path in (data_dir / name, data_dir / name[:-3]):
        if path.is_file():
            return path
    return None


def _missing_message(path: Path) -> str:
    names = ", ".join(n for pair in FILES.values() for n in pair)
    return (f"Fashion-MNIST file not found: {path}. Install it with `apt-get install dataset-fashion-mnist` "
            f"(files land in /usr/share/datasets/fashion-mnist), or pass --data-dir (data_dir=) pointing to a "
            f"folder with the four idx files: {names}")


def read_idx(path: str | os.PathLike, expect_dims: int) -> np.ndarray:
    """Read a uint8 idx file (gzipped or not), checking its magic number and that the payload matches the header."""
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"cannot read Fashion-MNIST file {path}: {e} (truncated or corrupt download? "
                         f"reinstall dataset-fashion-mnist or replace the file)") from e
    if len(raw) < 4:
        raise ValueError(f"Fashion-MNIST file {path} is truncated: {len(raw)} bytes, no idx header")
    magic = int.from_bytes(raw[:4], "big")
    if _MAGIC.get(magic) != expect_dims:
        raise ValueError(f"{path} is not a uint8 idx file with {expect_dims} dimension(s): magic number {magic:#010x}"
                         f" (expected {[m for m, d in _MAGIC.items() if d == expect_dims][0]:#010x}); wrong file?")
    header = 4 + 4 * expect_dims
    if len(raw) < header:
        raise ValueError(f"Fashion-MNIST file {path} is truncated inside its header ({len(raw)} bytes)")
    dims = [int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(expect_dims)]
    want = header + int(np.prod(dims))
    if len(raw) != want:
        raise ValueError(f"Fashion-MNIST file {path} has {len(raw)} bytes but its header {dims} needs {want} "
                         f"({'truncated' if len(raw) < want else 'trailing data'}); replace the file")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def read_split(split: str, data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Raw (N, 28, 28) uint8 images and (N,) uint8 labels of a split, validated."""
    if split not in FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; choose one of {sorted(FILES)}")
    d = Path(data_dir) if data_dir is not None else DEFAULT_FASHION_DIR
    paths = []
    for name in FILES[split]:
        path = _find(d, name)
        if path is None:
            raise FileNotFoundError(_missing_message(d / name))
        paths.append(path)
    images, labels = read_idx(paths[0], 3), read_idx(paths[1], 1)
    if images.shape[1:] != (NATIVE, NATIVE):
        raise ValueError(f"{paths[0]}: expected 28x28 images, got {images.shape[1:]}")
    if len(images) != len(labels):
        raise ValueError(f"{paths[0]} has {len(images)} images but {paths[1]} has {len(labels)} labels")
    if labels.max(initial=0) >= len(FASHION_CLASSES):
        raise ValueError(f"{paths[1]}: label {labels.max()} out of range 0..9")
    return images, labels


def load_fashion(split: str = "train", data_dir: str | os.PathLike | None = None, image_size: int = 32,
                 num: int | None = None) -> ImageDataset:
    """Fashion-MNIST padded with black to image_size (>= 28); `num` keeps the first num images of the split."""
    if image_size < NATIVE:
        raise ValueError(f"Fashion-MNIST images are 28x28; image_size must be >= 28 (padding only), got {image_size}")
    images, labels = read_split(split, data_dir)
    if num is not None:
        if not 1 <= num <= len(images):
            raise ValueError(f"num must be in 1..{len(images)} for Fashion-MNIST {split}, got {num}")
        images, labels = images[:num], labels[:num]
    top = (image_size - NATIVE) // 2  # odd padding puts the extra row/column at the bottom/right
    padded = np.zeros((len(images), 1, image_size, image_size), np.uint8)  # 0 = black = -1 after to_float
    padded[:, 0, top:top + NATIVE, top:top + NATIVE] = images
    label_t = torch.from_numpy(labels.astype(np.int64))
    label_list = label_t.tolist()

    def captioner(i: int, rng: random.Random | None) -> str:
        return fashion_caption(label_list[i], rng)

    return ImageDataset(name=f"fashion-mnist/{split}", images=torch.from_numpy(padded), labels={"class": label_t},
                        label_names={"class": list(FASHION_CLASSES)}, captioner=captioner,
                        native_size=(NATIVE, NATIVE), pad=(top, top),
                        meta={"data_dir": str(Path(data_dir) if data_dir is not None else DEFAULT_FASHION_DIR)})


def fashion_uint8(split: str, data_dir: str | None = None):
    """Fashion-MNIST `split` at its native 28x28 as (uint8 (N, 28, 28, 1) numpy, int64 labels numpy)."""
    from ldmkit.data import load_dataset  # the package imports this module: cached loading lives there
    ds = load_dataset("fashion-mnist", split=split, data_dir=data_dir)
    return ds.crop(ds.images).permute(0, 2, 3, 1).numpy(), ds.labels["class"].numpy()
