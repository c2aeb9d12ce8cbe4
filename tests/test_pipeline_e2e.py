"""End to end through the CLI with tiny presets: every stage trains, a pipeline samples, contracts hold."""

import json
import shutil

import numpy as np
import pytest
import torch

from ldmkit.cli import main as cli


def sample(pipe, tmp, name, *extra):
    path = tmp / name
    assert cli(["sample", str(pipe), "--no-progress", "--out", str(path), *extra]) == 0
    return np.load(path, allow_pickle=False) if path.suffix == ".npz" else path


def test_pipeline_json_names_stages_with_hashes(tiny_pipeline):
    spec = json.loads((tiny_pipeline / "pipeline.json").read_text())
    assert {"autoencoder", "clip", "denoiser"} <= set(spec["stages"])
    for entry in spec["stages"].values():
        assert len(entry["sha256"]) == 16 and (tiny_pipeline / entry["path"] / "model.safetensors").exists()
    assert spec["latent"]["scale_factor"] > 0 and spec["defaults"]["sampler"] == "dpmpp-2m"


def test_sample_npz_contract_and_determinism(tiny_pipeline, tmp_path):
    args = ["--prompt", "a red circle", "--prompt", "a blue square", "--num", "3", "--seed", "7", "--steps", "3"]
    a = sample(tiny_pipeline, tmp_path, "a.npz", *args)
    b = sample(tiny_pipeline, tmp_path, "b.npz", *args)
    c = sample(tiny_pipeline, tmp_path, "c.npz", "--prompt", "a red circle", "--num", "1", "--seed", "7",
               "--steps", "3", "--batch-size", "1")
    assert a["images"].dtype == np.uint8 and a["images"].shape == (6, 32, 32, 3)
    assert list(a["prompts"]) == ["a red circle"] * 3 + ["a blue square"] * 3 and a["prompts"].dtype.kind == "U"
    assert a["labels"].dtype == np.int64 and (a["labels"] == -1).all()  # shapes prompts name no class
    assert all(np.array_equal(a[k], b[k]) for k in a.files)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    assert np.array_equal(a["images"][0], c["images"][0])  # independent of --num and --batch-size
    d = sample(tiny_pipeline, tmp_path, "d.npz", *args, "--micro-batch", "64")
    e = sample(tiny_pipeline, tmp_path, "e.npz", *args, "--micro-batch", "64", "--batch-size", "2")
    assert np.abs(d["images"].astype(int) - a["images"].astype(int)).max() <= 2  # other chunks: last bits only
    assert np.array_equal(d["images"], e["images"])  # at one --micro-batch, still batch-invariant
    assert not np.array_equal(a["images"][0], a["images"][1])  # different seeds per image
    assert float(a["guidance"]) == 3.0 and str(a["sampler"]) == "dpmpp-2m" and int(a["steps"]) == 3


def test_bf16_sampling_is_deterministic_and_close_to_fp32(tiny_pipeline, tmp_path):
    from ldmkit.nn import bf16_is_fast
    args = ["--prompt", "a red circle", "--num", "4", "--seed", "3", "--steps", "3"]
    ref = sample(tiny_pipeline, tmp_path, "f.npz", *args)["images"].astype(int)
    a = sample(tiny_pipeline, tmp_path, "a.npz", *args, "--precision", "bf16")["images"].astype(int)
    b = sample(tiny_pipeline, tmp_path, "b.npz", *args, "--precision", "bf16")["images"].astype(int)
    assert np.array_equal(a, b)
    if not bf16_is_fast("cpu"):  # no native bf16 here: the option falls back to fp32 exactly
        assert np.array_equal(a, ref)
        return
    assert not np.array_equal(a, ref)  # bf16 really ran
    assert np.abs(a - ref).mean() < 4  # grey levels: same images up to bf16 rounding


def test_guidance_options_reach_the_sampler(tiny_pipeline, tmp_path):
    base = ["--prompt", "a red circle", "--num", "2", "--steps", "3"]
    plain = sample(tiny_pipeline, tmp_path, "p.npz", *base)["images"]
    for i, extra in enumerate([["--guidance", "1"], ["--negative-prompt", "a blue square"],
                               ["--guidance-rescale", "0.7"], ["--guidance-mode", "apg"],
                               ["--guidance-interval", "0.5,3"], ["--sampler", "heun"]]):
        other = sample(tiny_pipeline, tmp_path, f"o{i}.npz", *base, *extra)["images"]
        assert other.shape == plain.shape and not np.array_equal(other, plain), extra
    assert sample(tiny_pipeline, tmp_path, "g.png", *base).stat().st_size > 0


