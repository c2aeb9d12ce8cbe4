"""`ldmkit export` (shareable pipelines, bf16 storage, hashes rebound) and `ldmkit demo` (the HTML report)."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open

from ldmkit.checkpoint import read_json
from ldmkit.cli import main as cli
from ldmkit.pipeline import Pipeline


@pytest.fixture(scope="module")
def exported(tiny_fashion_pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "fashion"
    assert cli(["export", str(tiny_fashion_pipeline), "--out", str(out)]) == 0
    return out


def test_export_keeps_weights_only_in_bf16_and_rebinds_hashes(tiny_fashion_pipeline, exported):
    src_spec, spec = read_json(tiny_fashion_pipeline / "pipeline.json"), read_json(exported / "pipeline.json")
    assert set(spec["stages"]) == set(src_spec["stages"]) and spec["weights_dtype"] == "bf16"
    assert not list(exported.rglob("state.pt")) and not list(exported.rglob("*.png"))
    for name in spec["stages"]:
        with safe_open(str(exported / name / "model.safetensors"), "pt") as f:
            dtypes = {str(f.get_tensor(k).dtype) for k in f.keys()}
        assert "torch.float32" not in dtypes and "torch.bfloat16" in dtypes
        assert spec["stages"][name]["sha256"] != src_spec["stages"][name]["sha256"]
    text = "".join(p.read_text() for p in exported.rglob("*.json"))
    assert str(tiny_fashion_pipeline) not in text  # paths into the source became relative
    for old in (e["sha256"] for e in src_spec["stages"].values()):
        assert old not in text  # every record of an old file now names the new one
    dcfg = read_json(exported / "denoiser" / "config.json")
    assert dcfg["conditioning"]["autoencoder_sha256"] == spec["stages"]["autoencoder"]["sha256"]
    assert read_json(exported / "onestep" / "config.json")["teacher_sha256"] == spec["stages"]["distilled"]["sha256"]


def test_exported_pipeline_samples_like_the_source(tiny_fashion_pipeline, exported):
    a = Pipeline.load(tiny_fashion_pipeline)(["a photo of a bag"], num=4, progress=False)
    b = Pipeline.load(exported)(["a photo of a bag"], num=4, progress=False)
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    assert np.abs(a.astype(int) - b).mean() < 2.0  # bf16 storage: ~3 significant digits per weight


def test_export_refuses_a_non_empty_destination(tiny_fashion_pipeline, exported, capsys):
    assert cli(["export", str(tiny_fashion_pipeline), "--out", str(exported)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ldmkit export: error:") and "--overwrite" in err[0]
    with pytest.raises(FileExistsError, match="--overwrite"):  # --debug: the exception itself
        cli(["export", str(tiny_fashion_pipeline), "--out", str(exported), "--debug"])


def test_demo_report_has_every_section_and_no_outside_assets(exported, tiny_pipeline, tmp_path):
    shapes = tmp_path / "shapes"
    assert cli(["export", str(tiny_pipeline), "--out", str(shapes)]) == 0
    out = tmp_path / "demo"
    assert cli(["demo", "--fashion", str(exported), "--shapes", str(shapes), "--out", str(out), "--fresh", "40"]) == 0
    html = (out / "report.html").read_text()
    result = json.loads((out / "report.json").read_text())
    for heading in ("The latent space", "Conditions: CLIP", "Guidance", "img2img and inpainting", "shapes",
                    "Metrics", "Training curves"):
        assert heading in html and any(heading in k for k in result["sections"])
    assert "Decoded N(0, I) latents" in html and "Interpolation" in html and "classifier, s = 4" in html
    assert "Negative prompt" in html and "<svg" in html and "a photo of an ankle boot" in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # nothing fetched from anywhere
    fresh = result["sections"]["6. Metrics"]["fresh"]
    assert all(v["images"] == 40 and 0 <= v["accuracy"] <= 1 for v in fresh.values())
    assert result["sections"]["1. The latent space"]["psnr_db"] > 0


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "ldmkit", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "demo" in out.stdout and "export" in out.stdout


def test_export_keeps_each_files_metadata(tiny_fashion_pipeline, exported):
    """The LPIPS feature net's config lives in its file's metadata: exported, it must still load."""
    from ldmkit.autoencoder.featnet import load_featnet
    src = tiny_fashion_pipeline / "autoencoder" / "lpips_featnet.safetensors"
    assert src.exists()
    net = load_featnet(exported / "autoencoder" / "lpips_featnet.safetensors")
    assert net.cfg == load_featnet(src).cfg
