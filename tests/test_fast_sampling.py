"""Faster sampling: the fast decoder (shapes, config checks, training stage, decoding a pipeline's samples) and
guidance distillation (a student that needs one network call per step)."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from ldmkit.autoencoder import PRESETS as AE_PRESETS
from ldmkit.autoencoder.fast_decoder import FastDecoder, FastDecoderConfig, config_for
from ldmkit.cli import main as cli


def test_shapes_and_factor_check():
    dec = FastDecoder(FastDecoderConfig(latent_channels=3, out_channels=2, channels=(8, 6, 4), blocks=1))
    assert dec(torch.randn(2, 3, 5, 6)).shape == (2, 2, 20, 24)
    with pytest.raises(ValueError, match=r"expects \(B, 3, h, w\) latents"):
        dec(torch.randn(2, 4, 5, 6))
    cfg = config_for(AE_PRESETS["fashion-mnist"], channels=(16, 8, 4))  # 3 levels: factor 4
    assert (cfg.latent_channels, cfg.out_channels, cfg.upsample_factor) == (4, 1, 4)
    with pytest.raises(ValueError, match="upsample 2x but the autoencoder downsamples 4x; give 3 widths"):
        config_for(AE_PRESETS["fashion-mnist"], channels=(16, 8))
    patched = dataclasses.replace(AE_PRESETS["fashion-mnist"], block_out_channels=(32, 64), patch_size=2)
    assert config_for(patched, channels=(16, 8, 4)).upsample_factor == 4  # two levels, but factor 4 all the same
    with pytest.raises(ValueError, match="give 3 widths"):
        config_for(patched, channels=(16, 8))
    with pytest.raises(ValueError, match="one positive width per resolution"):
        FastDecoderConfig(channels=())


def test_fast_decoder_trains_and_decodes_a_pipelines_samples(tiny_pipeline, tmp_path):
    """The tiny pipeline trains a fast decoder last; pipeline.json names it with its hash; `--decoder fast` decodes
    the same latents (same seed) into other, deterministic images; a fast decoder of another autoencoder is refused."""
    out = tmp_path / "pipe"
    shutil.copytree(tiny_pipeline, out)
    spec = json.loads((out / "pipeline.json").read_text())
    assert spec["stages"]["fast-decoder"]["path"] == "fast-decoder"
    cfg = json.loads((out / "fast-decoder" / "config.json").read_text())
    assert cfg["autoencoder_sha256"] == spec["stages"]["autoencoder"]["sha256"]
    m = json.loads((out / "fast-decoder" / "metrics.json").read_text())
    assert m["steps_done"] == 20 and m["params"] > 0
    rows = [json.loads(r) for r in (out / "fast-decoder" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["rec"] < rows[0]["rec"]  # it learns
    args = ["--prompt", "a red circle", "--num", "3", "--seed", "1", "--steps", "3"]
    runs = {}
    for name, extra in (("full", []), ("fast", ["--decoder", "fast"]), ("fast2", ["--decoder", "fast"])):
        path = tmp_path / f"{name}.npz"
        assert cli(["sample", str(out), "--no-progress", "--out", str(path), *args, *extra]) == 0
        runs[name] = np.load(path, allow_pickle=False)
    assert runs["fast"]["images"].shape == runs["full"]["images"].shape
    assert np.array_equal(runs["fast"]["images"], runs["fast2"]["images"])
    assert not np.array_equal(runs["fast"]["images"], runs["full"]["images"])
    assert str(runs["fast"]["decoder"]) == "fast"
    # bound to its autoencoder: a changed hash in the fast decoder's config fails the load (the config hash first;
    # with pipeline.json updated to the edited config, the recorded parent hash)
    cfg["autoencoder_sha256"] = "0" * 16
    (out / "fast-decoder" / "config.json").write_text(json.dumps(cfg))
    from ldmkit.pipeline import Pipeline
    from ldmkit.stages import config_hash
    with pytest.raises(ValueError, match="fast-decoder stage's config was edited"):
        Pipeline.load(out)
    spec = json.loads((out / "pipeline.json").read_text())
    spec["stages"]["fast-decoder"]["config_sha256"] = config_hash(out / "fast-decoder")
    (out / "pipeline.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="fast decoder .* trained for another autoencoder"):
        Pipeline.load(out)


def test_guidance_distillation_stage(tiny_pipeline, tmp_path):
    """`ldmkit train distill` registers a student in pipeline.json; `--distilled` samples with it (deterministic,
    other images than the guided teacher's); guidance other than the distilled setting is refused."""
    from ldmkit.pipeline import Pipeline
    out = tmp_path / "pipe"
    shutil.copytree(tiny_pipeline, out)
    assert cli(["train", "distill", "--pipeline", str(out), "--preset", "tiny", "--no-progress"]) == 0
    spec = json.loads((out / "pipeline.json").read_text())
    assert spec["stages"]["distilled"]["path"] == "distilled"
    cfg = json.loads((out / "distilled" / "config.json").read_text())
    assert cfg["teacher_sha256"] == spec["stages"]["denoiser"]["sha256"]
    assert cfg["guidance"] == spec["defaults"]["guidance"]
    rows = [json.loads(r) for r in (out / "distilled" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(np.isfinite(r["loss"]) for r in rows)
    args = ["--prompt", "a red circle", "--num", "2", "--seed", "3", "--steps", "3"]
    got = {}
    for name, extra in (("teacher", []), ("student", ["--distilled"]), ("student2", ["--distilled"])):
        path = tmp_path / f"{name}.npz"
        assert cli(["sample", str(out), "--no-progress", "--out", str(path), *args, *extra]) == 0
        got[name] = np.load(path, allow_pickle=False)
    assert np.array_equal(got["student"]["images"], got["student2"]["images"])
    assert not np.array_equal(got["student"]["images"], got["teacher"]["images"])
    assert str(got["student"]["distilled"]) == "guidance" and str(got["teacher"]["distilled"]) == "none"
    assert float(got["student"]["guidance"]) == cfg["guidance"]
    pipe = Pipeline.load(out)
    with pytest.raises(ValueError, match="distilled denoiser reproduces guidance w="):
        pipe(["a red circle"], guidance=cfg["guidance"] + 1, steps=2, distilled=True, progress=False)
    with pytest.raises(ValueError, match="no distilled denoiser"):
        Pipeline.load(tiny_pipeline).distilled_guidance()
    # the one-step student of the distilled denoiser's 2-step sampler
    assert cli(["train", "distill", "--pipeline", str(out), "--preset", "tiny", "--set", "one_step_from=2",
                "--no-progress"]) == 0
    spec = json.loads((out / "pipeline.json").read_text())
    one = json.loads((out / "onestep" / "config.json").read_text())
    assert one["teacher_sha256"] == spec["stages"]["distilled"]["sha256"] and one["one_step_from"] == 2
    for name in ("one", "one2"):
        path = tmp_path / f"{name}.npz"
        assert cli(["sample", str(out), "--no-progress", "--out", str(path), "--prompt", "a red circle", "--num", "2",
                    "--one-step"]) == 0
        got[name] = np.load(path, allow_pickle=False)
    assert np.array_equal(got["one"]["images"], got["one2"]["images"])
    assert int(got["one"]["steps"]) == 1 and str(got["one"]["distilled"]) == "onestep"
    # rerunning `train pipeline` keeps every finished stage and keeps naming the distilled ones
    assert cli(["train", "pipeline", "--preset", "tiny", "--out", str(out), "--no-progress"]) == 0
    after = json.loads((out / "pipeline.json").read_text())["stages"]
    assert after["distilled"] == spec["stages"]["distilled"] and after["onestep"] == spec["stages"]["onestep"]
