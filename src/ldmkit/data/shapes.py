"""Captioned shapes: a synthetic RGB dataset generated deterministically from a seed, no files needed.

Each image shows one shape (6 kinds) in one of 6 colours, 3 sizes and 9 grid positions on one of 4 backgrounds,
with a small seeded jitter of centre and size. Shapes are drawn as signed distance fields evaluated at pixel
centres for a whole batch at once (numpy), antialiased with coverage = clip(0.5 - distance, 0, 1): 20k images
at 32x32 take about a second.

Splits (the held-out rule):
- A set of held-out (shape, colour) combinations, by default a fixed 20% of the 36 pairs chosen by
  `heldout_seed` (each shape and colour keeps at least one training combination), is never drawn for "train".
- "test" draws all 36 combinations uniformly (held-out ones included); "heldout" draws only held-out ones.
- Each split uses its own random stream of `seed`, so test images are not copies of training images.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from ldmkit.data.base import ImageDataset
from ldmkit.data.shape_captions import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, shape_caption

COLOR_RGB = {"red": (220, 50, 47), "green": (46, 160, 67), "blue": (38, 99, 235),
             "yellow": (250, 204, 21), "purple": (147, 51, 234), "orange": (249, 115, 22)}
BACKGROUND_RGB = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128), "navy": (20, 30, 80)}
SIZE_FRACTION = [0.09, 0.13, 0.18]  # shape "radius" as a fraction of the image side, per size
GRID_FRACTION = [0.22, 0.5, 0.78]  # centre of the grid rows / columns as a fraction of the image side
JITTER = 0.025  # centre jitter, fraction of the image side (uniform +-)
SIZE_JITTER = 0.08  # relative radius jitter (uniform +-)
DEFAULT_NUM = {"train": 20000, "test": 2000, "heldout": 2000}
SPLITS = {"train": 0, "test": 1, "heldout": 2}  # split -> stream id mixed into the seed


# ----------------------------------------------------------------------------- signed distances (pixels)
def _box(x, y, bx, by):
    """Signed distance to an axis-aligned box with half-sides (bx, by)."""
    qx, qy = np.abs(x) - bx, np.abs(y) - by
    outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2)
    return outside + np.minimum(np.maximum(qx, qy), 0)


def _circle(x, y, r):
    return np.sqrt(x * x + y * y) - r


def _square(x, y, r):
    return _box(x, y, 0.85 * r, 0.85 * r)


def _diamond(x, y, r):
    return (np.abs(x) + np.abs(y) - 1.2 * r) / np.sqrt(2)


def _triangle(x, y, r):
    """Equilateral triangle pointing up (image y grows downwards), circumradius 1.2 r, as 3 half-planes."""
    h = 0.6 * r  # inradius = circumradius / 2
    s, c = np.sqrt(3) / 2, -0.5
    return np.maximum(np.maximum(y, s * x + c * y), -s * x + c * y) - h


def _star(x, y, r):
    """Five-pointed star pointing up: fold the angle into one half-spike, distance to its edge line."""
    outer, inner = 1.25 * r, 0.5 * 1.25 * r
    half = np.pi / 5
    phi = np.mod(np.arctan2(y, x) + np.pi / 2, 2 * half)  # 0 at an outer vertex
    phi = half - np.abs(phi - half)  # fold: 0 at outer vertex, pi/5 at inner vertex
    rho = np.sqrt(x * x + y * y)
    px, py = rho * np.cos(phi), rho * np.sin(phi)
    ax, ay, bx, by = outer, 0.0, inner * np.cos(half), inner * np.sin(half)
    ex, ey = bx - ax, by - ay
    norm = np.sqrt(ex * ex + ey * ey)
    return -(ex * (py - ay) - ey * (px - ax)) / norm  # negative on the centre's side of edge A-B


def _cross(x, y, r):
    return np.minimum(_box(x, y, r, 0.33 * r), _box(x, y, 0.33 * r, r))


SDF = {"circle": _circle, "square": _square, "triangle": _triangle, "diamond": _diamond, "star": _star,
       "cross": _cross}


def draw(shape: np.ndarray, color: np.ndarray, size: np.ndarray, position: np.ndarray, background: np.ndarray,
         jitter: np.ndarray, image_size: int = 32) -> np.ndarray:
    """Render scenes from attribute indices (n,) and jitter (n, 3) in [-1, 1] -> uint8 (n, 3, S, S)."""
    n, s = len(shape), image_size
    out = np.empty((n, 3, s, s), np.uint8)
    coord = (np.arange(s, dtype=np.float32) + 0.5)  # pixel centres
    fg_rgb = np.array([COLOR_RGB[c] for c in COLORS], np.float32)
    bg_rgb = np.array([BACKGROUND_RGB[b] for b in BACKGROUNDS], np.float32)
    chunk = max(1, (1 << 21) // (s * s))
    for k, name in enumerate(SHAPES):
        idx = np.flatnonzero(shape == k)
        for start in range(0, len(idx), chunk):
            i = idx[start:start + chunk]
            row, col = np.divmod(position[i], 3)
            cy = (np.take(GRID_FRACTION, row) + JITTER * jitter[i, 0]) * s  # (m,)
            cx = (np.take(GRID_FRACTION, col) + JITTER * jitter[i, 1]) * s
            r = np.take(SIZE_FRACTION, size[i]) * (1 + SIZE_JITTER * jitter[i, 2]) * s
            x = coord[None, None, :] - cx[:, None, None].astype(np.float32)  # (m, 1, S)
            y = coord[None, :, None] - cy[:, None, None].astype(np.float32)  # (m, S, 1)
            x, y = np.broadcast_arrays(x, y)
            d = SDF[name](x, y, r[:, None, None].astype(np.float32))  # (m, S, S) distance in pixels
            cover = np.clip(0.5 - d, 0, 1)[:, None]  # (m, 1, S, S) antialiased coverage
            bg = bg_rgb[background[i]][:, :, None, None]
            fg = fg_rgb[color[i]][:, :, None, None]
            out[i] = np.rint(bg + (fg - bg) * cover).astype(np.uint8)
    return out


# ----------------------------------------------------------------------------- held-out combinations
def heldout_pairs(seed: int = 0, fraction: float = 0.2) -> list[tuple[str, str]]:
    """A fixed, seed-determined set of (shape, colour) pairs to hold out of training.

    round(fraction * 36) pairs, drawn in a seeded random order, skipping any pair that would leave a shape or a
    colour with no training combination.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {fraction}")
    want = round(fraction * len(SHAPES) * len(COLORS))
    rng = np.random.default_rng([seed, 7919])
    held: list[tuple[int, int]] = []
    for p in rng.permutation(len(SHAPES) * len(COLORS)):
        if len(held) == want:
            break
        s, c = divmod(int(p), len(COLORS))
        if sum(h[0] == s for h in held) < len(COLORS) - 1 and sum(h[1] == c for h in held) < len(SHAPES) - 1:
            held.append((s, c))
    return [(SHAPES[s], COLORS[c]) for s, c in sorted(held)]


