"""`ldmkit data export DATA --out DIR`: a dataset written as an image folder that `--data folder:DIR` reads back.

Each image becomes `DIR/train/00000.png` (and `DIR/test/...` with `--test N`) beside `00000.txt`, which holds its
captions one per line (the canonical wording first, then `--captions - 1` varied ones), so the generated captioned
shapes or Fashion-MNIST can stand in for a folder of one's own images:

    ldmkit data export shapes --image-size 64 --num 20000 --test 1000 --out runs/shapes64
    ldmkit data preview folder:runs/shapes64 --out preview.png
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ldmkit.checkpoint import write_bytes
from ldmkit.data import default_spec, load_dataset


def export_split(ds, out: Path, captions: int, seed: int, progress: bool) -> int:
    """Write every image of `ds` as PNG + caption file into `out`; returns how many."""
    out.mkdir(parents=True, exist_ok=True)
    native = ds.crop(ds.images).permute(0, 2, 3, 1).numpy()  # (N, H, W, C) uint8 at the native size
    digits = max(5, len(str(len(ds) - 1)))
    for i in tqdm(range(len(ds)), desc=f"export {out.name}", disable=not progress, unit="img"):
        rng = random.Random(seed * 1_000_003 + i)
        lines = [ds.caption(i, None)] + [ds.caption(i, rng) for _ in range(captions - 1)]
        img = native[i][..., 0] if native.shape[-1] == 1 else native[i]
        name = f"{i:0{digits}d}"
        Image.fromarray(np.ascontiguousarray(img)).save(out / f"{name}.png")
        write_bytes(out / f"{name}.txt", ("\n".join(dict.fromkeys(lines)) + "\n").encode())
    return len(ds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="ldmkit data export", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data", help="shapes | fashion-mnist | auto")
    p.add_argument("--out", required=True, help="folder to write (train/ and test/ inside)")
    p.add_argument("--num", type=int, default=None, help="training images (default: the whole split)")
    p.add_argument("--test", type=int, default=1000, help="test images (0: no test split)")
    p.add_argument("--image-size", type=int, default=32, help="shapes: the size the scenes are drawn at")
    p.add_argument("--captions", type=int, default=4, help="captions per image (the canonical one first)")
    p.add_argument("--seed", type=int, default=0, help="seeds the varied caption wordings")
    p.add_argument("--data-dir", default=None, help="folder with the four Fashion-MNIST idx .gz files")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    spec = default_spec(args.data_dir) if args.data == "auto" else args.data
    if spec not in ("shapes", "fashion-mnist"):
        raise ValueError(f"data export writes the built-in datasets (shapes, fashion-mnist), not {spec!r}")
    if args.captions < 1 or (args.num is not None and args.num < 1) or args.test < 0:
        raise ValueError("--captions and --num must be >= 1 and --test >= 0")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose another --out")
    kw = {"image_size": args.image_size} if spec == "shapes" else {"data_dir": args.data_dir}
    total = 0
    for split, num in (("train", args.num), ("test", args.test)):
        if num == 0:
            continue
        ds = load_dataset(spec, split=split, **kw, **({} if num is None else {"num": num}))
        total += export_split(ds, out / split, args.captions, args.seed, not args.no_progress)
    print(f"wrote {total} images with captions to {out} (train/ and test/); train on it with "
          f"--data folder:{out}", file=sys.stderr)
    return 0
