"""The CLIP stage: `ldmkit train clip` (tiny preset), resume, `ldmkit clip eval|embed|score`, and their helpers."""

import dataclasses
import json
import math
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ldmkit.cli import main as cli
from ldmkit.conditioning import retrieval_recall
from ldmkit.eval import clip_cli
from ldmkit.train import clip as clip_stage
from ldmkit.train import common


def train_args(out, *extra, data="shapes"):
    return ["train", "clip", "--data", data, "--preset", "tiny", "--out", str(out), "--no-progress", *extra]


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip") / "run"
    assert cli(train_args(out)) == 0
    return out


def test_train_writes_a_loadable_stage(shapes_run):
    from ldmkit.stages import load_clip
    for name in ("config.json", "tokenizer.json", "model.safetensors", "metrics.json"):
        assert (shapes_run / name).is_file(), name
    cfg = json.loads((shapes_run / "config.json").read_text())
    assert cfg["stage"] == "clip" and cfg["data"] == "shapes"
    assert cfg["model"]["vision"]["channels"] == 3  # taken from the data, the preset says 3 too
    metrics = json.loads((shapes_run / "metrics.json").read_text())
    assert metrics["steps_done"] == clip_stage.PRESETS["tiny"].train.steps
    assert 0 <= metrics["test_zero_shot_top1"] <= 1 and "test_position" in metrics
    model = load_clip(shapes_run)
    enc = model.text_encoder()
    cond = enc.encode(["a red circle"])
    T, width, E = cfg["model"]["text"]["max_length"], cfg["model"]["text"]["width"], cfg["model"]["embed_dim"]
    assert cond["context"].shape == (1, T, width) and enc.context_dim == width
    assert cond["context_mask"].dtype == torch.bool and cond["context_mask"].shape == (1, T)
    ids, mask = model.tokenizer(["a red circle"])
    assert torch.equal(cond["context_mask"], mask) and model.tokenizer.decode(ids[0][mask[0]]) == "a red circle"
    assert cond["pooled"].shape == (1, E) and enc.pooled_dim == E
    assert torch.allclose(cond["pooled"].norm(dim=-1), torch.ones(1), atol=1e-5)


class Stop(Exception):
    pass


