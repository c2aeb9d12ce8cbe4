"""Datasets: generated shapes, Fashion-MNIST idx loading, captioned image folders, captions and the preview CLI."""

from __future__ import annotations

import gzip
import io
import json
import random
import re
import struct
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.data import (
    FASHION_CLASSES,
    HELDOUT_TEMPLATES,
    TRAIN_TEMPLATES,
    captions_for_label,
    clear_cache,
    fashion_prompt,
    load_dataset,
    parse_class,
    to_float,
    to_uint8,
)
from ldmkit.data.fashion import load_fashion
from ldmkit.data.folder import load_folder
from ldmkit.data.shape_captions import BACKGROUNDS, COLORS, SHAPE_WORDS, SHAPES, SIZE_WORDS
from ldmkit.data.shapes import BACKGROUND_RGB, COLOR_RGB, heldout_pairs, load_shapes


def words(text: str, vocab) -> set[str]:
    """Which entries of vocab occur in text as whole words."""
    return {w for w in vocab if re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", text)}


# ----------------------------------------------------------------------------- shapes
def test_shapes_deterministic_and_seeded():
    a, b = load_shapes("train", num=300, seed=3), load_shapes("train", num=300, seed=3)
    assert torch.equal(a.images, b.images)
    assert all(torch.equal(a.labels[k], b.labels[k]) for k in a.labels)
    c = load_shapes("train", num=300, seed=4)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (300, 3, 32, 32) and a.images.dtype == torch.uint8
    assert set(a.labels) == {"shape", "color", "size", "position", "background"}
    for k, names in a.label_names.items():
        assert int(a.labels[k].max()) < len(names)
    assert load_shapes("test", image_size=48, num=5).images.shape == (5, 3, 48, 48)


def test_shapes_pixels_match_labels():
    """Colour, background, grid cell and size read back from the pixels agree with the labels."""
    ds = load_shapes("test", num=400, seed=1)
    areas = {}
    for i in range(len(ds)):
        img = ds.images[i].permute(1, 2, 0).numpy().astype(int)  # (H, W, 3)
        lab = {k: int(v[i]) for k, v in ds.labels.items()}
        bg = np.array(BACKGROUND_RGB[BACKGROUNDS[lab["background"]]])
        fg = np.array(COLOR_RGB[COLORS[lab["color"]]])
        assert (img[0, 0] == bg).all() or (img[-1, -1] == bg).all()
        fg_mask = (img != bg).any(-1)
        assert (img[fg_mask] == fg).all(-1).sum() >= 2, "the shape's interior has its exact colour"
        ys, xs = np.nonzero(fg_mask)
        row, col = divmod(lab["position"], 3)
        assert int(ys.mean() // (32 / 3)) == row and int(xs.mean() // (32 / 3)) == col
        cover = ((img - bg) @ (fg - bg)) / ((fg - bg) @ (fg - bg))
        areas.setdefault((lab["shape"], lab["size"]), []).append(cover.sum())
    for s in range(len(SHAPES)):
        med = [np.median(areas[(s, z)]) for z in range(3) if (s, z) in areas]
        assert med == sorted(med) and len(med) == 3, f"{SHAPES[s]}: area grows with size"


def test_shape_geometry_at_high_resolution():
    ds = load_shapes("test", image_size=160, num=300, seed=2)
    fills = {}
    for i in range(len(ds)):
        img = ds.images[i].permute(1, 2, 0).numpy().astype(int)
        bg = np.array(BACKGROUND_RGB[BACKGROUNDS[int(ds.labels["background"][i])]])
        fg = np.array(COLOR_RGB[COLORS[int(ds.labels["color"][i])]])
        cover = ((img - bg) @ (fg - bg)) / ((fg - bg) @ (fg - bg))
        ys, xs = np.nonzero(cover > 0.5)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        name = SHAPES[int(ds.labels["shape"][i])]
        fills.setdefault(name, []).append(cover.sum() / box)
        if name == "triangle":  # points up: the top row of its box is narrower than the bottom row
            assert (cover[ys.min()] > 0.5).sum() < (cover[ys.max()] > 0.5).sum()
    assert np.median(fills["square"]) > 0.93
    assert abs(np.median(fills["circle"]) - np.pi / 4) < 0.04
    assert abs(np.median(fills["diamond"]) - 0.5) < 0.05
    assert np.median(fills["star"]) < 0.5


def test_shape_captions_varied_and_correct():
    ds = load_shapes("train", num=600, seed=0)
    rng = random.Random(0)
    caps = [ds.caption(i, rng) for i in range(len(ds))]
    assert len(set(caps)) > 550
    shape_words = {w: s for s, ws in SHAPE_WORDS.items() for w in ws}
    size_words = {w: s for s, ws in SIZE_WORDS.items() for w in ws}
    starts = Counter()
    for i, cap in enumerate(caps):
        lab = {k: ds.label_names[k][int(v[i])] for k, v in ds.labels.items()}
        assert {shape_words[w] for w in words(cap, shape_words)} == {lab["shape"]}, cap
        assert words(cap, COLORS) == {lab["color"]}, cap
        assert {size_words[w] for w in words(cap, size_words)} <= {lab["size"]}, cap
        assert words(cap, ["black", "white", "navy"]) <= {lab["background"]}, cap
        starts[cap.split()[0]] += 1
    assert len(starts) >= 5, "captions start in several different ways (varied order)"
    for i in range(50):  # the canonical caption names all five attributes
        cap = ds.caption(i)
        lab = {k: ds.label_names[k][int(v[i])] for k, v in ds.labels.items()}
        assert all(lab[k] in cap for k in lab), (cap, lab)
        assert ds.caption(i) == cap


def test_heldout_combinations():
    held = heldout_pairs(0)
    assert len(held) == round(0.2 * len(SHAPES) * len(COLORS))
    assert all(sum(h[0] == s for h in held) < len(COLORS) for s in SHAPES), "every shape keeps a train colour"
    assert all(sum(h[1] == c for h in held) < len(SHAPES) for c in COLORS), "every colour keeps a train shape"
    train = load_shapes("train", num=4000)
    assert train.meta["heldout"] == held
    pairs = {(SHAPES[s], COLORS[c]) for s, c in zip(train.labels["shape"].tolist(), train.labels["color"].tolist())}
    assert not pairs & set(held)
    assert len(pairs) == len(SHAPES) * len(COLORS) - len(held), "every other combination is trained on"
    test = load_shapes("test", num=2000)
    tpairs = {(SHAPES[s], COLORS[c]) for s, c in zip(test.labels["shape"].tolist(), test.labels["color"].tolist())}
    assert set(held) <= tpairs
    only = load_shapes("heldout", num=300)
    opairs = {(SHAPES[s], COLORS[c]) for s, c in zip(only.labels["shape"].tolist(), only.labels["color"].tolist())}
    assert opairs == set(held)
    custom = load_shapes("train", num=2000, heldout=[("circle", "red")])
    assert not ((custom.labels["shape"] == 0) & (custom.labels["color"] == 0)).any()
    with pytest.raises(ValueError, match="hexagon"):
        load_shapes("train", num=10, heldout=[("hexagon", "red")])
    with pytest.raises(ValueError, match="empty"):
        load_shapes("heldout", num=10, heldout=[])


# ----------------------------------------------------------------------------- Fashion-MNIST
def raw_idx(path) -> np.ndarray:
    """Independent idx reader: big-endian header, then bytes."""
    data = gzip.open(path).read()
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def test_fashion_mnist(fashion_dir):
    train = load_dataset("fashion-mnist", "train", data_dir=fashion_dir)
    test = load_dataset("fashion-mnist", "test", data_dir=fashion_dir)
    assert train.images.shape == (60000, 1, 32, 32) and test.images.shape == (10000, 1, 32, 32)
    assert train.images.dtype == torch.uint8 and train.channels == 1 and train.native_size == (28, 28)
    assert torch.bincount(train.labels["class"]).tolist() == [6000] * 10
    assert set(test.labels["class"].unique().tolist()) == set(range(10))
    raw = raw_idx(fashion_dir / "t10k-images-idx3-ubyte.gz")
    assert np.array_equal(test.crop(test.images)[:, 0].numpy(), raw), "crop gives back the idx images, in order"
    assert np.array_equal(test.labels["class"].numpy(), raw_idx(fashion_dir / "t10k-labels-idx1-ubyte.gz"))
    border = test.images.clone()
    border[:, :, 2:30, 2:30] = 0
    assert int(border.max()) == 0, "padding is black"
    assert bool((to_float(test.images[:8, :, :2]) == -1).all())
    nhwc = test.images[:4].permute(0, 2, 3, 1).numpy()
    assert test.crop(nhwc, channels_last=True).shape == (4, 28, 28, 1)
    assert FASHION_CLASSES[int(test.labels["class"][0])] in test.caption(0, random.Random(0))
    assert load_dataset("fashion-mnist", "train", data_dir=fashion_dir) is train, "cached in-process"


def write_idx(path, array: np.ndarray, magic: int | None = None, cut: int = 0) -> None:
    header = struct.pack(">I", magic or (0x800 + array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with gzip.open(path, "wb") as f:
        f.write(data[:len(data) - cut])


def fake_fashion(tmp_path, n=6, **broken) -> None:
    rng = np.random.default_rng(0)
    for split, m in (("train", n), ("t10k", 4)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (m, 28, 28)),
                  **broken.get(f"{split}-images", {}))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (m,)),
                  **broken.get(f"{split}-labels", {}))


def test_fashion_idx_validation(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_fashion("train", tmp_path)
    assert "apt-get install dataset-fashion-mnist" in str(e.value) and str(tmp_path) in str(e.value)
    assert "t10k-labels-idx1-ubyte.gz" in str(e.value)
    fake_fashion(tmp_path)
    ds = load_fashion("train", tmp_path)
    assert ds.images.shape == (6, 1, 32, 32)
    assert np.array_equal(ds.crop(ds.images)[:, 0].numpy(), raw_idx(tmp_path / "train-images-idx3-ubyte.gz"))
    fake_fashion(tmp_path, **{"train-images": {"cut": 100}})
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz.*truncated"):
        load_fashion("train", tmp_path)
    fake_fashion(tmp_path, **{"train-labels": {"magic": 0x803}})
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz.*magic"):
        load_fashion("train", tmp_path)
    fake_fashion(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00" * 400)[:50])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        load_fashion("test", tmp_path)
    with pytest.raises(ValueError, match="image_size must be >= 28"):
        load_fashion("train", tmp_path, image_size=16)


# ----------------------------------------------------------------------------- image folders
def save(path, im: Image.Image) -> None:
    im.save(path)
    path.with_suffix(".txt").write_text(f"caption of {path.stem}\nsecond caption of {path.stem}\n")


def good_folder(d):
    """Images in several sizes and modes, each with a .txt caption; returns the expected centre colours."""
    d.mkdir(exist_ok=True)
    stripes = np.zeros((20, 40, 3), np.uint8)  # 40 wide: blue | green | red; the centre crop keeps only green
    stripes[:, :6] = (0, 0, 255)
    stripes[:, 6:34] = (0, 255, 0)
    stripes[:, 34:] = (255, 0, 0)
    save(d / "a_stripes.png", Image.fromarray(stripes))
    save(d / "b_gray.png", Image.new("L", (100, 100), 200))
    save(d / "c_transparent.png", Image.new("RGBA", (32, 32), (255, 255, 255, 0)))
    palette = Image.new("P", (64, 48), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    save(d / "d_palette.gif", palette)
    save(d / "e_16bit.png", Image.fromarray(np.full((16, 16), 65535, np.uint16)))
    save(d / "f_photo.jpg", Image.new("RGB", (50, 70), (250, 250, 250)))
    return {"a_stripes": (0, 255, 0), "b_gray": (200, 200, 200), "c_transparent": (0, 0, 0),
            "d_palette": (10, 20, 30), "e_16bit": (255, 255, 255)}


def test_folder_modes_resize_and_captions(tmp_path):
    expect = good_folder(tmp_path / "imgs")
    ds = load_folder(tmp_path / "imgs", image_size=32)
    assert ds.images.shape == (6, 3, 32, 32) and ds.labels == {} and ds.skipped == 0
    for i, (stem, rgb) in enumerate(sorted(expect.items())):
        assert (ds.images[i].permute(1, 2, 0) == torch.tensor(rgb, dtype=torch.uint8)).all(), stem
    assert ds.caption(0) == "caption of a_stripes"
    assert {ds.caption(0, random.Random(s)) for s in range(20)} == {"caption of a_stripes",
                                                                     "second caption of a_stripes"}
    gray = load_folder(tmp_path / "imgs", image_size=16, channels=1)
    assert gray.images.shape == (6, 1, 16, 16) and int(gray.images[1].float().mean()) == 200


def test_folder_jsonl(tmp_path):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "x.png")
    Image.new("RGB", (8, 8), (4, 5, 6)).save(tmp_path / "y.png")
    lines = [{"file": "y.png", "caption": "why"}, {"file": "x.png", "caption": "ex"}, {"file": "y.png", "caption": "w"}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    ds = load_folder(tmp_path, image_size=8)
    assert [ds.caption(0), ds.caption(1)] == ["why", "ex"] and int(ds.images[0, 0, 0, 0]) == 4
    assert {ds.caption(0, random.Random(s)) for s in range(20)} == {"why", "w"}
    Image.new("RGB", (8, 8)).save(tmp_path / "z.png")
    with pytest.raises(ValueError, match="z.png"):
        load_folder(tmp_path, image_size=8)
    (tmp_path / "captions.jsonl").write_text('{"file": "x.png"}\n')
    with pytest.raises(ValueError, match=r"captions.jsonl:1"):
        load_folder(tmp_path, image_size=8)


def bad_folder(d):
    good_folder(d)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (d / "g_truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "g_truncated.txt").write_text("cut")
    (d / "h_text.png").write_text("this is not an image")
    (d / "h_text.txt").write_text("text")
    Image.new("RGB", (8, 8)).save(d / "i_nocaption.png")


@pytest.mark.parametrize("name", ["g_truncated.png", "h_text.png", "i_nocaption.png"])
def test_folder_bad_file_names_the_file(tmp_path, name):
    bad_folder(tmp_path)
    for other in {"g_truncated.png", "h_text.png", "i_nocaption.png"} - {name}:
        (tmp_path / other).unlink()
    with pytest.raises(ValueError, match=re.escape(name)) as e:
        load_folder(tmp_path)
    assert "skip_bad" in str(e.value)


def test_folder_skip_bad_counts(tmp_path):
    bad_folder(tmp_path)
    with pytest.warns(UserWarning) as record:
        ds = load_dataset(f"folder:{tmp_path}", skip_bad=True)
    assert ds.skipped == 3 and len(ds) == 6
    assert sum(any(n in str(w.message) for n in ("g_truncated", "h_text", "i_nocaption")) for w in record) == 3
    with pytest.raises(FileNotFoundError, match="test"):
        load_dataset(f"folder:{tmp_path}", split="test")


# ----------------------------------------------------------------------------- load_dataset
def test_load_dataset_validation_and_cache(tmp_path):
    with pytest.raises(ValueError) as e:
        load_dataset("mnist")
    assert "'mnist'" in str(e.value) and "fashion-mnist" in str(e.value) and "folder:PATH" in str(e.value)
    with pytest.raises(ValueError, match="nmu"):
        load_dataset("shapes", nmu=10)
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("shapes", data_dir=tmp_path, num=10)
    with pytest.raises(ValueError, match="split"):
        load_dataset("shapes", split="validation", num=10)
    a = load_dataset("shapes", num=20, heldout=[["circle", "red"]])
    assert load_dataset("shapes", num=20, heldout=[("circle", "red")]) is a
    assert load_dataset("shapes", num=21) is not a
    good_folder(tmp_path)
    first = load_dataset(f"folder:{tmp_path}")
    assert load_dataset(f"folder:{tmp_path}") is first
    Image.new("RGB", (8, 8)).save(tmp_path / "z.png")
    (tmp_path / "z.txt").write_text("new")
    assert len(load_dataset(f"folder:{tmp_path}")) == len(first) + 1, "an edited folder is re-read"
    clear_cache()


def test_float_conversions():
    x = torch.tensor([0, 1, 127, 128, 254, 255], dtype=torch.uint8)
    f = to_float(x)
    assert f[0] == -1 and f[-1] == 1 and torch.equal(to_uint8(f), x)
    with pytest.raises(TypeError):
        to_float(x.float())


# ----------------------------------------------------------------------------- captions
def test_templates_and_prompts():
    assert len(TRAIN_TEMPLATES) >= 8 and "a photo of a {}" in TRAIN_TEMPLATES
    assert len(HELDOUT_TEMPLATES) >= 5 and not set(HELDOUT_TEMPLATES) & set(TRAIN_TEMPLATES)
    assert FASHION_CLASSES == ["t-shirt", "trouser", "pullover", "dress", "coat",
                               "sandal", "shirt", "sneaker", "bag", "ankle boot"]
    assert fashion_prompt(9) == "a photo of an ankle boot" and fashion_prompt(0) == "a photo of a t-shirt"
    assert captions_for_label(3)[:2] == ["a photo of a dress", "a dress"]
    train_caps = {c for k in range(10) for c in captions_for_label(k)}
    held_caps = {c for k in range(10) for c in captions_for_label(k, HELDOUT_TEMPLATES)}
    assert not train_caps & held_caps
    with pytest.raises(ValueError):
        fashion_prompt(10)


def test_parse_class():
    for k in range(10):
        for t in TRAIN_TEMPLATES + HELDOUT_TEMPLATES:
            assert parse_class(fashion_prompt(k, t)) == k, fashion_prompt(k, t)
    cases = {"A T-Shirt": 0, "two tshirts": 0, "a shirt": 6, "Shirts!": 6, "ankle boots": 9, "boot": 9,
             "blue pants": 1, "a dress.": 3, "dresses": 3, "a t-shirt and a shirt": None, "a cat": None,
             "an overcoat": None, "a bag and a coat": None, "handbag": 8, "": None, "sneakers and more sneakers": 7}
    for prompt, want in cases.items():
        assert parse_class(prompt) == want, prompt


# ----------------------------------------------------------------------------- preview CLI
def test_preview_writes_png(tmp_path, capsys):
    from ldmkit.cli import main as cli_main
    from ldmkit.data.preview import main
    good_folder(tmp_path / "imgs")
    out = tmp_path / "grid.png"
    assert main([f"folder:{tmp_path / 'imgs'}", "--out", str(out), "--num", "4", "--cols", "2"]) == 0
    im = Image.open(out)
    assert im.format == "PNG" and im.width >= 2 * 128 and im.height > 2 * 128
    assert "4 of 6" in capsys.readouterr().out
    out2 = tmp_path / "shapes.png"
    assert cli_main(["data", "preview", "shapes", "--out", str(out2), "--num", "3", "--split", "heldout"]) == 0
    assert out2.exists()
    assert main(["nonsense", "--out", str(tmp_path / "x.png")]) == 2
    assert "nonsense" in capsys.readouterr().err


def test_data_export_writes_a_folder_that_reads_back(tmp_path):
    """`ldmkit data export shapes` writes PNG + caption files that `folder:` loads as the same images and captions."""
    from ldmkit.cli import main as cli
    out = tmp_path / "shapes64"
    assert cli(["data", "export", "shapes", "--image-size", "64", "--num", "12", "--test", "3", "--out", str(out),
                "--no-progress"]) == 0
    src = load_dataset("shapes", split="train", num=12, image_size=64)
    back = load_dataset(f"folder:{out}", split="train", image_size=64)
    assert len(back) == 12 and torch.equal(back.images, src.images)  # lossless PNG, same size: same pixels
    assert back.caption(0, None) == src.caption(0, None)  # the canonical caption is the first line
    assert len(load_dataset(f"folder:{out}", split="test", image_size=64)) == 3
    assert cli(["data", "export", "shapes", "--num", "2", "--out", str(out)]) == 2  # never into a used folder
