"""KL autoencoder: diffusers parity, posterior math, losses, discriminator, latent cache."""

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import require

from ldmkit.autoencoder import (
    PRESETS,
    AutoencoderConfig,
    AutoencoderKL,
    DiagonalGaussian,
    DiscriminatorConfig,
    LossConfig,
    NLayerDiscriminator,
    adaptive_gan_weight,
    disc_factor,
    discriminator_loss,
    encode_dataset,
    estimate_scale_factor,
    generator_loss,
    load_latent_cache,
    save_latent_cache,
)
from ldmkit.autoencoder.diffusers_io import config_from_diffusers
from ldmkit.autoencoder.loss import discriminator_adv_loss, generator_adv_loss, init_output_logvar, nll_loss, pixel_loss

SMALL = AutoencoderConfig(in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                          latent_channels=4, norm_groups=4)


def small_model(seed=0, cfg=SMALL):
    torch.manual_seed(seed)
    return AutoencoderKL(cfg)



# ---- diffusers parity -------------------------------------------------------------------------------------------

def _diffusers_vae(attention: bool, **kw):
    diffusers = require("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64),
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                                  latent_channels=4, norm_num_groups=8, mid_block_add_attention=attention, **kw)
    with torch.no_grad():  # non-trivial norms and biases, so a wrong mapping cannot hide behind defaults
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return ref.eval()


@pytest.mark.parametrize("attention", [True, False])
def test_from_diffusers_matches_reference(tmp_path, attention):
    ref = _diffusers_vae(attention, scaling_factor=0.5)
    ref.save_pretrained(tmp_path)
    ours = AutoencoderKL.from_diffusers(tmp_path).eval()
    assert ours.cfg.mid_attention is attention and ours.cfg.scaling_factor == 0.5
    assert ours.cfg.norm_groups == 8 and ours.cfg.block_out_channels == (32, 64)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = ref.encode(x).latent_dist, ours.encode(x)
        torch.testing.assert_close(got.mean, want.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.logvar, want.logvar, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x, sample=False)[0], ref(x, sample_posterior=False).sample,
                                   atol=1e-5, rtol=1e-5)
        # the same numbers in channels_last layout (the fast path on CPU)
        cl = AutoencoderKL.from_diffusers(tmp_path).eval().to(memory_format=torch.channels_last)
        torch.testing.assert_close(cl.decode(z.contiguous(memory_format=torch.channels_last)),
                                   ref.decode(z).sample, atol=1e-5, rtol=1e-5)


