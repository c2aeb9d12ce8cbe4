"""The autoencoder stage: `ldmkit train autoencoder` (tiny preset), exact resume, and `ldmkit autoencoder eval`."""

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from ldmkit.checkpoint import load_safetensors, load_state, read_json
from ldmkit.cli import main as cli
from ldmkit.train import common


def train_args(out, data="shapes", *sets):
    args = ["train", "autoencoder", "--data", data, "--preset", "tiny", "--out", str(out), "--no-progress"]
    for s in sets:
        args += ["--set", s]
    return args


@pytest.fixture(scope="module")
def fashion_run(tmp_path_factory):
    from conftest import require_fashion_mnist
    require_fashion_mnist()
    out = tmp_path_factory.mktemp("ae") / "fashion"
    assert cli(train_args(out, "fashion-mnist", "train.steps=6", "loss.disc_start=3")) == 0
    return out


def test_tiny_shapes_writes_a_loadable_stage(tmp_path):
    from ldmkit.autoencoder import AutoencoderKL
    from ldmkit.stages import load_autoencoder
    out = tmp_path / "ae"
    assert cli(train_args(out, "shapes", "train.steps=6", "train.ckpt_every=3", "loss.disc_start=3")) == 0
    cfg, metrics = read_json(out / "config.json"), read_json(out / "metrics.json")
    assert cfg["stage"] == "autoencoder" and cfg["data"] == "shapes"
    assert cfg["model"]["in_channels"] == cfg["model"]["out_channels"] == 3  # set from the RGB data
    assert cfg["loss"]["discriminator"]["in_channels"] == 3
    assert metrics["steps_done"] == 6 and 0 < metrics["scale_factor"] < 100 and metrics["shift_factor"] == 0.0
    assert (out / "recon.png").exists() and (out / "lpips_featnet.safetensors").exists()
    ae, scale, shift = load_autoencoder(out)
    assert isinstance(ae, AutoencoderKL) and scale == metrics["scale_factor"] and shift == 0.0
    weights = load_safetensors(out / "model.safetensors")
    assert set(weights) == set(ae.state_dict())  # autoencoder weights only (the EMA), no disc or logvar
    ema = load_state(out / "state.pt")["modules"]["ema"]
    assert all(torch.equal(weights[k], ema[k]) for k in weights)


def test_patch_size_stage_round_trips_through_its_directory(tmp_path):
    """A patch-2 autoencoder (the fashion-mnist-small layout, tiny widths) trains, and its directory loads back
    into the same layout: 32x32 images to 8x8 latents, weights equal to the exported EMA."""
    from ldmkit.stages import load_autoencoder
    out = tmp_path / "ae"
    assert cli(train_args(out, "shapes", "train.steps=4", "loss.disc_start=2", "model.patch_size=2",
                          "model.block_out_channels=[8,16]")) == 0
    ae, _, _ = load_autoencoder(out)
    assert ae.cfg.patch_size == 2 and ae.cfg.downsample_factor == 4 and ae.encoder.conv_in.in_channels == 12
    assert ae.encode(torch.zeros(1, 3, 32, 32)).mean.shape == (1, 4, 8, 8)
    weights = load_safetensors(out / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in ae.state_dict().items())


def test_scale_factor_is_one_over_std_of_posterior_samples(tmp_path):
    """The exact moment formula agrees with the std of many posterior draws (Monte Carlo, no shared code)."""
    from ldmkit.data import load_dataset
    from ldmkit.stages import load_autoencoder
    out = tmp_path / "ae"
    assert cli(train_args(out, "shapes", "train.steps=4")) == 0
    ae, scale, _ = load_autoencoder(out)
    n = read_json(out / "metrics.json")["latent_stats_images"]
    ds = load_dataset("shapes")
    with torch.no_grad():
        post = ae.encode(ds.to_float(ds.images[:n]))
        q = torch.distributions.Normal(post.mean.double(), post.std.double())
        z = q.sample((64,))  # (64, n, c, h, w)
    assert 1.0 / z.std().item() == pytest.approx(scale, rel=0.01)


def test_channels_must_match_when_not_taken_from_data(tmp_path):
    with pytest.raises(ValueError, match="in_channels=1 but the dataset has 3 channels"):
        cli([*train_args(tmp_path / "ae", "shapes", "channels_from_data=false"), "--debug"])


