"""Image folders in the layouts users already have: metadata.jsonl, class subfolders, held-out splits, warnings."""

import json

import pytest
from PIL import Image

from ldmkit.data.folder import load_folder


# ----------------------------------------------------------------------------- folder layouts users already have
def _png(path, value, size=(12, 10), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def test_folder_metadata_jsonl_huggingface_layout(tmp_path):
    _png(tmp_path / "a.png", (9, 9, 9))
    _png(tmp_path / "b.png", (200, 0, 0))
    rows = [{"file_name": "b.png", "text": "a red square", "extra": 1}, {"file_name": "a.png", "text": "dark"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_folder(tmp_path, image_size=8)
    assert [ds.caption(0), ds.caption(1)] == ["a red square", "dark"] and int(ds.images[0, 0, 0, 0]) == 200
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:1.*\"text\""):
        load_folder(tmp_path, image_size=8)


def test_folder_class_subfolders_give_prompts_and_labels(tmp_path):
    for k in range(3):
        _png(tmp_path / "train" / "ankle_boot" / f"{k}.png", (k, 0, 0))
        _png(tmp_path / "train" / "bag" / f"{k}.png", (0, k, 0))
    _png(tmp_path / "test" / "bag" / "t.png", (0, 7, 0))
    ds = load_folder(tmp_path, image_size=8, template="a picture of a {}")
    assert ds.label_names == {"class": ["ankle_boot", "bag"]}
    assert ds.labels["class"].tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.caption(0) == "a picture of a ankle boot" and ds.caption(5) == "a picture of a bag"
    test = load_folder(tmp_path, "test", image_size=8)
    assert test.labels["class"].tolist() == [1] and test.label_names == ds.label_names  # indexed like train
    _png(tmp_path / "test" / "cat" / "c.png", (1, 1, 1))
    with pytest.raises(ValueError, match=r"\['cat'\].*training classes"):
        load_folder(tmp_path, "test", image_size=8)


def test_folder_without_test_split_holds_out_a_seeded_five_percent(tmp_path):
    import hashlib
    for i in range(40):
        _png(tmp_path / f"{i:02d}.png", i, mode="L")
        (tmp_path / f"{i:02d}.txt").write_text(f"image {i:02d}\n")
    train, test = load_folder(tmp_path, "train", image_size=8), load_folder(tmp_path, "test", image_size=8)
    assert (len(train), len(test)) == (38, 2) and train.channels == 1  # grayscale files -> one channel
    held = {test.caption(i) for i in range(len(test))}
    assert held.isdisjoint(train.caption(i) for i in range(len(train)))
    assert test.meta["held_out"]["fraction"] == 0.05
    rank = sorted(range(40), key=lambda i: hashlib.sha256(f"0:{i:02d}.png".encode()).digest())  # the stated rule
    assert held == {f"image {i:02d}" for i in rank[:2]}
    other = load_folder(tmp_path, "test", image_size=8, holdout_seed=1)
    rank1 = sorted(range(40), key=lambda i: hashlib.sha256(f"1:{i:02d}.png".encode()).digest())
    assert {other.caption(i) for i in range(2)} == {f"image {i:02d}" for i in rank1[:2]} != held


def test_folder_too_small_for_a_test_split_says_so(tmp_path):
    for i in range(5):
        _png(tmp_path / f"{i}.png", (i, i, i))
        (tmp_path / f"{i}.txt").write_text("x")
    assert len(load_folder(tmp_path, image_size=8)) == 5  # all of it trains
    with pytest.raises(FileNotFoundError, match="5 images and no test/ subfolder"):
        load_folder(tmp_path, "test", image_size=8)


def test_folder_upscaling_warns_and_empty_folder_is_one_line(tmp_path):
    _png(tmp_path / "small.png", (1, 2, 3), size=(6, 6))
    (tmp_path / "small.txt").write_text("tiny")
    with pytest.warns(UserWarning, match="1 of 1 images are smaller than 16 pixels"):
        load_folder(tmp_path, image_size=16)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no usable captioned images.*class subfolders"):
        load_folder(empty, image_size=8)