def test_from_diffusers_rejects_what_it_cannot_reproduce(tmp_path):
    base = {"block_out_channels": [32, 64], "norm_num_groups": 8}
    with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
        config_from_diffusers({**base, "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]})
    with pytest.raises(ValueError, match="act_fn"):
        config_from_diffusers({**base, "act_fn": "gelu"})
    with pytest.raises(ValueError, match="new_key"):
        config_from_diffusers({**base, "new_key": 1})
    with pytest.raises(FileNotFoundError, match="config.json"):
        AutoencoderKL.from_diffusers(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(base))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        AutoencoderKL.from_diffusers(tmp_path)


# ---- architecture ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("levels", [2, 3, 4, 5])
def test_downsampling_factor_and_shapes(levels):
    cfg = replace(SMALL, block_out_channels=(8,) * levels, latent_channels=3)
    model = small_model(cfg=cfg)
    f = 2 ** (levels - 1)
    assert cfg.downsample_factor == f
    x = torch.randn(2, 1, 32, 48)
    recon, post = model(x)
    assert post.mean.shape == (2, 3, 32 // f, 48 // f) and recon.shape == x.shape


def test_patch_size_is_pixel_unshuffle_around_a_plain_model():
    """patch_size=2 equals a patch-1 model on 2x2-patch channels: the same weights applied to pixel_unshuffle(x)
    give the same moments, and its decoder's output is pixel_shuffle of the plain decoder's; the factor doubles."""
    cfg = replace(SMALL, block_out_channels=(8, 8), in_channels=1, out_channels=1, patch_size=2)
    plain_cfg = replace(cfg, patch_size=1, in_channels=4, out_channels=4)
    assert cfg.downsample_factor == 4 and plain_cfg.downsample_factor == 2
    model, plain = small_model(cfg=cfg), small_model(cfg=plain_cfg)
    plain.load_state_dict(model.state_dict())  # same parameter names and shapes
    x = torch.randn(2, 1, 16, 24)
    post, ref = model.encode(x), plain.encode(F.pixel_unshuffle(x, 2))
    assert post.mean.shape == (2, cfg.latent_channels, 4, 6)
    torch.testing.assert_close(post.mean, ref.mean)
    torch.testing.assert_close(post.logvar, ref.logvar)
    z = post.mode()
    torch.testing.assert_close(model.decode(z), F.pixel_shuffle(plain.decode(z), 2))
    assert model.decode(z).shape == x.shape
    with pytest.raises(ValueError, match="patch_size"):
        replace(cfg, patch_size=0)
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 4"):
        model.encode(torch.randn(1, 1, 18, 16))



def test_seeded_forward_is_deterministic_and_last_layer_is_decoder_output():
    x = torch.randn(2, 1, 16, 16)
    a = small_model(0)(x, generator=torch.Generator().manual_seed(3))[0]
    b = small_model(0)(x, generator=torch.Generator().manual_seed(3))[0]
    c = small_model(0)(x, generator=torch.Generator().manual_seed(4))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    model = small_model()
    assert model.last_layer() is model.decoder.conv_out.weight


# ---- posterior ---------------------------------------------------------------------------------------------------

def test_posterior_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(3, 8, 4, 4, generator=g) * 2
    post = DiagonalGaussian(moments)
    q = torch.distributions.Normal(moments[:, :4], torch.exp(0.5 * moments[:, 4:]))
    p = torch.distributions.Normal(torch.zeros(()), torch.ones(()))
    want_kl = torch.distributions.kl_divergence(q, p)
    torch.testing.assert_close(post.kl(), want_kl.flatten(1).sum(1))
    torch.testing.assert_close(post.kl_per_channel(), want_kl.sum(dim=(2, 3)))
    z = post.sample(torch.Generator().manual_seed(1))
    torch.testing.assert_close(post.nll(z), -q.log_prob(z).flatten(1).sum(1))
    assert torch.equal(post.mode(), moments[:, :4])


def test_posterior_sampling_statistics_and_clamp():
    moments = torch.cat([torch.full((1, 1, 100, 100), 1.5), torch.full((1, 1, 100, 100), math.log(0.25))], 1)
    z = DiagonalGaussian(moments).sample(torch.Generator().manual_seed(0))
    assert abs(z.mean().item() - 1.5) < 0.02 and abs(z.std().item() - 0.5) < 0.02
    clamped = DiagonalGaussian(torch.cat([torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 99.0)], 1))
    assert clamped.logvar.max().item() == 20.0
    with pytest.raises(ValueError, match="even channel count"):
        DiagonalGaussian(torch.zeros(1, 3, 2, 2))


# ---- losses ------------------------------------------------------------------------------------------------------

def test_pixel_and_nll_losses_closed_form():
    x, r = torch.zeros(2, 1, 2, 2), torch.tensor([0.5, -1.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    torch.testing.assert_close(pixel_loss(x, r, "l1"), torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(pixel_loss(x, r, "l2"), torch.tensor([1.0, 4.0]))
    # the per-example form equals LDM's per-pixel broadcast: sum((|x - r| + w p) / exp(s) + s)
    p, w, s = torch.tensor([0.3, 0.1]), 0.7, torch.tensor(0.4)
    per_pixel = ((x - r).abs() + w * p.view(2, 1, 1, 1)) / torch.exp(s) + s
    torch.testing.assert_close(nll_loss(pixel_loss(x, r), p, 4, w, s), per_pixel.flatten(1).sum(1))
    assert init_output_logvar(LossConfig()) is None
    assert init_output_logvar(LossConfig(learn_logvar=True, logvar_init=0.5)).item() == 0.5


def test_adversarial_losses_closed_form():
    real, fake = torch.tensor([2.0, 0.5]).view(2, 1, 1, 1), torch.tensor([-3.0, 0.25]).view(2, 1, 1, 1)
    torch.testing.assert_close(discriminator_adv_loss(real, fake, "hinge"), torch.tensor([0.0, 0.5 * (0.5 + 1.25)]))
    sp = torch.nn.functional.softplus
    torch.testing.assert_close(discriminator_adv_loss(real, fake, "nonsat"), 0.5 * (sp(-real) + sp(fake)).flatten())
    torch.testing.assert_close(generator_adv_loss(fake, "hinge"), torch.tensor([3.0, -0.25]))
    torch.testing.assert_close(generator_adv_loss(fake, "nonsat"), -torch.log(torch.sigmoid(fake)).flatten())


def test_adaptive_gan_weight_is_gradient_norm_ratio():
    w = torch.nn.Parameter(torch.randn(3, 4))
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    got = adaptive_gan_weight((a * w).sum(), (b * w).sum(), w, disc_weight=0.5)
    torch.testing.assert_close(got, 0.5 * a.norm() / (b.norm() + 1e-4))
    assert not got.requires_grad
    assert adaptive_gan_weight((a * w).sum(), (0 * w).sum(), w, 1.0, max_weight=7.0).item() == 7.0


def test_disc_factor_switches_on_at_disc_start():
    cfg = LossConfig(disc_start=10, disc_factor=0.8)
    assert [disc_factor(cfg, s) for s in (0, 9, 10, 500)] == [0.0, 0.0, 0.8, 0.8]
    assert disc_factor(replace(cfg, disc_weight=0.0), 500) == 0.0
    with pytest.raises(ValueError, match="disc_loss"):
        LossConfig(disc_loss="wgan")


class _Identity(torch.nn.Module):  # a stand-in perceptual distance: mean squared difference
    def forward(self, x, y):
        return (x - y).square().flatten(1).mean(1)


def test_generator_loss_terms_and_switch():
    torch.manual_seed(0)
    model = small_model()
    disc = NLayerDiscriminator(DiscriminatorConfig(in_channels=1, base_channels=8, n_layers=2, norm="group"))
    cfg = LossConfig(perceptual_weight=0.5, disc_start=5, kl_weight=1e-3)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    recon, post = model(x, generator=torch.Generator().manual_seed(0))
    before, t0 = generator_loss(cfg, x, recon, post, step=4, lpips=_Identity())
    assert "g" not in t0
    want = (pixel_loss(x, recon) + 256 * 0.5 * _Identity()(x, recon)).mean() + 1e-3 * post.kl().mean()
    torch.testing.assert_close(before, want)
    after, t1 = generator_loss(cfg, x, recon, post, step=5, lpips=_Identity(), disc=disc,
                               last_layer=model.last_layer())
    assert {"rec", "nll", "kl", "perceptual", "g", "d_weight", "total"} <= set(t1)
    torch.testing.assert_close(after, before + t1["d_weight"] * t1["g"])
    after.backward()
    assert model.encoder.conv_in.weight.grad is not None
    with pytest.raises(ValueError, match="disc_start"):
        generator_loss(cfg, x, recon, post, step=5, lpips=_Identity())


def test_discriminator_loss_does_not_reach_the_autoencoder():
    model = small_model()
    disc = NLayerDiscriminator(DiscriminatorConfig(in_channels=1, base_channels=8, n_layers=2))
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    recon, _ = model(x)
    cfg = LossConfig(disc_start=0)
    loss, terms = discriminator_loss(cfg, disc, x, recon, step=0)
    loss.backward()
    assert model.decoder.conv_out.weight.grad is None and disc.main[0].weight.grad is not None
    assert discriminator_loss(replace(cfg, disc_start=10), disc, x, recon, step=3)[0].item() == 0.0


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_discriminator_patch_shape_and_init(norm):
    torch.manual_seed(0)
    disc = NLayerDiscriminator(DiscriminatorConfig(in_channels=3, base_channels=64, n_layers=3, norm=norm))
    assert disc(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)  # 64 -> 32 -> 16 -> 8 -> 7 -> 6
    w = torch.cat([m.weight.flatten() for m in disc.modules() if isinstance(m, torch.nn.Conv2d)])
    assert abs(w.std().item() - 0.02) < 0.002


def test_overfits_eight_images(one_thread):
    torch.manual_seed(0)
    model = AutoencoderKL(PRESETS["tiny"])
    x = torch.nn.functional.interpolate(torch.rand(8, 1, 4, 4) * 2 - 1, size=16, mode="bilinear")  # smooth
    cfg = LossConfig(rec="l2", perceptual="none", kl_weight=1e-6, disc_weight=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(50):
        recon, post = model(x, generator=g)
        loss, terms = generator_loss(cfg, x, recon, post, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(terms["rec"].item())
    assert losses[-1] < losses[0] / 5


# ---- latents -----------------------------------------------------------------------------------------------------

def test_encode_dataset_modes_and_inputs():
    model = small_model()
    imgs = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    z = encode_dataset(model, imgs, batch_size=4, progress=False)
    with torch.no_grad():
        want = model.encode(imgs.float() / 127.5 - 1).mean
    torch.testing.assert_close(z, want)
    z2 = encode_dataset(model, [imgs[:3].float() / 127.5 - 1, imgs[3:].float() / 127.5 - 1], progress=False)
    torch.testing.assert_close(z2, want)
    m = encode_dataset(model, imgs, batch_size=4, mode="moments", progress=False)
    torch.testing.assert_close(m[:, :4], want)
    s1 = encode_dataset(model, imgs, mode="sample", generator=torch.Generator().manual_seed(0), progress=False)
    s2 = encode_dataset(model, imgs, mode="sample", generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.equal(s1, s2) and not torch.equal(s1, z)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        encode_dataset(model, imgs.float(), progress=False)
    with pytest.raises(ValueError, match="mode"):
        encode_dataset(model, imgs, mode="mean", progress=False)


def test_scale_factor_and_cache_round_trip(tmp_path):
    z = torch.randn(1000, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 3
    assert abs(estimate_scale_factor(z) - 1 / 3) < 0.01
    with pytest.raises(ValueError, match="std"):
        estimate_scale_factor(torch.zeros(5, 4))
    path = tmp_path / "latents.safetensors"
    save_latent_cache(path, z, {"autoencoder_hash": "abc", "scale_factor": 0.33})
    got, meta = load_latent_cache(path, autoencoder_hash="abc")
    assert torch.equal(got, z) and meta == {"autoencoder_hash": "abc", "scale_factor": 0.33}
    with pytest.raises(ValueError, match="stale latent cache"):
        load_latent_cache(path, autoencoder_hash="def")
    with pytest.raises(ValueError, match="autoencoder_hash"):
        save_latent_cache(tmp_path / "x.safetensors", z, {"scale_factor": 1.0})
    with pytest.raises(FileNotFoundError):
        load_latent_cache(tmp_path / "missing.safetensors")


def test_presets_and_bad_input():
    assert {k: c.downsample_factor for k, c in PRESETS.items()} == {"tiny": 4, "fashion-mnist": 4, "shapes": 4,
                                                                    "sd": 8, "pixels": 1}
    assert PRESETS["fashion-mnist"].in_channels == 1 and PRESETS["shapes"].in_channels == 3
    model = small_model()
    with pytest.raises(ValueError, match="divisible by the downsampling factor 2"):
        model.encode(torch.zeros(1, 1, 31, 32))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="norm_groups"):
        AutoencoderConfig(block_out_channels=(24, 48), norm_groups=32)


def test_tiled_apply_blends_to_the_exact_result_for_a_local_map():
    """For a map without context (nearest upsampling) tiles blended with the ramps give exactly the untiled output,
    whatever the tile grid (the weights sum to one everywhere)."""
    from ldmkit.autoencoder.tiling import tiled_apply
    x = torch.randn(2, 3, 21, 34, dtype=torch.float64)
    up = lambda t: F.interpolate(t, scale_factor=2.0, mode="nearest")  # noqa: E731
    for tile, overlap in ((8, 2), (10, 4), (16, 0)):
        torch.testing.assert_close(tiled_apply(up, x, tile, overlap, 2.0, 3), up(x), rtol=0, atol=1e-12)


def test_tiled_decode_of_a_trained_autoencoder_blends_its_seams():
    """The bundled shapes autoencoder decodes scenes 3x its training size in 16-cell tiles. Against the untiled
    decode of the same latents the tiled image stays within 10 grey levels on average (each tile normalises and
    attends over its own content, so some difference remains everywhere); the blended overlaps cut the jumps at
    tile borders: the largest mean column-to-column step falls well below that of tiles laid edge to edge. A
    latent no larger than one tile decodes exactly as without tiling."""
    from pathlib import Path

    from ldmkit.data.shapes import load_shapes
    from ldmkit.stages import load_autoencoder
    root = Path(__file__).resolve().parents[1] / "pretrained" / "shapes" / "autoencoder"
    ae, _, _ = load_autoencoder(root)
    x = load_shapes("test", num=4, image_size=96).images.float() / 127.5 - 1  # (4, 3, 96, 96)

    def seam_ratio(img):  # the largest mean step between neighbouring columns against the typical one
        d = (img[..., 1:] - img[..., :-1]).abs().mean((0, 1, 2))
        return float(d.max() / d.median())
    with torch.no_grad():
        z = ae.encode(x).mode()  # (4, 8, 48, 48)
        whole = ae.decode(z).clamp(-1, 1)
        blended = ae.enable_tiling(tile=16, overlap=8).decode(z).clamp(-1, 1)
        edge_to_edge = ae.enable_tiling(tile=16, overlap=0).decode(z).clamp(-1, 1)
        small = ae.decode(z[:, :, :16, :16])
        assert torch.equal(small, ae.disable_tiling().decode(z[:, :, :16, :16]))
    assert float((blended - whole).abs().mean()) * 127.5 < 10
    assert seam_ratio(blended) < 0.7 * seam_ratio(edge_to_edge)