def test_discriminator_warms_up_before_its_term_reaches_the_autoencoder(tmp_path):
    import json
    out = tmp_path / "ae"
    assert cli(train_args(out, "shapes", "train.steps=4", "train.log_every=1", "loss.disc_start=3",
                          "disc_warmup_steps=2")) == 0
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [("disc_d" in r, "g" in r) for r in rows] == [(False, False), (True, False), (True, False), (True, True)]
    assert rows[-1]["d_weight"] > 0


class Stop(Exception):
    pass


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_after_first_checkpoint_equals_uninterrupted_run(tmp_path, monkeypatch, optimizer):
    sets = ("train.steps=8", "train.ckpt_every=4", "loss.disc_start=3", "disc_warmup_steps=2",
            "loss.perceptual_weight=1.0", f"train.optimizer={optimizer}")
    assert cli(train_args(tmp_path / "full", "shapes", *sets)) == 0
    save = common.Run.save

    def save_then_stop(self, step, *a, **kw):
        save(self, step, *a, **kw)
        raise Stop

    monkeypatch.setattr(common.Run, "save", save_then_stop)
    with pytest.raises(Stop):
        cli(train_args(tmp_path / "cut", "shapes", *sets))
    assert load_state(tmp_path / "cut" / "state.pt")["step"] == 4
    monkeypatch.setattr(common.Run, "save", save)
    assert cli(train_args(tmp_path / "cut", "shapes", *sets) + ["--resume"]) == 0
    full, cut = load_state(tmp_path / "full" / "state.pt"), load_state(tmp_path / "cut" / "state.pt")
    assert full["step"] == cut["step"] == 8
    for name in ("model", "ema", "disc"):  # the discriminator trained in both halves (from step 1)
        for k, v in full["modules"][name].items():
            assert torch.equal(v, cut["modules"][name][k]), f"{name}.{k} differs after resume"
    a = load_safetensors(tmp_path / "full" / "model.safetensors")
    b = load_safetensors(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [r for r in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len((tmp_path / "full" / "metrics.jsonl").read_text().splitlines())
    assert "disc_d" in rows[-1]  # the discriminator loss was logged


def test_tiny_fashion_trains_and_reports_test_psnr(fashion_run):
    cfg, metrics = read_json(fashion_run / "config.json"), read_json(fashion_run / "metrics.json")
    assert cfg["model"]["in_channels"] == 1 and cfg["data"] == "fashion-mnist"
    assert metrics["test_psnr_images"] == 256 and 5 < metrics["test_psnr"] < 60
    assert metrics["scale_factor"] > 0


@pytest.mark.slow
def test_eval_on_a_pipeline_dir_writes_json_and_npz(fashion_run, tmp_path):
    from ldmkit.data import load_dataset
    from ldmkit.stages import load_autoencoder
    pipe = tmp_path / "pipe"
    shutil.copytree(fashion_run, pipe / "autoencoder")
    assert cli(["train", "eval-classifier", "--preset", "tiny", "--out", str(pipe / "eval-classifier"),
                "--no-progress"]) == 0
    npz = tmp_path / "recon.npz"
    assert cli(["autoencoder", "eval", str(pipe), "--npz", str(npz), "--batch-size", "1000"]) == 0
    res = read_json(pipe / "autoencoder" / "eval.json")
    keys = {"psnr", "ssim", "lpips", "latent_mean", "latent_std", "kl_per_channel", "lpips_backbone",
            "eval_classifier_acc_orig", "eval_classifier_acc_recon", "eval_classifier_sha256"}
    keys |= {"psnr_sample"}
    assert keys <= set(res) and res["n"] == 10000 and res["lpips_backbone"]["kind"] == "featnet"
    assert (pipe / "autoencoder" / "eval_recon.png").exists()
    recon = np.load(npz, allow_pickle=False)["images"]
    assert recon.shape == (10000, 28, 28, 1) and recon.dtype == np.uint8
    # PSNR recomputed from the npz with numpy: per image 10 log10(255^2 / MSE), then the mean
    test = load_dataset("fashion-mnist", split="test")
    orig = test.crop(test.images).permute(0, 2, 3, 1).numpy().astype(np.float64)
    mse = ((orig - recon.astype(np.float64)) ** 2).reshape(len(orig), -1).mean(1)
    assert res["psnr"] == pytest.approx(np.mean(10 * np.log10(255.0 ** 2 / mse)), rel=1e-9)
    # KL per channel against torch.distributions, averaged over all test images
    ae, _, _ = load_autoencoder(pipe / "autoencoder")
    kl = 0
    with torch.no_grad():
        for i in range(0, len(test), 1000):
            post = ae.encode(test.to_float(test.images[i:i + 1000]))
            q = torch.distributions.Normal(post.mean.double(), post.std.double())
            kl = kl + torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum((0, 2, 3))
    np.testing.assert_allclose(res["kl_per_channel"], (kl / len(test)).numpy(), rtol=1e-6)
    assert 0 <= res["eval_classifier_acc_orig"] <= 1 and 0 <= res["eval_classifier_acc_recon"] <= 1


def test_reconstruct_sample_decodes_follow_the_posterior_std():
    """Sample decodes equal mode decodes when the posterior is a point mass and differ when it is wide."""
    from ldmkit.autoencoder import PRESETS as AE_PRESETS
    from ldmkit.autoencoder import AutoencoderKL
    from ldmkit.autoencoder.posterior import DiagonalGaussian
    from ldmkit.data import load_dataset
    from ldmkit.eval.autoencoder_eval import reconstruct
    torch.manual_seed(0)
    ae = AutoencoderKL(AE_PRESETS["tiny"]).eval()
    images = load_dataset("shapes", split="test", num=6).images[:, :1]
    encode = ae.encode
    for logvar, same in ((-30.0, True), (4.0, False)):
        def fixed(x, logvar=logvar):
            mean = encode(x).mean
            return DiagonalGaussian(torch.cat([mean, torch.full_like(mean, logvar)], 1))
        ae.encode = fixed
        sampled = []
        recon, _ = reconstruct(ae, images, batch_size=4, samples=sampled)
        diff = (recon.int() - torch.cat(sampled).int()).abs().float()
        if same:  # std 3e-7: at most a rounding flip
            assert diff.max() <= 1
        else:
            assert diff.mean() > 2


def test_posterior_cache_is_reused_only_for_the_same_weights(tmp_path, monkeypatch):
    from ldmkit.autoencoder import PRESETS as AE_PRESETS
    from ldmkit.autoencoder import AutoencoderKL
    from ldmkit.data import load_dataset
    from ldmkit.train import latent_cache as latents
    ds = load_dataset("shapes", split="train", num=12)
    ae = AutoencoderKL(dataclasses.replace(AE_PRESETS["tiny"], in_channels=3, out_channels=3)).eval()
    first = latents.posterior_cache(tmp_path, ae, "hash-a", ds, "shapes", "train", progress=False)
    with torch.no_grad():
        post = ae.encode(ds.to_float(ds.images))
    assert torch.allclose(first["mean"], post.mean, atol=1e-6) and torch.allclose(first["logvar"], post.logvar,
                                                                                  atol=1e-6)
    assert len(list((tmp_path / "latents").iterdir())) == 1

    def no_encoding(*a, **kw):
        raise AssertionError("the cache should have been read, not re-encoded")

    monkeypatch.setattr(latents, "encode_dataset", no_encoding)
    again = latents.posterior_cache(tmp_path, ae, "hash-a", ds, "shapes", "train", progress=False)
    assert all(torch.equal(first[k], again[k]) for k in first)
    with pytest.raises(AssertionError, match="re-encoded"):  # other weights: the stale cache is not used
        latents.posterior_cache(tmp_path, ae, "hash-b", ds, "shapes", "train", progress=False)


def test_a_finished_stage_is_replaced_only_with_overwrite(tmp_path, capsys):
    out = tmp_path / "ae"
    assert cli(train_args(out, "shapes", "train.steps=4", "train.ckpt_every=100")) == 0
    first = (out / "model.safetensors").read_bytes()
    (out / "state.pt").unlink(missing_ok=True)  # no resume state: only the finished run's files
    assert cli(train_args(out, "shapes", "train.steps=4", "train.ckpt_every=100")) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "model.safetensors").read_bytes() == first
    assert cli([*train_args(out, "shapes", "train.steps=4", "train.ckpt_every=100", "train.seed=1"),
                "--overwrite"]) == 0
    assert (out / "model.safetensors").read_bytes() != first
