"""Image folders: `folder:PATH` datasets of any size and image mode, in the layouts users already have.

Captions (the first layout found in the split's folder wins):
- `captions.jsonl`: one {"file": "x.png", "caption": "..."} per line; several lines give a file several captions;
- `metadata.jsonl` (the Hugging Face / diffusers ImageFolder layout): {"file_name": "x.png", "text": "..."};
- class subfolders (`PATH/cat/*.png`, `PATH/dog/*.png`, no images at the top): each image is captioned by the
  prompt template ("a photo of a {}" by default, underscores read as spaces) and labelled with its class, so
  classifier guidance and class accuracy work on it;
- `x.png` + `x.txt`: one caption per non-empty line of the .txt (a random line per training draw).

Splits: PATH/<split>/ when it exists. Otherwise "train" and "test" are cut from the same images (PATH, or
PATH/train when only that exists): 5% of them (at most 1,000; none below 20 images), chosen by a seeded hash of
each file's path inside the folder, are held out as "test", so a file keeps its split when others are added.

Every image is converted to RGB or L (`channels="auto"`: L when every image is grayscale; transparent pixels
are composited onto `background`, 16-bit images scaled to 8 bits, EXIF rotation applied), resized so its
shorter side is image_size (bicubic; a warning counts the images that had to be upscaled) and centre-cropped to a
square. An unreadable, truncated or non-image file, or an image without a caption, raises an error naming the
file; with skip_bad=True it is skipped with a warning and counted in `dataset.skipped`.
"""

from __future__ import annotations

import hashlib
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


HOLDOUT_FRACTION, HOLDOUT_MAX, HOLDOUT_MIN_IMAGES = 0.05, 1000, 20
DEFAULT_TEMPLATE = "a photo of a {}"
GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N"}


def _root(path: str | os.PathLike) -> Path:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory (spec folder:PATH)")
    return root


def split_source(path: str | os.PathLike, split: str) -> tuple[Path, str]:
    """(folder to read, which of its images): "all", or "kept" / "held-out" of a folder without a test split."""
    root = _root(path)
    if (root / split).is_dir():
        return root / split, "all"
    if split not in ("train", "test"):
        raise FileNotFoundError(f"image folder {root} has no {split!r} subfolder; put {split} images in "
                                f"{root / split}")
    pool = root / "train" if (root / "train").is_dir() else root
    if split == "train" and (root / "test").is_dir():
        return pool, "all"
    return pool, "kept" if split == "train" else "held-out"


def folder_fingerprint(path: str | os.PathLike, split: str) -> tuple:
    """(path, size, mtime) of every file a split reads: a cache key that changes when the files do."""
    d, part = split_source(path, split)
    files = [e for e in sorted(d.iterdir()) if e.is_file()]
    files += [f for sub in sorted(d.iterdir()) if sub.is_dir() and sub.name not in ("train", "test")
              for f in sorted(sub.iterdir()) if f.is_file()]
    return (part,) + tuple((str(f.relative_to(d)), f.stat().st_size, f.stat().st_mtime_ns) for f in files)


def _read_jsonl(path: Path, file_key: str, text_key: str) -> dict[str, list[str]]:
    """A captions.jsonl / metadata.jsonl -> {file name: [captions]} in order of first appearance."""
    captions: dict[str, list[str]] = {}
    example = f'{{"{file_key}": "x.png", "{text_key}": "a non-empty text"}}'
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e}); each line must be {example}") from e
        if not isinstance(entry, dict) or not isinstance(entry.get(file_key), str) \
                or not isinstance(entry.get(text_key), str) or not entry[text_key].strip():
            raise ValueError(f"{path}:{lineno}: expected {example}, got {line.strip()[:120]}")
        captions.setdefault(entry[file_key], []).append(entry[text_key].strip())
    return captions


def _read_txt(image: Path) -> list[str]:
    txt = image.with_suffix(".txt")
    if not txt.is_file():
        raise BadFileError(f"{image}: no caption: expected {txt.name} next to it (one caption per line) or an entry "
                           f"in captions.jsonl; add a caption, {_SKIP_HINT}")
    try:
        text = txt.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BadFileError(f"{txt}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8, "
                           f"{_SKIP_HINT}") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
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


def read_image(path: Path, image_size: int, channels: int, background: tuple[int, int, int]) -> tuple[np.ndarray, bool]:
    """One image file -> (uint8 (C, S, S), whether it was upscaled); a decoding problem is a BadFileError naming
    the file."""
    try:
        with Image.open(path) as im:
            im.load()
            small = min(im.size) < image_size
            im = ImageOps.exif_transpose(im)
            im = _resize_crop(_to_mode(im, channels, background), image_size)
    except BadFileError as e:
        raise BadFileError(f"{path}: {e}; {_SKIP_HINT}") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise BadFileError(f"{path}: cannot read image ({type(e).__name__}: {e}); the file is truncated, corrupt or "
                           f"not an image: replace or remove it, {_SKIP_HINT}") from e
    arr = np.asarray(im, dtype=np.uint8)
    return (arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)), small


