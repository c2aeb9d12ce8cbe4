"""Bad data, property-based: hypothesis builds image folders out of good images in every PIL mode and size beside
truncated, corrupt, zero-byte and non-image files, uncaptioned images and non-UTF-8, empty or duplicated captions.
Loading such a folder either works (every file good) or raises one BadFileError naming a bad file; with
skip_bad=True it loads the good images and counts every bad one in `skipped`; never anything else."""

import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ldmkit.data import clear_cache, load_dataset
from ldmkit.data.folder import BadFileError

MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "YCbCr"]
GOOD_KINDS = [f"good-{m}" for m in MODES] + ["good-1x1", "good-wide", "good-large", "good-duplicate-caption"]
BAD_KINDS = ["truncated", "zero-bytes", "not-an-image", "garbage-bytes", "no-caption", "caption-not-utf8",
             "caption-empty", "float-image"]


def png_bytes(mode: str, size=(12, 9), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    if mode in ("I;16", "I"):
        arr = rng.integers(0, 60000, size[::-1]).astype(np.uint16 if mode == "I;16" else np.int32)
        im = Image.fromarray(arr, mode="I;16" if mode == "I;16" else "I")
    elif mode == "F":
        im = Image.fromarray(rng.random(size[::-1]).astype(np.float32), mode="F")
    else:
        im = Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8), "RGB").convert(mode)
    buf = io.BytesIO()
    fmt = "TIFF" if mode == "F" else "JPEG" if mode in ("CMYK", "YCbCr") else "PNG"
    im.save(buf, format=fmt)
    return buf.getvalue()


def write_file(d: Path, i: int, kind: str) -> None:
    """File number i of `kind`, with its caption file where the kind has one."""
    name = f"img{i:03d}"
    caption = f"picture number {i}".encode()
    if kind.startswith("good-") and kind[5:] in MODES:
        ext = ".jpg" if kind[5:] in ("CMYK", "YCbCr") else ".png"
        (d / f"{name}{ext}").write_bytes(png_bytes(kind[5:], seed=i))
    elif kind == "good-1x1":
        (d / f"{name}.png").write_bytes(png_bytes("RGB", (1, 1), i))
    elif kind == "good-wide":
        (d / f"{name}.png").write_bytes(png_bytes("RGB", (300, 7), i))
    elif kind == "good-large":
        (d / f"{name}.png").write_bytes(png_bytes("L", (1500, 1200), i))
    elif kind == "good-duplicate-caption":
        (d / f"{name}.png").write_bytes(png_bytes("RGB", seed=i))
        caption = b"the same words\nthe same words\n"
    elif kind == "truncated":
        (d / f"{name}.png").write_bytes(png_bytes("RGB", (40, 40), i)[:60])
    elif kind == "zero-bytes":
        (d / f"{name}.png").write_bytes(b"")
    elif kind == "not-an-image":
        (d / f"{name}.jpg").write_text("this is a text file with an image extension")
    elif kind == "garbage-bytes":
        (d / f"{name}.png").write_bytes(bytes(np.random.default_rng(i).integers(0, 255, 300, dtype=np.uint8)))
    elif kind == "no-caption":
        (d / f"{name}.png").write_bytes(png_bytes("RGB", seed=i))
        return
    elif kind == "caption-not-utf8":
        (d / f"{name}.png").write_bytes(png_bytes("RGB", seed=i))
        caption = b"caf\xe9 \xff\xfe"
    elif kind == "caption-empty":
        (d / f"{name}.png").write_bytes(png_bytes("RGB", seed=i))
        caption = b"  \n\n"
    elif kind == "float-image":
        (d / f"{name}.tif").write_bytes(png_bytes("F", seed=i))
    else:
        raise AssertionError(kind)
    (d / f"{name}.txt").write_bytes(caption)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(good=st.lists(st.sampled_from(GOOD_KINDS), min_size=1, max_size=6),
       bad=st.lists(st.sampled_from(BAD_KINDS), max_size=4), order=st.randoms(use_true_random=False))
def test_a_folder_loads_or_names_a_bad_file_and_skip_bad_counts_every_one(good, bad, order):
    kinds = good + bad
    order.shuffle(kinds)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train, test = root / "train", root / "test"
        train.mkdir()
        test.mkdir()
        for i, kind in enumerate(kinds):
            write_file(train, i, kind)
        write_file(test, 999, "good-RGB")
        clear_cache()
        spec = f"folder:{root}"
        if bad:
            with pytest.raises(BadFileError) as e:
                load_dataset(spec, "train", image_size=8)
            msg = str(e.value)
            assert str(train) in msg and "\n" not in msg.strip(), msg  # names the file, one line
        else:
            ds = load_dataset(spec, "train", image_size=8)
            assert len(ds) == len(good) and ds.skipped == 0
        with pytest.warns(UserWarning) if bad else _nothing():
            ds = load_dataset(spec, "train", image_size=8, skip_bad=True)
        assert len(ds) == len(good) and ds.skipped == len(bad)
        assert ds.images.dtype.is_floating_point is False and tuple(ds.images.shape[1:]) in ((3, 8, 8), (1, 8, 8))
        for i in range(len(ds)):
            assert ds.caption(i).strip()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