def test_pipeline_default_guidance_rescale(tiny_pipeline, tmp_path):
    """pipeline.json's guidance_rescale is the default phi at scales above 1; an explicit phi wins."""
    from ldmkit.pipeline import Pipeline
    copy = tmp_path / "copy"
    shutil.copytree(tiny_pipeline, copy)
    spec = json.loads((copy / "pipeline.json").read_text())
    assert spec["defaults"]["guidance_rescale"] == 0.0  # the tiny preset keeps plain CFG
    spec["defaults"]["guidance_rescale"] = 0.7
    (copy / "pipeline.json").write_text(json.dumps(spec))
    pipe = Pipeline.load(copy)
    assert pipe.guidance().rescale == 0.7 and pipe.guidance(1.0).rescale == 0.0 and pipe.guidance(0.0).rescale == 0.0
    assert pipe.guidance(3.0, rescale=0.0).rescale == 0.0
    base = ["--prompt", "a red circle", "--num", "2", "--steps", "3"]
    dflt = sample(copy, tmp_path, "d.npz", *base)
    given = sample(tiny_pipeline, tmp_path, "r.npz", *base, "--guidance-rescale", "0.7")
    plain = sample(copy, tmp_path, "p.npz", *base, "--guidance-rescale", "0")
    assert float(dflt["guidance_rescale"]) == 0.7 and float(plain["guidance_rescale"]) == 0.0
    assert np.array_equal(dflt["images"], given["images"]) and not np.array_equal(dflt["images"], plain["images"])
    ref = sample(tiny_pipeline, tmp_path, "q.npz", *base)
    assert np.array_equal(plain["images"], ref["images"])


def test_denoiser_takes_the_autoencoder_latent_channels(tmp_path):
    """A 2-channel autoencoder gets a 2-channel denoiser without a denoiser override, and the pipeline samples."""
    out = tmp_path / "two"
    assert cli(["train", "pipeline", "--preset", "tiny", "--out", str(out), "--no-progress",
                "--set", "autoencoder:model.latent_channels=2"]) == 0
    cfg = json.loads((out / "denoiser" / "config.json").read_text())
    assert cfg["unet"]["in_channels"] == cfg["unet"]["out_channels"] == 2 == cfg["dit"]["in_channels"]
    assert json.loads((out / "pipeline.json").read_text())["latent"]["shape"] == [2, 8, 8]
    images = sample(out, tmp_path, "s.npz", "--prompt", "a red circle", "--num", "2", "--steps", "2")["images"]
    assert images.shape == (2, 32, 32, 3)


def test_swapped_stage_fails_loudly(tiny_pipeline, tmp_path):
    from ldmkit.pipeline import Pipeline
    copy = tmp_path / "copy"
    shutil.copytree(tiny_pipeline, copy)
    sd_path = copy / "autoencoder" / "model.safetensors"
    from ldmkit.checkpoint import load_safetensors, save_safetensors
    sd = load_safetensors(sd_path)
    sd[next(iter(sd))] += 1
    save_safetensors(sd, sd_path)
    with pytest.raises(ValueError, match="swapped or retrained"):
        Pipeline.load(copy)


def test_img2img_and_inpaint(tiny_pipeline):
    from ldmkit.data import load_dataset
    from ldmkit.pipeline import Pipeline
    pipe = Pipeline.load(tiny_pipeline)
    ds = load_dataset("shapes", split="test", num=4)
    imgs = ds.images.permute(0, 2, 3, 1).numpy()
    recon = pipe.decode(pipe.encode_images(imgs))
    same = pipe.img2img(imgs, ["a red circle"] * 4, strength=0.0, steps=4, progress=False)
    assert np.array_equal(same, recon)
    full = pipe.img2img(imgs, ["a red circle"] * 4, strength=1.0, steps=4, progress=False, seed=3)
    fresh = pipe(["a red circle"], 4, steps=4, progress=False, seed=3)
    assert np.abs(full.astype(int) - fresh.astype(int)).mean() < 3.0  # strength 1 ~ an independent sample
    mask = np.zeros((4, 32, 32), np.float32)
    mask[:, :16] = 1  # regenerate the top half
    out = pipe.inpaint(imgs, mask, ["a blue square"] * 4, steps=4, progress=False, paste_unmasked=False)
    keep = np.abs(out[:, 20:].astype(int) - recon[:, 20:].astype(int)).mean()
    change = np.abs(out[:, :12].astype(int) - recon[:, :12].astype(int)).mean()
    assert keep < change
    pasted = pipe.inpaint(imgs, mask, ["a blue square"] * 4, steps=4, progress=False)  # default: paste back
    assert np.array_equal(pasted[:, 16:], imgs[:, 16:]) and np.array_equal(pasted[:, :16], out[:, :16])
    with pytest.raises(ValueError, match="mask has shape"):
        pipe.inpaint(imgs, mask[:, :8], ["a blue square"] * 4, steps=4, progress=False)


