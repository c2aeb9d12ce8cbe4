"""Pixel-space diffusion: the identity autoencoder stage, and a pipeline built on it that trains, samples and edits
with the same commands as a latent one."""

import json

import numpy as np
import pytest
import torch

from ldmkit.autoencoder import AutoencoderConfig, PixelSpace, make_autoencoder
from ldmkit.autoencoder.vae import PRESETS as AE_PRESETS


def test_pixel_space_is_the_identity_with_a_point_posterior():
    ae = make_autoencoder(AE_PRESETS["pixels"])
    assert isinstance(ae, PixelSpace) and ae.cfg.downsample_factor == 1
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    post = ae.encode(x)
    torch.testing.assert_close(post.mode(), x)
    torch.testing.assert_close(post.sample(torch.Generator().manual_seed(0)), x)  # no noise: a point mass
    assert float(post.kl().abs().sum()) == 0.0
    torch.testing.assert_close(ae.decode(post.mode()), x)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        ae.encode(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="latent_channels=4 must equal in_channels=1"):
        AutoencoderConfig(in_channels=1, latent_channels=4, pixel_space=True)


@pytest.fixture(scope="module")
def pixel_pipeline(tmp_path_factory):
    from ldmkit.cli import main as cli
    out = tmp_path_factory.mktemp("pipe") / "tiny-pixels"
    assert cli(["train", "pipeline", "--preset", "tiny-pixels", "--set", "denoiser:train.steps=3", "--out", str(out),
                "--no-progress"]) == 0
    return out


def test_pixel_pipeline_differs_from_a_latent_one_only_in_its_autoencoder(pixel_pipeline, tiny_pipeline):
    spec = json.loads((pixel_pipeline / "pipeline.json").read_text())
    metrics = json.loads((pixel_pipeline / "autoencoder" / "metrics.json").read_text())
    assert spec["latent"]["shape"] == [3, 32, 32]  # the "latents" are the RGB pixels
    assert metrics["steps_done"] == 0 and metrics["params"] == 0
    assert metrics["scale_factor"] == pytest.approx(1 / metrics["latent_std"])
    ours = json.loads((pixel_pipeline / "denoiser" / "config.json").read_text())
    theirs = json.loads((tiny_pipeline / "denoiser" / "config.json").read_text())
    for key in ("unet", "dit", "objective", "sample"):  # the same denoiser, apart from the channels it reads
        a, b = dict(ours[key]), dict(theirs[key])
        for k in ("in_channels", "out_channels", "input_size"):
            a.pop(k, None), b.pop(k, None)
        assert a == b, key


def test_pixel_pipeline_samples_and_edits_with_the_same_commands(pixel_pipeline, tmp_path):
    from ldmkit.cli import main as cli
    from ldmkit.data import load_split
    from ldmkit.images import save_png
    out = tmp_path / "s.npz"
    assert cli(["sample", str(pixel_pipeline), "--prompt", "a red circle", "--num", "2", "--out", str(out),
                "--no-progress"]) == 0
    with np.load(out) as z:
        assert z["images"].shape == (2, 32, 32, 3) and z["images"].dtype == np.uint8
    img = load_split("shapes", "test", None).images[0].numpy().transpose(1, 2, 0)
    save_png(img, tmp_path / "in.png")
    keep = tmp_path / "keep.npz"
    assert cli(["sample", str(pixel_pipeline), "--prompt", "a red circle", "--init-image", str(tmp_path / "in.png"),
                "--strength", "0.0001", "--steps", "4", "--out", str(keep), "--no-progress"]) == 0
    with np.load(keep) as z:  # strength ~0: nothing is denoised, and pixel space reconstructs exactly
        assert np.abs(z["images"][0].astype(int) - img.astype(int)).max() <= 1