def test_resume_matches_uninterrupted(shapes_run, tmp_path, monkeypatch):
    save = common.Run.save

    def save_then_stop(self, *a, **kw):
        save(self, *a, **kw)
        raise Stop

    out = tmp_path / "resumed"
    monkeypatch.setattr(common.Run, "save", save_then_stop)
    with pytest.raises(Stop):
        cli(train_args(out))
    monkeypatch.setattr(common.Run, "save", save)
    assert not (out / "metrics.json").exists()
    tokenizer = (out / "tokenizer.json").read_bytes()
    assert cli(train_args(out, "--resume")) == 0
    assert (out / "tokenizer.json").read_bytes() == tokenizer
    a, b = load_file(str(out / "model.safetensors")), load_file(str(shapes_run / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == sorted(set(rows))  # the log reads like one run


def test_eval_writes_keys_for_stage_and_pipeline_dirs(shapes_run, tmp_path, capsys):
    assert cli(["clip", "eval", str(shapes_run), "--num", "64"]) == 0
    result = json.loads((shapes_run / "eval.json").read_text())
    keys = ["zero_shot_top1", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "shape", "color", "size", "position",
            "t2i_r1_heldout", "shape_heldout", "color_heldout"]
    for k in keys:
        assert 0.0 <= result[k] <= 1.0, k
    assert result["i2t_r1"] <= result["i2t_r5"] and result["t2i_r1"] <= result["t2i_r5"]
    assert result["zero_shot_top1"] == pytest.approx(np.mean([result[a] for a in clip_cli.TOP1_ATTRIBUTES]))
    assert json.loads(capsys.readouterr().out)["clip_sha256"] == result["clip_sha256"]
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "clip").symlink_to(shapes_run, target_is_directory=True)
    (shapes_run / "eval.json").unlink()
    assert cli(["clip", "eval", str(pipe), "--num", "64"]) == 0
    assert json.loads((pipe / "clip" / "eval.json").read_text())["t2i_r1"] == result["t2i_r1"]


def test_embed_prints_unit_vectors(shapes_run, tmp_path, capsys):
    assert cli(["clip", "embed", str(shapes_run), "a red circle", "a blue star"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == ["a red circle", "a blue star"]
    vec = np.array([float(v) for v in lines[0].split("\t")[1].split()])
    assert abs(np.linalg.norm(vec) - 1) < 1e-3
    assert cli(["clip", "embed", str(shapes_run), "a red circle", "--out", str(tmp_path / "e.npy")]) == 0
    assert np.allclose(np.load(tmp_path / "e.npy")[0], vec, atol=1e-4)


def test_score_matches_cosine_by_hand(shapes_run, tmp_path, capsys):
    from ldmkit.data import load_dataset
    from ldmkit.stages import load_clip
    ds = load_dataset("shapes", split="test", num=16)
    images = ds.images.permute(0, 2, 3, 1).numpy()  # N x H x W x C uint8
    prompts = ds.captions(range(16))
    prompts[3] = "a large purple cross in the center on a gray background"
    np.savez(tmp_path / "s.npz", images=images, prompts=np.array(prompts))
    assert cli(["clip", "score", str(shapes_run), str(tmp_path / "s.npz")]) == 0
    result = json.loads((tmp_path / "s.clip.json").read_text())
    model = load_clip(shapes_run)
    with torch.no_grad():
        img, txt = model.encode_image(ds.to_float(ds.images)), model.encode_prompts(prompts)
    expected = (100 * torch.nn.functional.cosine_similarity(img, txt).clamp_min(0)).mean().item()
    assert result["n"] == 16 and result["clip_score"] == pytest.approx(expected, rel=1e-4)
    np.savez(tmp_path / "bad.npz", images=images[..., :1], prompts=np.array(prompts))
    with pytest.raises(ValueError, match="channel"):
        cli(["clip", "score", str(shapes_run), str(tmp_path / "bad.npz"), "--debug"])
    assert cli(["clip", "score", str(shapes_run), str(tmp_path / "bad.npz")]) == 2  # one line, no traceback


def test_padding_matches_the_fashion_loader(fashion_dir):
    from ldmkit.data import load_dataset
    ds = load_dataset("fashion-mnist", split="test", data_dir=fashion_dir, num=8)
    native = ds.crop(ds.images).permute(0, 2, 3, 1).numpy()  # 8 x 28 x 28 x 1
    assert torch.equal(clip_cli.to_model_resolution(native, 32, 1, "x"), ds.images)


def test_fashion_train_and_zero_shot_eval(fashion_dir, tmp_path):
    from ldmkit.conditioning import zero_shot_accuracy
    from ldmkit.data import FASHION_CLASSES, HELDOUT_TEMPLATES, fill_template, load_dataset
    from ldmkit.stages import load_clip
    out = tmp_path / "fm"
    assert cli(train_args(out, "--data-dir", str(fashion_dir), "--set", "train.steps=8", "--set",
                          "eval_images=64", data="fashion-mnist")) == 0
    assert json.loads((out / "config.json").read_text())["model"]["vision"]["channels"] == 1
    assert cli(["clip", "eval", str(out), "--data-dir", str(fashion_dir), "--num", "200"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["test_images"] == 10000 and result["retrieval_images"] == 200
    for k in ("zero_shot_top1", "zero_shot_top1_heldout", "i2t_r1", "t2i_r5", "i2t_r1_class", "t2i_r1_class"):
        assert 0.0 <= result[k] <= 1.0, k
    assert result["t2i_r1"] <= result["t2i_r1_class"]  # the same caption implies the same class
    test = load_dataset("fashion-mnist", split="test", data_dir=fashion_dir)
    reference = zero_shot_accuracy(load_clip(out), test.to_float(test.images), test.labels["class"],
                                   FASHION_CLASSES, HELDOUT_TEMPLATES, fill=fill_template)
    assert result["zero_shot_top1_heldout"] == pytest.approx(reference, abs=1e-4)


def test_retrieval_by_key_by_hand():
    e = torch.eye(3)
    img = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1, 0], [0.9, 1.0, 0], [0, 0, 1.0]]), dim=-1)
    captions = ["a", "a", "b"]  # texts 0 and 1 are the same string (and here the same vector)
    txt = torch.stack([e[0], e[0], e[2]])
    r = clip_cli.retrieval_by_key(img, txt, captions, ks=(1,))
    # image -> text over the distinct strings {a, b}: all three images rank their own string first
    assert r["i2t_r1"] == 1.0
    # text "a" finds image 0 or 1 first (both correct), text "b" finds image 2
    assert r["t2i_r1"] == 1.0
    r = clip_cli.retrieval_by_key(img, txt, ["a", "c", "b"], ks=(1,))
    assert r["t2i_r1"] == pytest.approx(2 / 3)  # text "c" (vector e0) finds image 0 first, image 1 is "c"


def test_retrieval_by_key_equals_paired_recall_for_distinct_captions():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img + 0.8 * torch.randn(40, 8, generator=g), dim=-1)
    ours = clip_cli.retrieval_by_key(img, txt, [f"c{i}" for i in range(40)])
    assert ours == pytest.approx(retrieval_recall(img, txt))


