"""`ldmkit data preview DATA --out grid.png`: a grid of dataset images, each upscaled with its caption under it."""

from __future__ import annotations

import argparse
import math
import random
import sys
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ldmkit.data import default_spec, load_dataset
from ldmkit.images import save_png

TILE = 160  # minimum tile width in pixels, so a caption of ~25 characters per line fits under each image
FONT_SIZE = 11
PAD = 4
SHEET_RGB = (225, 225, 225)  # light gray, so white image backgrounds stay visible


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable bundled font (Pillow >= 10.1)
    except TypeError:  # pragma: no cover - older Pillow: fixed bitmap font
        return ImageFont.load_default()


def caption_grid(images: np.ndarray, captions: list[str], cols: int | None = None) -> np.ndarray:
    """(N, C, H, W) uint8 images + N captions -> one (H', W', 3) uint8 image with each caption under its image."""
    n, c, h, w = images.shape
    scale = max(1, math.ceil(TILE / w))  # nearest-neighbour upscale keeps pixels crisp and text legible
    tw, th = w * scale, h * scale
    font = _font(FONT_SIZE)
    chars = max(8, int(tw / (FONT_SIZE * 0.6)))
    wrapped = [textwrap.wrap(t, chars)[:5] or [""] for t in captions]
    line_h = FONT_SIZE + 3
    text_h = line_h * max(len(lines) for lines in wrapped) + PAD
    cols = cols or max(1, min(n, math.ceil(math.sqrt(n))))
    rows = math.ceil(n / cols)
    sheet = Image.new("RGB", (cols * (tw + PAD) + PAD, rows * (th + text_h + PAD) + PAD), SHEET_RGB)
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        r, col = divmod(i, cols)
        x, y = PAD + col * (tw + PAD), PAD + r * (th + text_h + PAD)
        arr = images[i].transpose(1, 2, 0)
        tile = Image.fromarray(arr[..., 0] if c == 1 else arr).convert("RGB")
        sheet.paste(tile.resize((tw, th), Image.Resampling.NEAREST), (x, y))
        for k, line in enumerate(wrapped[i]):
            draw.text((x + 1, y + th + 2 + k * line_h), line, fill=(0, 0, 0), font=font)
    return np.asarray(sheet)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="ldmkit data preview",
                                description="Write a grid of dataset images with their captions (a labelled PNG).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data", metavar="DATA",
                   help="fashion-mnist | shapes | folder:PATH | auto (fashion-mnist if installed, else shapes)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--num", type=int, default=64, help="number of images (a seeded random sample)")
    p.add_argument("--split", default="train", help="train | test (shapes also: heldout)")
    p.add_argument("--data-dir", default=None, help="folder with the four Fashion-MNIST idx .gz files")
    p.add_argument("--image-size", type=int, default=32, help="model resolution the dataset is loaded at")
    p.add_argument("--cols", type=int, default=None, help="images per row (default: square grid)")
    p.add_argument("--seed", type=int, default=0, help="seeds which images are shown and their caption wordings")
    p.add_argument("--canonical", action="store_true", help="show each image's canonical caption, not a random one")
    p.add_argument("--skip-bad", action="store_true", help="folder data: warn and skip unreadable files")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.out.lower().endswith(".png"):
        print(f"ldmkit data preview: --out must be a .png file, got {args.out!r}", file=sys.stderr)
        return 2
    if args.num < 1:
        print(f"ldmkit data preview: --num must be >= 1, got {args.num}", file=sys.stderr)
        return 2
    spec = default_spec(args.data_dir) if args.data == "auto" else args.data
    kw = {"skip_bad": True} if args.skip_bad and spec.startswith("folder:") else {}
    try:
        ds = load_dataset(spec, split=args.split, data_dir=args.data_dir, image_size=args.image_size, **kw)
    except (ValueError, FileNotFoundError) as e:
        print(f"ldmkit data preview: {e}", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    idx = sorted(rng.sample(range(len(ds)), min(args.num, len(ds))))
    captions = [ds.caption(i, None if args.canonical else rng) for i in idx]
    save_png(caption_grid(ds.images[idx].numpy(), captions, args.cols), args.out)
    c, h, w = ds.images.shape[1:]
    print(f"wrote {args.out}: {len(idx)} of {len(ds)} images from {ds.name} ({c}x{h}x{w})"
          + (f", {ds.skipped} files skipped" if ds.skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
