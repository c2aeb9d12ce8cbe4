"""Own images end to end through the CLI: a 64x64 RGB folder of class subfolders becomes a pipeline that samples,
and bad folders end in one line naming the problem (never a traceback)."""

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ldmkit.cli import main as cli

COLOURS = {"red_disc": (220, 40, 40), "blue_box": (40, 60, 220), "green_bar": (40, 200, 60)}


def image_folder(root, per_class: int = 10, size: int = 80):
    """Class subfolders of slightly different drawings (larger than 64 pixels: resized and centre-cropped)."""
    rng = np.random.default_rng(0)
    for k, (name, rgb) in enumerate(COLOURS.items()):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            im = Image.new("RGB", (size, size + 10), tuple(int(v) for v in rng.integers(0, 60, 3)))
            x, y = (int(v) for v in rng.integers(10, 40, 2))
            box = [x, y, x + 30, y + (30 if k < 2 else 10)]
            (ImageDraw.Draw(im).ellipse if k == 0 else ImageDraw.Draw(im).rectangle)(box, fill=rgb)
            im.save(root / name / f"{i:03d}.png")


@pytest.mark.slow
def test_class_folder_at_64_pixels_trains_and_samples(tmp_path, capsys):
    image_folder(tmp_path / "imgs", per_class=14)
    out = tmp_path / "pipe"
    assert cli(["train", "pipeline", "--preset", "tiny", "--data", f"folder:{tmp_path / 'imgs'}", "--image-size",
                "64", "--out", str(out), "--no-progress"]) == 0
    spec = json.loads((out / "pipeline.json").read_text())
    assert spec["image"]["size"] == [64, 64] and spec["image"]["channels"] == 3
    assert spec["data_options"]["image_size"] == 64 and "classifier" in spec["stages"]  # class labels: classifier
    assert spec["classes"] == ["blue_box", "green_bar", "red_disc"]
    cfg = json.loads((out / "clip" / "config.json").read_text())
    assert cfg["model"]["vision"]["image_size"] == 64
    assert cli(["sample", str(out), "--prompt", "a photo of a red disc", "--num", "3", "--steps", "2",
                "--out", str(tmp_path / "s.npz")]) == 0
    with np.load(tmp_path / "s.npz", allow_pickle=False) as f:
        assert f["images"].shape == (3, 64, 64, 3) and f["images"].dtype == np.uint8
        assert f["labels"].tolist() == [2, 2, 2]  # classes sorted: blue_box, green_bar, red_disc
    assert cli(["eval", str(tmp_path / "s.npz"), "--reference", f"folder:{tmp_path / 'imgs'}", "--pipeline", str(out),
                "--out", str(tmp_path / "e.json")]) == 0
    scores = json.loads((tmp_path / "e.json").read_text())
    assert scores["n_samples"] == 3 and scores["n_reference"] == 2  # 5% of 42 images held out
    for key in ("fd", "fd_floor", "kid", "kid_floor", "precision", "recall", "clip_score", "clip_score_floor"):
        assert np.isfinite(scores[key]), key


@pytest.mark.parametrize("case", ["empty", "missing-caption", "too-small-for-test", "bad-size"])
def test_bad_folders_end_in_one_line(tmp_path, capsys, case):
    d = tmp_path / "imgs"
    d.mkdir()
    args = ["train", "pipeline", "--data", f"folder:{d}", "--out", str(tmp_path / "p"), "--no-progress"]
    if case == "missing-caption":
        Image.new("RGB", (40, 40)).save(d / "lonely.png")
    if case == "too-small-for-test":  # five images train, but cannot spare a test split
        for i in range(5):
            Image.new("RGB", (40, 40)).save(d / f"{i}.png")
            (d / f"{i}.txt").write_text("a caption")
        args = ["data", "preview", f"folder:{d}", "--split", "test", "--out", str(tmp_path / "p.png")]
    if case == "bad-size":
        args += ["--image-size", "48"]
    assert cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    want = {"empty": "no usable captioned images", "missing-caption": "lonely.png",
            "too-small-for-test": "too few to hold out a test split", "bad-size": "--image-size 48"}[case]
    assert want in err[0]


def test_stage_commands_take_the_image_size_of_the_preset_or_autoencoder(tmp_path):
    """`--data` and the resolution mean the same in every stage command: a *-64 preset trains at 64 pixels, a stage
    on an autoencoder at the autoencoder's size, and a contradicting --image-size is refused by name."""
    import argparse

    from ldmkit.train.args import image_size_of
    ns = argparse.Namespace
    assert image_size_of(ns(image_size=None, preset="folder-64")) == 64
    assert image_size_of(ns(image_size=None, preset="folder")) == 32
    assert image_size_of(ns(image_size=48, preset="folder")) == 48
    with pytest.raises(ValueError, match="--image-size 32 differs from the 64 pixels of --preset folder-64"):
        image_size_of(ns(image_size=32, preset="folder-64"))
    ae = tmp_path / "ae"
    ae.mkdir()
    (ae / "config.json").write_text(json.dumps({"stage": "autoencoder", "data_options": {"image_size": 64}}))
    (ae / "model.safetensors").write_bytes(b"")
    assert image_size_of(ns(image_size=None, preset="fashion-mnist", autoencoder=str(ae))) == 64
    with pytest.raises(ValueError, match=f"differs from the 64 pixels of the autoencoder in {ae}"):
        image_size_of(ns(image_size=32, preset="fashion-mnist", autoencoder=str(ae)))
    with pytest.raises(ValueError, match="--image-size 4 must lie in 8..1024"):
        image_size_of(ns(image_size=4, preset="folder"))