def _images(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _class_dirs(d: Path) -> list[Path]:
    """Class subfolders (ImageFolder layout): only when the folder has no images of its own and no caption file."""
    if _images(d) or (d / "captions.jsonl").is_file() or (d / "metadata.jsonl").is_file():
        return []
    return [c for c in sorted(d.iterdir()) if c.is_dir() and c.name not in ("train", "test") and _images(c)]


def _entries(d: Path, template: str, names: list[str] | None = None):
    """(image path, its captions or why it has none, class index or -1) of a split folder, and the class names
    (`names`: the training split's, which a test split's class subfolders are indexed by)."""
    classes = _class_dirs(d)
    if classes:
        names = names or [c.name for c in classes]
        unknown = [c.name for c in classes if c.name not in names]
        if unknown:
            raise ValueError(f"{d}: class folder(s) {unknown} are not among the training classes {names}; "
                             "rename or remove them")
        return [(p, [template.format(c.name.replace("_", " "))], names.index(c.name))
                for c in classes for p in _images(c)], names
    for name, keys in (("captions.jsonl", ("file", "caption")), ("metadata.jsonl", ("file_name", "text"))):
        if (d / name).is_file():
            table = _read_jsonl(d / name, *keys)
            outside = [f for f in table if not (d / f).resolve().is_relative_to(d.resolve())]
            if outside:
                raise ValueError(f"{d / name}: entry {outside[0]!r} points outside {d}; name files inside the folder "
                                 "(relative paths without ..)")
            out = [(d / f, caps, -1) for f, caps in table.items()]
            out += [(p, BadFileError(f"{p}: no caption: {name} has no entry with \"{keys[0]}\": \"{p.name}\"; "
                                     f"add one, {_SKIP_HINT}"), -1) for p in _images(d) if p.name not in table]
            return out, []
    out = []
    for p in _images(d):
        try:
            out.append((p, _read_txt(p), -1))
        except BadFileError as e:
            out.append((p, e, -1))
    return out, []


def _hold_out(entries: list, d: Path, part: str, seed: int) -> list:
    """The images of `part` ("kept" / "held-out"): the held-out ones are those with the smallest seeded hash of
    their path inside the folder (5%, at most 1,000)."""
    k = min(HOLDOUT_MAX, int(len(entries) * HOLDOUT_FRACTION)) if len(entries) >= HOLDOUT_MIN_IMAGES else 0
    if part == "held-out" and k == 0:
        raise FileNotFoundError(f"image folder {d} has {len(entries)} images and no test/ subfolder: too few to "
                                f"hold out a test split (needs {HOLDOUT_MIN_IMAGES}); add images or a test/ folder")

    def key(entry) -> bytes:
        return hashlib.sha256(f"{seed}:{entry[0].relative_to(d).as_posix()}".encode()).digest()
    held = set(sorted(range(len(entries)), key=lambda i: key(entries[i]))[:k])
    return [e for i, e in enumerate(entries) if (i in held) == (part == "held-out")]


def _channels(paths: list[Path], channels: int | str) -> int:
    """3 or 1 as asked; "auto": 1 when every readable image is grayscale (by its header), else 3."""
    if channels in (1, 3):
        return channels
    if channels != "auto":
        raise ValueError(f"channels must be 1 (grayscale), 3 (RGB) or 'auto', got {channels!r}")
    for p in paths:
        try:
            with Image.open(p) as im:
                if im.mode not in GRAY_MODES:
                    return 3
        except Exception:  # unreadable files are reported by read_image
            continue
    return 1


def load_folder(path: str | os.PathLike, split: str = "train", image_size: int = 32, channels: int | str = "auto",
                skip_bad: bool = False, background: str = "black", template: str = DEFAULT_TEMPLATE,
                holdout_seed: int = 0) -> ImageDataset:
    """Load an image folder (see the module docstring). Labels: {"class"} for class subfolders, else none."""
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {sorted(BACKGROUNDS)}, got {background!r}")
    if template.count("{}") != 1:
        raise ValueError(f"prompt template {template!r} must contain {{}} once (where the class name goes)")
    d, part = split_source(path, split)
    train_dir = split_source(path, "train")[0]
    names = [c.name for c in _class_dirs(train_dir)] if train_dir != d else None
    entries, class_names = _entries(d, template, names or None)
    if part != "all":
        entries = _hold_out(entries, d, part, holdout_seed)
    channels = _channels([p for p, _, _ in entries], channels)
    images, captions, labels, bad, upscaled = [], [], [], [], 0
    for p, caps, label in entries:
        try:
            if isinstance(caps, BadFileError):
                raise caps
            if not p.is_file():
                raise BadFileError(f"{p}: listed in {d.name}'s caption file but the file does not exist; fix the "
                                   f"entry, {_SKIP_HINT}")
            img, small = read_image(p, image_size, channels, BACKGROUNDS[background])
        except BadFileError as e:
            if not skip_bad:
                raise
            warnings.warn(f"skipping {e}", stacklevel=2)
            bad.append(str(p))
            continue
        images.append(img)
        captions.append(caps)
        labels.append(label)
        upscaled += small
    if not images:
        raise ValueError(f"image folder {d} has no usable captioned images"
                         f"{f' ({len(bad)} skipped)' if bad else ''}; expected x.png + x.txt, captions.jsonl, "
                         "metadata.jsonl or class subfolders")
    if upscaled:
        warnings.warn(f"{d}: {upscaled} of {len(images)} images are smaller than {image_size} pixels on their "
                      f"shorter side and were upscaled (blurrier); use --image-size {image_size // 2} or larger "
                      "images", stacklevel=2)

    def captioner(i: int, rng: random.Random | None) -> str:
        return captions[i][0] if rng is None else rng.choice(captions[i])

    lab = {"class": torch.tensor(labels, dtype=torch.int64)} if class_names else {}
    held = {"held_out": {"fraction": HOLDOUT_FRACTION, "max": HOLDOUT_MAX, "seed": holdout_seed,
                         "rule": "smallest sha256(seed:relative path)"}} if part != "all" else {}
    return ImageDataset(name=f"folder:{d}", images=torch.from_numpy(np.stack(images)), labels=lab,
                        label_names={"class": class_names} if class_names else {}, captioner=captioner,
                        skipped=len(bad), meta={"skipped_files": bad, "split": split, "upscaled": upscaled, **held})