def test_augment_is_a_seeded_shift_or_mirror():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 2, 9, 9, generator=g)
    gidx = torch.arange(100, 106)
    assert torch.equal(clip_stage.augment(x, gidx, 0, 0, False), x)
    out = clip_stage.augment(x, gidx, 0, 2, True)
    pad = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    for i in range(6):
        candidates = [pad[i, :, 2 - dy:11 - dy, 2 - dx:11 - dx] for dy in range(-2, 3) for dx in range(-2, 3)]
        candidates += [c.flip(-1) for c in candidates]
        assert any(torch.equal(out[i], c) for c in candidates)
    perm = torch.tensor([5, 3, 1, 0, 2, 4])  # a draw depends on the global index, not on the batch position
    assert torch.equal(clip_stage.augment(x[perm], gidx[perm], 0, 2, True), out[perm])
    assert not torch.equal(clip_stage.augment(x, gidx, 1, 2, True), out)


def test_bad_configs_fail_loudly(tmp_path):
    from ldmkit.data import load_dataset
    tiny = clip_stage.PRESETS["tiny"]
    with pytest.raises(ValueError, match="hflip"):
        clip_stage.fit_to_data(dataclasses.replace(tiny, hflip=True), load_dataset("shapes", split="test", num=4))
    with pytest.raises(ValueError, match="tokenizer_vocab"):
        dataclasses.replace(tiny, tokenizer_vocab=4096)
    with pytest.raises(FileNotFoundError, match="--resume"):
        cli(train_args(tmp_path / "none", "--resume", "--debug"))


def test_preset_defaults_to_the_datas_own(tmp_path, monkeypatch):
    """`ldmkit train clip --data shapes` without --preset trains the shapes preset (no hflip error); fashion-mnist
    and folders keep the fashion-mnist preset; an explicit --preset wins."""
    assert clip_stage.default_preset("shapes") == "shapes"
    assert clip_stage.default_preset("fashion-mnist") == "fashion-mnist"
    assert clip_stage.default_preset("folder:/x") == "fashion-mnist"
    seen = {}
    monkeypatch.setattr(clip_stage, "train", lambda cfg, out, spec, ds, **kw: seen.update(cfg=cfg, spec=spec))
    assert cli(["train", "clip", "--data", "shapes", "--out", str(tmp_path / "a")]) == 0
    assert seen["spec"] == "shapes" and seen["cfg"] == clip_stage.PRESETS["shapes"]
    clip_stage.fit_to_data(seen["cfg"], load_dataset_small())  # no hflip contradiction
    assert cli(["train", "clip", "--data", "shapes", "--preset", "tiny", "--set", "train.steps=3",
                "--out", str(tmp_path / "b")]) == 0
    assert seen["cfg"] == dataclasses.replace(clip_stage.PRESETS["tiny"], train=dataclasses.replace(
        clip_stage.PRESETS["tiny"].train, steps=3))


