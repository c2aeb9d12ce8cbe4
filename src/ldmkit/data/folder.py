"""Image folders with captions: `folder:PATH` datasets of any size and image mode.

Layout (top level of the folder only; subfolders other than split folders are ignored):
- `x.png` + `x.txt`: one caption per non-empty line of the .txt (a random line per training draw), or
- `captions.jsonl`: one {"file": "x.png", "caption": "..."} object per line; several lines for one file give
  it several captions. When captions.jsonl exists it is the only caption source.
Splits: if PATH/<split>/ exists it is read; otherwise PATH itself serves as the "train" split only.

Every image is converted to RGB (or L with channels=1; transparent pixels are composited onto `background`,
16-bit images scaled to 8 bits, EXIF rotation applied), resized so its shorter side is image_size (bicubic) and
centre-cropped to a square. An unreadable, truncated or non-image file, or an image without a caption, raises an
error naming the file; with skip_bad=True it is skipped with a warning and counted in `dataset.skipped`.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ldmkit.data.base import ImageDataset

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255)}
_SKIP_HINT = "or pass skip_bad=True (--skip-bad) to skip such files with a warning"


class BadFileError(ValueError):
    """A file of an image folder that cannot be used (names the file and the fix)."""


def split_dir(path: str | os.PathLike, split: str) -> Path:
    """The directory holding a split: PATH/<split> if it exists, else PATH for "train"."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory (spec folder:PATH)")
    if (root / split).is_dir():
        return root / split
    if split == "train":
        return root
    raise FileNotFoundError(f"image folder {root} has no {split!r} subfolder; put {split} images in {root / split} "
                            f"(PATH itself is used as the train split only)")


def folder_fingerprint(path: str | os.PathLike, split: str) -> tuple:
    """(name, size, mtime) of every file of a split folder: a cache key that changes when the files do."""
    d = split_dir(path, split)
    return tuple((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in sorted(os.scandir(d), key=lambda e: e.name)
                 if e.is_file())


def _read_jsonl(path: Path) -> dict[str, list[str]]:
    """captions.jsonl -> {file name: [captions]} in order of first appearance."""
    captions: dict[str, list[str]] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e}); each line must be "
                             f'{{"file": "x.png", "caption": "..."}}') from e
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) \
                or not isinstance(entry.get("caption"), str) or not entry["caption"].strip():
            raise ValueError(f'{path}:{lineno}: expected {{"file": "x.png", "caption": "a non-empty text"}}, '
                             f"got {line.strip()[:120]}")
        captions.setdefault(entry["file"], []).append(entry["caption"].strip())
    return captions


def _read_txt(image: Path) -> list[str]:
    txt = image.with_suffix(".txt")
    if not txt.is_file():
        raise BadFileError(f"{image}: no caption: expected {txt.name} next to it (one caption per line) or an entry "
                           f"in captions.jsonl; add a caption, {_SKIP_HINT}")
    lines = [ln.strip() for ln in txt.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise BadFileError(f"{image}: caption file {txt} is empty; write a caption in it, {_SKIP_HINT}")
    return lines


def _to_mode(im: Image.Image, channels: int, background: tuple[int, int, int]) -> Image.Image:
    """Any PIL mode -> "RGB" (channels=3) or "L" (channels=1)."""
    if im.mode == "F":
        raise BadFileError("32-bit float images (mode F) have no fixed value range; save the image as 8 or 16 bit")
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grayscale: scale 0..65535 -> 0..255
        im = Image.fromarray((np.asarray(im).astype(np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, background + (255,)), rgba)
    return im.convert("RGB" if channels == 3 else "L")


def _resize_crop(im: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size` (bicubic, antialiased when shrinking), then centre-crop to size x size."""
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def read_image(path: Path, image_size: int, channels: int, background: tuple[int, int, int]) -> np.ndarray:
    """One image file -> uint8 (C, S, S); any decoding problem becomes a BadFileError naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            im = _resize_crop(_to_mode(im, channels, background), image_size)
    except BadFileError as e:
        raise BadFileError(f"{path}: {e}; {_SKIP_HINT}") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise BadFileError(f"{path}: cannot read image ({type(e).__name__}: {e}); the file is truncated, corrupt or "
                           f"not an image: replace or remove it, {_SKIP_HINT}") from e
    arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _entries(d: Path) -> list[tuple[Path, list[str] | BadFileError]]:
    """(image path, its captions or the error explaining why it has none) for every image of a split folder."""
    images = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    jsonl = d / "captions.jsonl"
    if not jsonl.is_file():
        out = []
        for p in images:
            try:
                out.append((p, _read_txt(p)))
            except BadFileError as e:
                out.append((p, e))
        return out
    table = _read_jsonl(jsonl)
    out = [(d / name, caps) for name, caps in table.items()]
    for p in images:
        if p.name not in table:
            out.append((p, BadFileError(f"{p}: no caption: captions.jsonl has no entry with \"file\": \"{p.name}\"; "
                                        f"add one, {_SKIP_HINT}")))
    return out


def load_folder(path: str | os.PathLike, split: str = "train", image_size: int = 32, channels: int = 3,
                skip_bad: bool = False, background: str = "black") -> ImageDataset:
    """Load a captioned image folder (see the module docstring). Labels: none (empty dict)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {sorted(BACKGROUNDS)}, got {background!r}")
    d = split_dir(path, split)
    images, captions, bad = [], [], []
    for p, caps in _entries(d):
        try:
            if isinstance(caps, BadFileError):
                raise caps
            if not p.is_file():
                raise BadFileError(f"{p}: listed in captions.jsonl but the file does not exist; fix the entry, "
                                   f"{_SKIP_HINT}")
            images.append(read_image(p, image_size, channels, BACKGROUNDS[background]))
            captions.append(caps)
        except BadFileError as e:
            if not skip_bad:
                raise
            warnings.warn(f"skipping {e}", stacklevel=2)
            bad.append(str(p))
    if not images:
        raise ValueError(f"image folder {d} has no usable captioned images"
                         f"{f' ({len(bad)} skipped)' if bad else ''}; expected x.png + x.txt or captions.jsonl")

    def captioner(i: int, rng: random.Random | None) -> str:
        return captions[i][0] if rng is None else rng.choice(captions[i])

    return ImageDataset(name=f"folder:{d}", images=torch.from_numpy(np.stack(images)), labels={}, label_names={},
                        captioner=captioner, skipped=len(bad), meta={"skipped_files": bad, "split": split})