def test_cli_edits_match_the_python_api(tiny_pipeline, tmp_path):
    """`sample --init-image F --strength S` is img2img and `--mask M` inpainting, as the Python API computes them,
    with the image's file read at the pipeline's size and the unmasked pixels kept exactly."""
    from PIL import Image

    from ldmkit.data import load_dataset
    from ldmkit.pipeline import Pipeline
    pipe = Pipeline.load(tiny_pipeline)
    img = load_dataset("shapes", split="test", num=1).images[0].permute(1, 2, 0).numpy()  # (32, 32, 3)
    Image.fromarray(img).save(tmp_path / "in.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[:, :16] = 255  # regenerate the left half
    Image.fromarray(mask).save(tmp_path / "mask.png")
    common = ["--prompt", "a blue square", "--num", "2", "--steps", "4", "--seed", "5",
              "--init-image", str(tmp_path / "in.png")]
    edit = sample(tiny_pipeline, tmp_path, "e.npz", *common, "--strength", "0.5")
    want = pipe.img2img(np.stack([img, img]), ["a blue square"] * 2, strength=0.5, steps=4, seed=5, progress=False)
    assert np.array_equal(edit["images"], want) and str(edit["edit"]) == "img2img" and float(edit["strength"]) == 0.5
    filled = sample(tiny_pipeline, tmp_path, "i.npz", *common, "--mask", str(tmp_path / "mask.png"))
    want = pipe.inpaint(np.stack([img, img]), np.stack([mask > 127] * 2).astype(np.float32), ["a blue square"] * 2,
                        steps=4, seed=5, progress=False)
    assert np.array_equal(filled["images"], want)
    assert np.array_equal(filled["images"][:, :, 16:], np.stack([img] * 2)[:, :, 16:])  # unmasked: the input


def test_an_interrupted_sample_keeps_the_finished_batches(tiny_pipeline, tmp_path, monkeypatch, capsys):
    """Ctrl-C (or SIGTERM) during the third batch: the two finished batches are written, marked incomplete, and
    equal the first rows of an uninterrupted run."""
    from ldmkit.pipeline import Pipeline
    full = sample(tiny_pipeline, tmp_path, "full.npz", "--prompt", "a red circle", "--num", "10", "--steps", "2",
                  "--batch-size", "4")
    decode, calls = Pipeline.decode, []

    def decode_then_stop(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return decode(self, *a, **k)
    monkeypatch.setattr(Pipeline, "decode", decode_then_stop)
    out = tmp_path / "cut.npz"
    assert cli(["sample", str(tiny_pipeline), "--no-progress", "--prompt", "a red circle", "--num", "10", "--steps",
                "2", "--batch-size", "4", "--out", str(out)]) == 130
    assert "the first 8 of 10 images are in" in capsys.readouterr().err
    with np.load(out, allow_pickle=False) as cut:
        assert not bool(cut["complete"]) and np.array_equal(cut["images"], full["images"][:8])
        assert cut["prompts"].shape == (8,) and cut["labels"].shape == (8,)
    parts = tmp_path / ".cut.npz.parts"
    assert sorted(f.name for f in parts.glob("batch-*.npz")) == ["batch-000000000.npz", "batch-000000004.npz"]

    # the same command again continues after the 8 finished images (only the last batch is sampled: one decode)
    monkeypatch.setattr(Pipeline, "decode", decode)
    calls.clear()
    monkeypatch.setattr(Pipeline, "decode", lambda self, *a, **k: (calls.append(1), decode(self, *a, **k))[1])
    assert cli(["sample", str(tiny_pipeline), "--no-progress", "--prompt", "a red circle", "--num", "10", "--steps",
                "2", "--batch-size", "4", "--out", str(out)]) == 0
    assert "continuing: 8 of 10 images" in capsys.readouterr().err and len(calls) == 1
    with np.load(out, allow_pickle=False) as done, np.load(tmp_path / "full.npz", allow_pickle=False) as ref:
        assert "complete" not in done.files
        for k in ref.files:
            assert np.array_equal(done[k], ref[k]), k
    assert not parts.exists()


def test_finished_batches_of_other_settings_are_not_reused(tiny_pipeline, tmp_path, capsys):
    """A side folder left by a killed run with other settings (here: another seed) is replaced, not continued."""
    from ldmkit.sample import FinishedBatches
    out = tmp_path / "s.npz"
    FinishedBatches(out, "another-run").save(np.zeros((4, 28, 28, 1), np.uint8), 0)
    got = sample(tiny_pipeline, tmp_path, "s.npz", "--prompt", "a red circle", "--num", "6", "--steps", "2",
                 "--batch-size", "4")
    ref = sample(tiny_pipeline, tmp_path, "ref.npz", "--prompt", "a red circle", "--num", "6", "--steps", "2",
                 "--batch-size", "4")
    assert np.array_equal(got["images"], ref["images"]) and "continuing" not in capsys.readouterr().err
    assert not (tmp_path / ".s.npz.parts").exists()


def test_classifier_guidance_needs_a_class(tiny_pipeline, tmp_path):
    with pytest.raises(ValueError, match="class"):
        sample(tiny_pipeline, tmp_path, "x.npz", "--prompt", "", "--classifier-scale", "1", "--steps", "2", "--debug")


def test_help_lists_every_command(capsys):
    assert cli(["--help"]) == 0
    text = capsys.readouterr().out
    for words in ("train autoencoder", "train clip", "train ldm", "sample", "autoencoder eval", "clip eval", "eval"):
        assert words in text
    assert cli(["trian"]) == 2


class _CountingEncoder:
    """A stand-in text encoder: one row per prompt, its value the prompt's length; counts prompts encoded."""

    def __init__(self):
        self.encoded = 0

    def encode(self, prompts):
        self.encoded += len(prompts)
        return {"context": torch.tensor([[float(len(p))] for p in prompts])}


@pytest.mark.parametrize("batched", [True, False])
def test_prompt_encoder_cache_overflow_keeps_every_row(batched):
    """When the cache fills up mid-call, prompts cached before (and in this batch) must still come back: a
    regression test for a KeyError that stopped the shapes denoiser (captions outnumber the cache)."""
    from ldmkit.pipeline import PromptEncoder
    text = _CountingEncoder()
    enc = PromptEncoder(text, batched=batched, cache_size=4)
    enc(["a", "bb", "ccc"])
    out = enc(["a", "dddd", "eeeee"])  # 3 cached + 2 new > 4: the cache restarts with this call's 3 prompts
    assert out["context"].squeeze(1).tolist() == [1.0, 4.0, 5.0]
    assert out["drop"].tolist() == [False, False, False]
    assert len(enc.cache) == 3 and text.encoded == 6
    assert enc(["", "a"])["drop"].tolist() == [True, False]


class _TwoPartEncoder:
    """Token states that depend on the whole prompt, a pooled vector that depends only on its last word."""

    def encode(self, prompts):
        seeds = [len(p) * 31 + ord((p or " ")[0]) for p in prompts]
        ctx = torch.stack([torch.randn(5, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
        pooled = torch.stack([torch.full((6,), float(len((p.split() or [''])[-1]))) for p in prompts])
        return {"context": ctx, "context_mask": torch.ones(len(prompts), 5, dtype=torch.bool), "pooled": pooled}


def test_pooled_only_conditioning_ignores_the_tokens():
    """text_tokens=False: two prompts with the same pooled vector but different token states get the same
    denoiser output; with tokens they do not. The null condition ("") still differs from both."""
    import dataclasses

    from ldmkit.diffusion.unet import PRESETS, UNet
    from ldmkit.pipeline import PromptEncoder
    torch.manual_seed(0)
    net = UNet(dataclasses.replace(PRESETS["tiny"], context_dim=8, pooled_dim=6)).eval()
    with torch.no_grad():
        for prm in net.parameters():
            prm.add_(torch.randn_like(prm) * 0.1)  # zero-initialised output layers would hide the conditioning
    x, t = torch.randn(1, 4, 8, 8).expand(3, -1, -1, -1), torch.full((3,), 0.5)
    prompts = ["a photo of a bag", "here is one bag", ""]
    outs = {}
    for tokens in (True, False):
        cond = PromptEncoder(_TwoPartEncoder(), tokens=tokens)(prompts)
        assert tokens or (cond["context"].shape == (3, 1, 8) and "context_mask" not in cond)
        with torch.no_grad():
            outs[tokens] = net(x, t, **cond)
    assert not torch.allclose(outs[True][0], outs[True][1], atol=1e-4)
    torch.testing.assert_close(outs[False][0], outs[False][1])
    assert not torch.allclose(outs[False][0], outs[False][2], atol=1e-4)


def test_user_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    from ldmkit.cli import main as cli
    assert cli(["sample", str(tmp_path / "nowhere"), "--prompt", "a bag", "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ldmkit sample: error:") and "pipeline.json" in err[0]
    with pytest.raises(FileNotFoundError):
        cli(["sample", str(tmp_path / "nowhere"), "--prompt", "a bag", "--out", str(tmp_path / "x.npz"), "--debug"])


@pytest.mark.parametrize("extra, words", [
    (["--out", "x.jpg"], ".npz"), (["--steps", "0"], "--steps 0"), (["--guidance", "nan"], "finite"),
    (["--guidance=-1e9"], "outside"), (["--seed", str(2**70)], "64 bits"), (["--out", "no/such/dir/x.npz"], "exist"),
])
def test_sample_checks_arguments_before_loading_anything(tmp_path, capsys, monkeypatch, extra, words):
    """Bad arguments fail in one line before the pipeline is loaded (so before any image is sampled)."""
    from ldmkit.cli import main as cli
    from ldmkit.pipeline import Pipeline
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(Pipeline, "load", lambda *a, **k: pytest.fail("the pipeline was loaded"))
    argv = ["sample", "anything", "--prompt", "a bag", "--out", "x.npz", *extra]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]


def test_bad_pipeline_files_fail_naming_the_key(tiny_pipeline, tmp_path, capsys):
    import json
    import os
    import shutil

    from ldmkit.cli import main as cli

    def broken(name, edit):
        d = tmp_path / name
        shutil.copytree(tiny_pipeline, d)
        spec = json.loads((d / "pipeline.json").read_text())
        edit(d, spec)
        if (d / "pipeline.json").is_file() and not (d / "pipeline.json").is_symlink():
            (d / "pipeline.json").write_text(json.dumps(spec))
        return d

    def drop_clip(d, s):
        del s["stages"]["clip"]

    def unknown_key(d, s):
        s["bogus"] = 1

    def old_format(d, s):
        s["format"] = "ldmkit-pipeline/0"

    def escape(d, s):
        s["stages"]["clip"]["path"] = "../../elsewhere"

    def no_denoiser(d, s):
        shutil.rmtree(d / "denoiser")

    def fifo_weights(d, s):
        (d / "clip" / "model.safetensors").unlink()
        os.mkfifo(d / "clip" / "model.safetensors")

    def edit_json(path, **changes):
        obj = json.loads(path.read_text())
        for dotted, value in changes.items():
            *keys, last = dotted.split(".")
            target = obj
            for k in keys:
                target = target[k]
            target[last] = value
        path.write_text(json.dumps(obj))

    def objective_edited(d, s):  # same weights, read as another objective: would change every image
        kind = json.loads((d / "denoiser" / "config.json").read_text())["objective"]["kind"]
        edit_json(d / "denoiser" / "config.json", **{"objective.kind": "eps" if kind != "eps" else "v"})

    def parent_hash_edited(d, s):  # the denoiser's record of its autoencoder
        edit_json(d / "denoiser" / "config.json", **{"conditioning.autoencoder_sha256": "0" * 16})

    def scale_edited(d, s):
        s["latent"]["scale_factor"] = 0.05

    def tokenizer_edited(d, s):
        tok = d / "clip" / "tokenizer.json"
        tok.write_text(tok.read_text().replace('"a"', '"A"', 1))

    cases = [(drop_clip, "'clip' stage"), (unknown_key, "bogus"), (old_format, "format"), (escape, "leaves"),
             (no_denoiser, "denoiser"), (fifo_weights, "model.safetensors"), (objective_edited, "config was edited"),
             (parent_hash_edited, "config was edited"), (scale_edited, "latent scale"),
             (tokenizer_edited, "config was edited")]
    for edit, words in cases:
        d = broken(edit.__name__, edit)
        assert cli(["sample", str(d), "--prompt", "a red circle", "--out", str(tmp_path / "x.npz")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (edit.__name__, err)
