"""Images as conditions: the backbones' image input, the two-scale guidance chain, training-time dropout and the
embedding cache, and `ldmkit sample --image-prompt` end to end on a tiny pipeline."""

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from ldmkit.diffusion.dit import PRESETS as DIT_PRESETS
from ldmkit.diffusion.dit import DiT
from ldmkit.diffusion.unet import PRESETS as UNET_PRESETS
from ldmkit.diffusion.unet import UNet
from ldmkit.guidance.cfg import GuidedDenoiser
from ldmkit.guidance.multi import ChainGuidance, image_text_conds, image_text_scales

BACKBONES = {"unet": (UNet, UNET_PRESETS["tiny"]), "dit": (DiT, DIT_PRESETS["tiny"])}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread (the shared `one_thread` fixture)."""


def build(name, image_dim=12, image_tokens=0):
    cls, cfg = BACKBONES[name]
    torch.manual_seed(0)
    return cls(dataclasses.replace(cfg, image_dim=image_dim, image_tokens=image_tokens)).eval()


def inputs(model, B=4):
    g = torch.Generator().manual_seed(0)
    cfg = model.cfg
    return dict(x=torch.randn(B, cfg.in_channels, 8, 8, generator=g), t=torch.rand(B, generator=g) * 1000,
                context=torch.randn(B, 3, cfg.context_dim, generator=g),
                pooled=torch.randn(B, cfg.pooled_dim, generator=g),
                image=torch.randn(B, *[cfg.image_tokens] * bool(cfg.image_tokens), cfg.image_dim, generator=g))


def run(model, inp, **over):
    kw = {**inp, **over}
    return model(kw.pop("x"), kw.pop("t"), **kw)


@pytest.mark.parametrize("tokens", [0, 5], ids=["embedding", "tokens"])
@pytest.mark.parametrize("name", BACKBONES)
def test_image_input_starts_as_a_no_op_and_drop_image_is_the_null_embedding(name, tokens):
    model = build(name, image_tokens=tokens)
    projections = [model.image_proj] + ([model.image_context] if tokens else [])
    fresh = inputs(model)  # at initialisation the projections are zero: the image does not reach the output
    torch.testing.assert_close(run(model, fresh), run(model, fresh, image=-fresh["image"]))
    with torch.no_grad():  # the output layers start at zero: give every weight a value so the paths show
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.2)
        for m in projections:
            m.weight.zero_()
    inp = inputs(model)
    torch.testing.assert_close(run(model, inp), run(model, inp, image=None))  # zero projection: image unseen
    with torch.no_grad():
        for m in projections:
            m.weight.normal_(0, 0.5)
    with_image, without = run(model, inp), run(model, inp, image=None)
    assert not torch.allclose(with_image, without, atol=1e-3)  # the image now reaches the output
    drop = torch.tensor([True, False, True, False])
    mixed = run(model, inp, drop_image=drop)
    torch.testing.assert_close(mixed[drop], without[drop], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[~drop], with_image[~drop], atol=1e-5, rtol=1e-5)
    # the text's drop and the image's drop are independent switches
    text_dropped = run(model, inp, drop=torch.ones(4, dtype=torch.bool))
    assert not torch.allclose(text_dropped, with_image, atol=1e-3)
    assert not torch.allclose(text_dropped, run(model, inp, drop=torch.ones(4, dtype=torch.bool), image=None),
                              atol=1e-3)


@pytest.mark.parametrize("name", BACKBONES)
def test_image_shape_errors_name_the_width(name):
    model = build(name)
    inp = inputs(model)
    with pytest.raises(ValueError, match="image_dim=12"):
        run(model, inp, image=torch.zeros(4, 5))
    with pytest.raises(ValueError, match="drop_image"):
        run(model, inp, drop_image=torch.zeros(4))
    tokens = build(name, image_tokens=5)
    with pytest.raises(ValueError, match="N=5, image_dim=12"):
        run(tokens, inputs(tokens), image=torch.zeros(4, 12))
    text_only = build(name, image_dim=0)
    with pytest.raises(ValueError, match="no image condition"):
        run(text_only, inputs(text_only), image=torch.zeros(4, 12))


def _toy_denoiser(calls):
    """D(x, sigma, cond) = x * (1 + a) + b, with a, b set by which conditions are present (batched like a net)."""
    def denoise(x, sigma, cond):
        calls.append(x.shape[0])
        text = (~cond["drop"]).float() * cond["pooled"][:, 0]
        image = (~cond["drop_image"]).float() * cond["image"][:, 0]
        return x * (1 + 0.1 * image)[:, None] + (2.0 * text + 0.5 * image * text)[:, None]
    return denoise


def test_chain_is_the_two_scale_formula_in_one_call():
    B = 3
    x, sigma = torch.randn(B, 4), torch.full((B,), 0.7)
    cond = {"pooled": torch.tensor([[1.0], [2.0], [-1.0]]), "drop": torch.zeros(B, dtype=torch.bool)}
    uncond = {**cond, "drop": torch.ones(B, dtype=torch.bool)}
    image = torch.tensor([[0.5], [1.5], [-2.0]])
    calls = []
    denoise = _toy_denoiser(calls)
    conds = image_text_conds(cond, uncond, image)
    assert len(conds) == 3
    wi, wt = 2.5, 4.0
    got = ChainGuidance(denoise, conds, image_text_scales(conds, wi, wt))(x, sigma)
    assert calls == [3 * B]  # every link of the chain in one batched evaluation
    yes, no = torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)
    d_none = denoise(x, sigma, {**cond, "drop": no, "image": image, "drop_image": no})
    d_image = denoise(x, sigma, {**cond, "drop": no, "image": image, "drop_image": yes})
    d_both = denoise(x, sigma, {**cond, "drop": yes, "image": image, "drop_image": yes})
    torch.testing.assert_close(got, d_none + wi * (d_image - d_none) + wt * (d_both - d_image))
    # w_i = w_t = 1 is the fully conditional model; w_t = 0 is plain CFG on the image alone
    torch.testing.assert_close(ChainGuidance(denoise, conds, [1.0, 1.0])(x, sigma), d_both)
    plain = GuidedDenoiser(denoise, conds[1], conds[0], wi)(x, sigma)
    torch.testing.assert_close(ChainGuidance(denoise, conds, [wi, 0.0])(x, sigma), plain)


def test_chain_stops_at_the_image_when_no_row_has_text_and_respects_the_interval():
    B = 2
    cond = {"pooled": torch.ones(B, 1), "drop": torch.ones(B, dtype=torch.bool)}  # empty prompts
    conds = image_text_conds(cond, cond, torch.ones(B, 1))
    assert len(conds) == 2 and image_text_scales(conds, 3.0, 7.0) == [3.0]
    calls = []
    guided = ChainGuidance(_toy_denoiser(calls), conds, [3.0], interval=(0.5, 2.0))
    x = torch.randn(B, 4)
    outside = guided(x, torch.full((B,), 3.0))
    assert calls == [B]  # outside the interval: the image-conditioned model alone
    torch.testing.assert_close(outside, _toy_denoiser([])(x, None, conds[-1]))
    guided(x, torch.full((B,), 1.0))
    assert calls[-1] == 2 * B
    with pytest.raises(ValueError, match="needs 1 scales"):
        ChainGuidance(_toy_denoiser([]), conds, [1.0, 2.0])


def test_image_dropout_is_per_sample_and_batch_independent():
    from ldmkit.train.ldm import draw_image_drop
    gidx = torch.arange(1000, 1400)
    drop = draw_image_drop(0, gidx, 0.5)
    assert 0.4 < drop.float().mean() < 0.6
    torch.testing.assert_close(draw_image_drop(0, gidx[100:103], 0.5), drop[100:103])
    assert not draw_image_drop(0, gidx, 0.0).any() and draw_image_drop(0, gidx, 1.0).all()


@pytest.fixture(scope="module")
def image_pipeline(tmp_path_factory):
    from ldmkit.cli import main as cli
    out = tmp_path_factory.mktemp("pipe") / "tiny-image"
    assert cli(["train", "pipeline", "--preset", "tiny", "--set", "denoiser:image_condition=true", "--out", str(out),
                "--no-progress"]) == 0
    return out


def test_embeddings_cache_is_bound_to_the_clip_weights(image_pipeline, tmp_path):
    from ldmkit.data import load_dataset
    from ldmkit.eval.clip_cli import image_features
    from ldmkit.stages import load_clip
    from ldmkit.train.ldm import image_embeddings
    ds = load_dataset("shapes", split="train")
    clip_dir = image_pipeline / "clip"
    first = image_embeddings(str(clip_dir), "hash-a", ds, "shapes", tmp_path)
    torch.testing.assert_close(first, image_features(load_clip(clip_dir), ds.images))
    torch.testing.assert_close(first.norm(dim=1), torch.ones(len(ds)))
    stamp = (tmp_path / "image-embeddings.safetensors").stat().st_mtime_ns
    image_embeddings(str(clip_dir), "hash-a", ds, "shapes", tmp_path)
    assert (tmp_path / "image-embeddings.safetensors").stat().st_mtime_ns == stamp  # reused
    image_embeddings(str(clip_dir), "hash-b", ds, "shapes", tmp_path)
    assert (tmp_path / "image-embeddings.safetensors").stat().st_mtime_ns != stamp  # other weights: recomputed
    # the image tower's tokens: float16 in the cache, the same file name, never mistaken for the embeddings
    tokens = image_embeddings(str(clip_dir), "hash-b", ds, "shapes", tmp_path, tokens=True)
    clip = load_clip(clip_dir)
    with torch.no_grad():
        want = clip.vision(ds.images[:7].float() / 127.5 - 1)[1]
    assert tokens.dtype == torch.float16 and tokens.shape == (len(ds), *want.shape[1:])
    torch.testing.assert_close(tokens[:7].float(), want, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(image_embeddings(str(clip_dir), "hash-b", ds, "shapes", tmp_path), first)


def test_sample_image_prompt_end_to_end(image_pipeline, tiny_pipeline, tmp_path, capsys):
    from ldmkit.cli import main as cli
    from ldmkit.data import load_split
    from ldmkit.images import save_png
    img = load_split("shapes", "test", None).images[3].numpy().transpose(1, 2, 0)
    save_png(img, tmp_path / "prompt.png")
    common = ["sample", str(image_pipeline), "--image-prompt", str(tmp_path / "prompt.png"), "--num", "3",
              "--no-progress"]
    assert cli([*common, "--out", str(tmp_path / "a.npz")]) == 0
    assert cli([*common, "--out", str(tmp_path / "b.npz")]) == 0
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert a["images"].shape == (3, 32, 32, 3) and np.array_equal(a["images"], b["images"])
        assert list(a["prompts"]) == [""] * 3 and str(a["image_prompt"]) == "prompt.png"
        assert float(a["image_guidance"]) == float(a["guidance"])
    assert cli([*common, "--prompt", "a red circle", "--image-guidance", "1.5", "--out", str(tmp_path / "c.npz")]) == 0
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "c.npz") as c:
        assert float(c["image_guidance"]) == 1.5 and not np.array_equal(a["images"], c["images"])
    # a text-only pipeline says how to get one that reads images
    copy = tmp_path / "text-only"
    shutil.copytree(tiny_pipeline, copy)
    assert cli(["sample", str(copy), "--image-prompt", str(tmp_path / "prompt.png"), "--out",
                str(tmp_path / "d.npz"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "trained on text alone" in err and "image_condition=true" in err
    assert cli(["sample", str(image_pipeline), "--out", str(tmp_path / "e.npz")]) == 2
    assert "--image-prompt FILE" in capsys.readouterr().err


def test_token_conditioned_pipeline_samples_from_image_prompts(image_pipeline, tmp_path):
    """`--set denoiser:image_tokens=true`: the denoiser cross-attends to the image tower's tokens; sampling reads
    them from the same image prompt, deterministically, and the prompt changes the samples."""
    from ldmkit.checkpoint import read_json
    from ldmkit.cli import main as cli
    from ldmkit.data import load_split
    from ldmkit.pipeline import Pipeline
    from ldmkit.stages import load_clip
    out = tmp_path / "tiny-tokens"
    shutil.copytree(image_pipeline, out)
    shutil.rmtree(out / "denoiser")
    assert cli(["train", "pipeline", "--preset", "tiny", "--set", "denoiser:image_condition=true", "--set",
                "denoiser:image_tokens=true", "--out", str(out), "--no-progress"]) == 0
    pipe = Pipeline.load(out)
    cond = read_json(out / "denoiser" / "config.json")["conditioning"]
    vision = load_clip(out / "clip").vision
    assert cond["image_tokens"] == vision.position_embedding.shape[1] and cond["image_dim"] == vision.config.width
    prompts = load_split("shapes", "test", None).images[:2].numpy().transpose(0, 2, 3, 1)
    assert pipe.image_embeddings(prompts).shape == (2, cond["image_tokens"], cond["image_dim"])
    g = pipe.guidance(2.0, image_scale=2.0)
    a = pipe.generate(["", ""], guidance=g, image_prompts=prompts, steps=3, progress=False)
    b = pipe.generate(["", ""], guidance=g, image_prompts=prompts, steps=3, progress=False)
    c = pipe.generate(["", ""], guidance=g, image_prompts=prompts[::-1].copy(), steps=3, progress=False)
    assert a.shape == (2, 32, 32, 3) and np.array_equal(a, b) and not np.array_equal(a, c)


def test_image_prompt_errors_are_one_line(image_pipeline, tmp_path, capsys):
    from ldmkit.cli import main as cli
    from ldmkit.data import load_split
    from ldmkit.images import save_png
    save_png(load_split("shapes", "test", None).images[0].numpy().transpose(1, 2, 0), tmp_path / "p.png")
    (tmp_path / "not-an-image.png").write_text("hello")
    out = ["--out", str(tmp_path / "x.npz"), "--no-progress"]
    cases = [(["--image-prompt", str(tmp_path / "missing.png")], "not found"),
             (["--image-prompt", str(tmp_path / "not-an-image.png")], "not an image"),
             (["--image-prompt", str(tmp_path / "p.png"), "--distilled"], "text guidance only"),
             (["--image-prompt", str(tmp_path / "p.png"), "--guidance-mode", "apg"], "guided with cfg"),
             (["--image-prompt", str(tmp_path / "p.png"), "--image-guidance", "nan"], "finite number")]
    for extra, words in cases:
        assert cli(["sample", str(image_pipeline), *extra, *out]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x.npz").exists()