def _pair_indices(pairs) -> list[tuple[int, int]]:
    """Validate (shape, colour) name pairs -> index pairs."""
    out = []
    for pair in pairs:
        if isinstance(pair, str) or len(pair) != 2 or pair[0] not in SHAPES or pair[1] not in COLORS:
            raise ValueError(f"held-out combination {pair!r} must be a (shape, colour) pair with shape in {SHAPES} "
                             f"and colour in {COLORS}, e.g. ('circle', 'red')")
        out.append((SHAPES.index(pair[0]), COLORS.index(pair[1])))
    return sorted(set(out))


# ----------------------------------------------------------------------------- dataset
def sample_attributes(split: str, num: int, seed: int, held: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    """Draw attribute indices (and jitter) for `num` scenes of a split under the held-out rule."""
    allowed_all = [(s, c) for s in range(len(SHAPES)) for c in range(len(COLORS))]
    pool = {"train": [p for p in allowed_all if p not in held], "test": allowed_all, "heldout": held}[split]
    if not pool:
        raise ValueError(f"shapes split {split!r} has no (shape, colour) combination to draw: held-out list is "
                         f"{'empty' if split == 'heldout' else 'every pair'}")
    rng = np.random.default_rng([seed, SPLITS[split]])
    pair = np.asarray(pool)[rng.integers(len(pool), size=num)]
    return {"shape": pair[:, 0], "color": pair[:, 1],
            "size": rng.integers(len(SIZES), size=num), "position": rng.integers(len(POSITIONS), size=num),
            "background": rng.integers(len(BACKGROUNDS), size=num), "jitter": rng.uniform(-1, 1, size=(num, 3))}


def load_shapes(split: str = "train", image_size: int = 32, num: int | None = None, seed: int = 0,
                heldout=None, heldout_fraction: float = 0.2, heldout_seed: int = 0) -> ImageDataset:
    """Generate the captioned shapes dataset (see the module docstring for the split rule).

    num: number of images (default 20000 train / 2000 test / 2000 heldout); seed: image stream;
    heldout: explicit list of (shape, colour) names, or None for `heldout_pairs(heldout_seed, heldout_fraction)`.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown shapes split {split!r}; choose one of {sorted(SPLITS)}")
    if image_size < 8:
        raise ValueError(f"shapes image_size must be >= 8 pixels, got {image_size}")
    num = DEFAULT_NUM[split] if num is None else int(num)
    if num < 1:
        raise ValueError(f"shapes num must be >= 1, got {num}")
    held = _pair_indices(heldout_pairs(heldout_seed, heldout_fraction) if heldout is None else heldout)
    a = sample_attributes(split, num, seed, held)
    keys = ["shape", "color", "size", "position", "background"]
    images = draw(*(a[k] for k in keys), a["jitter"], image_size)
    lab = {k: a[k].astype(np.int64) for k in keys}

    def captioner(i: int, rng: random.Random | None) -> str:
        return shape_caption(*(int(lab[k][i]) for k in keys), rng=rng)

    names = {"shape": SHAPES, "color": COLORS, "size": SIZES, "position": POSITIONS, "background": BACKGROUNDS}
    return ImageDataset(
        name=f"shapes/{split}", images=torch.from_numpy(images),
        labels={k: torch.from_numpy(v) for k, v in lab.items()}, label_names={k: list(v) for k, v in names.items()},
        captioner=captioner, meta={"heldout": [(SHAPES[s], COLORS[c]) for s, c in held], "seed": seed,
                                   "jitter": a["jitter"], "image_size": image_size})


def redraw(ds: ImageDataset, idx, **changes) -> torch.Tensor:
    """Scenes `idx` of a shapes dataset drawn again with some attributes replaced (arrays or ints, e.g.
    shape=...), the same jitter otherwise: uint8 (n, 3, S, S). With no changes it reproduces ds.images[idx]."""
    if "jitter" not in ds.meta:
        raise ValueError(f"{ds.name} is not a generated shapes dataset: its scenes cannot be redrawn")
    idx = np.asarray(idx, dtype=np.int64)
    keys = ["shape", "color", "size", "position", "background"]
    unknown = set(changes) - set(keys)
    if unknown:
        raise ValueError(f"redraw: unknown attributes {sorted(unknown)}; use {keys}")
    values = [np.broadcast_to(np.asarray(changes[k]), idx.shape) if k in changes else ds.labels[k].numpy()[idx]
              for k in keys]
    return torch.from_numpy(draw(*values, ds.meta["jitter"][idx], ds.meta["image_size"]))