def test_hard_negative_changes_one_attribute_of_the_scene():
    from ldmkit.data import load_dataset
    from ldmkit.data.shape_captions import shape_caption
    ds = load_dataset("shapes", split="test", num=200)
    keys = ("shape", "color", "size", "position", "background")
    changed = {a: 0 for a in clip_stage.HARD_NEGATIVE_ATTRIBUTES}
    for i in range(200):
        r = random.Random(i)
        state = r.getstate()
        pos = ds.caption(i, r)
        after = r.getstate()
        neg = clip_stage.hard_negative(ds, i, state, r, 1.0, pos)
        r2 = random.Random()
        r2.setstate(after)
        assert neg == clip_stage.hard_negative(ds, i, state, r2, 1.0, pos)  # seeded by the caption rng
        if neg is None:  # only a position change the caption does not mention
            continue
        assert neg != pos
        truth = {k: int(ds.labels[k][i]) for k in keys}
        matches = [(a, v) for a in clip_stage.HARD_NEGATIVE_ATTRIBUTES for v in range(len(ds.label_names[a]))
                   if v != truth[a] and neg == shape_caption(**{**truth, a: v}, rng=_with_state(state))]
        assert len(matches) >= 1, (pos, neg)  # the same wording rng, one attribute of the scene changed
        changed[matches[0][0]] += 1
    assert min(changed.values()) > 30  # all three attributes get changed
    r = random.Random(0)
    state = r.getstate()
    assert clip_stage.hard_negative(ds, 0, state, r, 0.0, "x") is None and r.getstate() == state  # p=0 draws nothing


def test_exhaustive_negatives_name_every_other_value_in_the_same_wording():
    from ldmkit.data import load_dataset
    from ldmkit.data.shape_captions import SHAPES, shape_caption
    ds = load_dataset("shapes", split="train", num=50)
    allowed = clip_stage.training_pairs(ds)
    everything = {(s, c) for s in range(6) for c in range(6)}
    short = 0
    for i in range(50):
        r = random.Random(i)
        state = r.getstate()
        pos = ds.caption(i, r)
        truth = {k: int(ds.labels[k][i]) for k in ("shape", "color", "size", "position", "background")}
        others = [v for v in range(len(SHAPES)) if v != truth["shape"]]
        negs = clip_stage.exhaustive_negatives(ds, i, state, ("shape",), everything)
        assert negs == [shape_caption(**{**truth, "shape": v}, rng=_with_state(state)) for v in others]
        assert len(set(negs)) == 5 and pos not in negs
        kept = clip_stage.exhaustive_negatives(ds, i, state, ("shape",), allowed)  # no held-out pair named
        assert kept == [n for v, n in zip(others, negs) if (v, truth["color"]) in allowed]
        short += len(kept) < 5
    assert short > 0  # some colours have a held-out shape
    assert clip_stage.exhaustive_negatives(ds, 0, random.Random(0).getstate(), (), allowed) == []
    with pytest.raises(ValueError, match="exhaustive_negatives"):
        clip_stage.CLIPStage(exhaustive_negatives=("size",))


def test_exhaustive_negatives_and_centred_start_train(tmp_path):
    assert cli(train_args(tmp_path / "ex", "--set", 'exhaustive_negatives=["shape"]', "--set", "hard_negatives=0.5",
                          "--set", "center_init=64", "--set", "eval_images=0", "--set", "train.steps=4")) == 0
    metrics = json.loads((tmp_path / "ex" / "metrics.json").read_text())
    assert metrics["steps_done"] == 4 and math.isfinite(metrics["final_loss"])


def test_lock_text_steps_keeps_the_text_tower_at_its_start(shapes_run, tmp_path):
    # the fixture's run trained both towers for the preset's 24 steps from the same seed
    assert cli(train_args(tmp_path / "locked", "--set", "lock_text_steps=1000", "--set", "eval_images=0")) == 0
    assert cli(train_args(tmp_path / "short", "--set", "lock_text_steps=1000", "--set", "eval_images=0",
                          "--set", "train.steps=6")) == 0
    free, locked = load_file(shapes_run / "model.safetensors"), load_file(tmp_path / "locked" / "model.safetensors")
    short = load_file(tmp_path / "short" / "model.safetensors")
    text = [k for k in locked if k.startswith(("text.", "text_proj."))]
    vision = [k for k in locked if k.startswith(("vision.", "image_proj."))]
    assert text and vision
    assert all(torch.equal(locked[k], short[k]) for k in text)  # 6 or 24 steps: the text tower never moved
    assert not all(torch.equal(locked[k], short[k]) for k in vision)  # while the image tower trained
    assert not all(torch.equal(locked[k], free[k]) for k in text)  # unlocked, the text tower trains


def test_shape_twins_redraw_the_scene_with_only_the_shape_changed():
    from ldmkit.data import load_dataset
    from ldmkit.data.shape_captions import shape_caption
    from ldmkit.data.shapes import redraw
    ds = load_dataset("shapes", split="train", num=300)
    assert torch.equal(redraw(ds, range(300)), ds.images)  # no change: the same pixels
    allowed = clip_stage.training_pairs(ds)
    assert len(allowed) == 36 - len(ds.meta["heldout"])
    keys = ("shape", "color", "size", "position", "background")
    for i in range(300):
        r = random.Random(i)
        state = r.getstate()
        pos = ds.caption(i, r)
        values, caption = clip_stage.shape_twin(ds, i, state, random.Random(-i), allowed)
        truth = {k: int(ds.labels[k][i]) for k in keys}
        changed = [k for k in keys if values[k] != truth[k]]
        assert changed in (["shape"], ["color"]) and (values["shape"], values["color"]) in allowed
        if changed == ["color"]:  # only when no other shape of this colour is a training pair
            assert not any((s, truth["color"]) in allowed for s in range(6) if s != truth["shape"])
        assert caption == shape_caption(**values, rng=_with_state(state)) and caption != pos
        twin = redraw(ds, [i], shape=values["shape"], color=values["color"])[0]
        assert not torch.equal(twin, ds.images[i])
    with pytest.raises(ValueError, match="shape_twins"):
        clip_stage.fit_to_data(clip_stage.CLIPStage(shape_twins=True), load_dataset_small_fashion())


def test_shape_twins_train(tmp_path):
    assert cli(train_args(tmp_path / "t", "--set", "shape_twins=true", "--set", "train.steps=3",
                          "--set", "eval_images=0")) == 0
    rows = [json.loads(r) for r in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(np.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["img_per_s"] > 0


def load_dataset_small_fashion():
    from ldmkit.data import ImageDataset
    return ImageDataset(name="folder:x", images=torch.zeros(2, 1, 32, 32, dtype=torch.uint8), labels={},
                        label_names={}, captioner=lambda i, r: "a thing")


def test_hard_negative_weights_pick_the_attribute():
    from ldmkit.data import load_dataset
    from ldmkit.data.shape_captions import SHAPE_WORDS
    ds = load_dataset("shapes", split="test", num=100)
    for i in range(100):
        r = random.Random(i)
        state = r.getstate()
        pos = ds.caption(i, r)
        neg = clip_stage.hard_negative(ds, i, state, r, 1.0, pos, weights=(1.0, 0.0, 0.0))
        truth = ds.label_names["shape"][int(ds.labels["shape"][i])]
        assert not any(w in neg.split() for w in SHAPE_WORDS[truth][:1]) and neg != pos  # only the shape moved
        assert neg.replace(" ", "") != pos.replace(" ", "")
    with pytest.raises(ValueError, match="hard_negative_weights"):
        clip_stage.CLIPStage(hard_negative_weights=(0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="hard_negative_weights"):
        clip_stage.CLIPStage(hard_negative_weights=(1.0, 1.0))


def _with_state(state):
    r = random.Random()
    r.setstate(state)
    return r


def load_dataset_small():
    from ldmkit.data import load_dataset
    return load_dataset("shapes", split="test", num=4)


def test_caption_sample_is_seeded():
    from ldmkit.data import load_dataset
    ds = load_dataset("shapes", split="test", num=50)
    a, b = clip_stage.caption_sample(ds, 30, 0), clip_stage.caption_sample(ds, 30, 0)
    assert a == b and a != clip_stage.caption_sample(ds, 30, 1)
    assert len(set(a)) > 20  # varied wordings, not one caption
    random.seed(0)  # unaffected by the global random state
    assert clip_stage.caption_sample(ds, 30, 0) == a


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    """Negatives gathered over ranks: 2 processes x 16 take the steps of 1 process x 32 (same logged losses)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    extra = ["--set", "train.log_every=1", "--set", "train.steps=6", "--set", "eval_images=0"]
    assert cli(train_args(tmp_path / "single", *extra)) == 0
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "ldmkit.cli",
           *train_args(tmp_path / "ddp", *extra)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]

    def losses(run):
        return [json.loads(r)["loss"] for r in (run / "metrics.jsonl").read_text().splitlines()]

    single, ddp = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert len(single) == len(ddp) == 6 and single[-1] != single[0]
    assert ddp == pytest.approx(single, rel=1e-4)
