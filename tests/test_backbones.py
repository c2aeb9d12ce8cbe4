"""Denoiser backbones (UNet, DiT): shapes, the conditioning contract (null embeddings, drop, padding mask),
determinism, zero initialisation and overfitting (the fast kernels: test_kernels.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from ldmkit.checkpoint import load_safetensors, save_safetensors
from ldmkit.diffusion.dit import PRESETS as DIT_PRESETS
from ldmkit.diffusion.dit import DiT, DiTConfig, sincos_2d
from ldmkit.diffusion.unet import PRESETS as UNET_PRESETS
from ldmkit.diffusion.unet import UNet, UNetConfig
from ldmkit.nn import count_params

BACKBONES = {"unet": (UNet, UNET_PRESETS["tiny"]), "dit": (DiT, DIT_PRESETS["tiny"])}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every backbone test runs on one thread (the shared `one_thread` fixture)."""


def build(name, seed=0):
    cls, cfg = BACKBONES[name]
    torch.manual_seed(seed)
    return cls(cfg).eval()


def randomize(model, seed=1, std=0.2):
    """Non-zero weights everywhere (zero-init would hide the conditioning paths)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def inputs(model, B=4, T=6, seed=0):
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([T, 2, 4, 1, 5, 3][:B] + [T] * max(0, B - 6))
    return {
        "x": torch.randn(B, cfg.in_channels, 8, 8, generator=g),
        "t": torch.rand(B, generator=g) * 1000,
        "context": torch.randn(B, T, cfg.context_dim, generator=g),
        "context_mask": torch.arange(T)[None] < lengths[:, None],
        "pooled": torch.randn(B, cfg.pooled_dim, generator=g),
    }


def run(model, inp, **over):
    kw = {**inp, **over}
    return model(kw.pop("x"), kw.pop("t"), **kw)


@pytest.mark.parametrize("name", BACKBONES)
def test_output_shape_and_tiny_size(name):
    model = build(name)
    assert count_params(model) < 100_000
    inp = inputs(model, B=3)
    assert run(model, inp).shape == (3, 4, 8, 8)
    assert model(inp["x"], inp["t"]).shape == (3, 4, 8, 8)  # unconditional


def test_dit_patch_1_and_learned_positions():
    torch.manual_seed(0)
    model = randomize(DiT(DiTConfig(width=32, depth=1, head_dim=16, context_dim=8, pooled_dim=0, patch_size=1,
                                    pos_embed="learned", freq_dim=16, out_channels=8)))
    y = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 3, 8))
    assert y.shape == (2, 8, 8, 8) and torch.isfinite(y).all()


def test_dit_patchify_and_unpatchify_keep_pixels_in_their_patch():
    """With no transformer blocks every token is mapped on its own, so a pixel can only move outputs in its patch."""
    torch.manual_seed(0)
    model = randomize(DiT(DiTConfig(width=16, depth=0, head_dim=8, context_dim=8, pooled_dim=0, freq_dim=16)))
    x, t = torch.randn(1, 4, 8, 8), torch.rand(1)
    x2 = x.clone()
    x2[0, 1, 5, 2] += 1.0  # row 5, column 2: patch (2, 1) covers rows 4-5, columns 2-3
    changed = (model(x2, t) - model(x, t)).abs().amax(dim=(0, 1)) > 1e-6  # (8, 8)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[4:6, 2:4] = True
    assert torch.equal(changed, expected)


@pytest.mark.parametrize("name", BACKBONES)
def test_zero_init_gives_zero_output(name):
    model = build(name)
    y = run(model, inputs(model))
    assert torch.equal(y, torch.zeros_like(y))


@pytest.mark.parametrize("name", BACKBONES)
def test_seeded_forward_is_deterministic(name):
    a, b = randomize(build(name, seed=3)), randomize(build(name, seed=3))
    inp = inputs(a)
    assert torch.equal(run(a, inp), run(b, inp))
    assert torch.equal(run(a, inp), run(a, inp))


@pytest.mark.parametrize("name", BACKBONES)
def test_drop_all_equals_no_context(name):
    model = randomize(build(name))
    inp = inputs(model)
    dropped = run(model, inp, drop=torch.ones(4, dtype=torch.bool))
    uncond = model(inp["x"], inp["t"])
    torch.testing.assert_close(dropped, uncond, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(run(model, inp), uncond, atol=1e-3)  # the condition matters at all


@pytest.mark.parametrize("name", BACKBONES)
def test_drop_only_affects_dropped_examples_and_examples_are_independent(name):
    model = randomize(build(name))
    inp = inputs(model)
    drop = torch.tensor([True, False, True, False])
    mixed = run(model, inp, drop=drop)
    cond, uncond = run(model, inp), model(inp["x"], inp["t"])
    torch.testing.assert_close(mixed[~drop], cond[~drop], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[drop], uncond[drop], atol=1e-5, rtol=1e-5)
    for i in range(4):  # each example alone gives what it gave inside the batch
        alone = run(model, {k: v[i:i + 1] for k, v in inp.items()})
        torch.testing.assert_close(alone, cond[i:i + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", BACKBONES)
def test_padding_tokens_do_not_change_output(name):
    model = randomize(build(name))
    inp = inputs(model)
    ref = run(model, inp)
    noisy = inp["context"].clone()
    noisy[~inp["context_mask"]] = 100.0 * torch.randn(int((~inp["context_mask"]).sum()), noisy.shape[-1])
    torch.testing.assert_close(run(model, inp, context=noisy), ref, atol=1e-5, rtol=1e-5)
    # an example with L real tokens equals the same example given only those L tokens (no mask)
    for i, L in enumerate(inp["context_mask"].sum(1).tolist()):
        one = {k: v[i:i + 1] for k, v in inp.items()}
        one["context"], one["context_mask"] = one["context"][:, :L], None
        torch.testing.assert_close(run(model, one), ref[i:i + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", BACKBONES)
def test_context_and_pooled_change_the_output(name):
    model = randomize(build(name))
    inp = inputs(model)
    ref = run(model, inp)
    other = run(model, inp, context=inp["context"] + torch.randn_like(inp["context"]))
    assert (other - ref).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every example reads its tokens
    other = run(model, inp, pooled=torch.randn_like(inp["pooled"]))
    assert (other - ref).abs().amax(dim=(1, 2, 3)).min() > 1e-3


@pytest.mark.parametrize("name", BACKBONES)
def test_cross_attention_learns_from_context_after_training_steps(name):
    """From the zero init, a few steps of training open the text path: outputs then depend on the tokens."""
    model = build(name).train()
    inp = inputs(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(run(model, inp), torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(5))).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        changed = run(model, inp, context=inp["context"].flip(0)) - run(model, inp)
    assert changed.abs().max() > 1e-4


@pytest.mark.parametrize("name", BACKBONES)
def test_tiny_model_overfits_a_small_batch(name):
    model = build(name).train()
    inp = inputs(model, B=8)
    target = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = F.mse_loss(run(model, inp), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])


@pytest.mark.parametrize("name", BACKBONES)
def test_bf16_autocast_forward_backward(name):
    model = randomize(build(name)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = run(model, inputs(model), drop=torch.tensor([True, False, False, False]))
    y.float().square().mean().backward()
    assert y.shape == (4, 4, 8, 8) and torch.isfinite(y.float()).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", BACKBONES)
def test_safetensors_round_trip(name, tmp_path):
    model = randomize(build(name))
    save_safetensors(model.state_dict(), tmp_path / "model.safetensors")
    fresh = build(name, seed=9)
    fresh.load_state_dict(load_safetensors(tmp_path / "model.safetensors"))
    inp = inputs(model)
    assert torch.equal(run(fresh, inp), run(model, inp))


@pytest.mark.parametrize("name", BACKBONES)
def test_bad_conditioning_raises_clear_errors(name):
    model = build(name)
    inp = inputs(model)
    with pytest.raises(ValueError, match="context_dim"):
        run(model, inp, context=torch.randn(4, 6, model.cfg.context_dim + 1))
    with pytest.raises(ValueError, match="drop must be a bool"):
        run(model, inp, drop=torch.ones(4))
    with pytest.raises(ValueError, match="no real token"):
        run(model, inp, context_mask=torch.zeros(4, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="pooled"):
        run(model, inp, pooled=None)
    with pytest.raises(ValueError, match="expects|divisible"):
        run(model, inp, x=torch.randn(4, 3, 8, 8))


def test_all_false_mask_is_fine_for_dropped_examples():
    model = randomize(build("unet"))
    inp = inputs(model)
    mask = inp["context_mask"].clone()
    mask[0] = False
    drop = torch.tensor([True, False, False, False])
    y = run(model, inp, context_mask=mask, drop=drop)
    torch.testing.assert_close(y[:1], model(inp["x"][:1], inp["t"][:1]), atol=1e-5, rtol=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="blocks_per_level"):
        UNetConfig(channel_mults=(1, 2), blocks_per_level=(1,), attention_levels=(False, True))
    with pytest.raises(ValueError, match="head_dim"):
        UNetConfig(channels=48, channel_mults=(1,), blocks_per_level=(1,), attention_levels=(True,))
    with pytest.raises(ValueError, match="patch_size"):
        DiTConfig(input_size=8, patch_size=3)


def test_presets_sizes():
    assert 2.5e6 <= count_params(UNet(UNET_PRESETS["fashion-mnist"])) <= 4.2e6
    assert 2.5e6 <= count_params(DiT(DIT_PRESETS["fashion-mnist"])) <= 4.2e6
    assert count_params(UNet(UNET_PRESETS["shapes"])) > 0


def test_sincos_2d_closed_form():
    pe = sincos_2d(3, 4, 8)  # rows: sin, cos of row * f_i; then cols
    assert pe.shape == (12, 8)
    r, c = 2, 3
    f = torch.tensor([1.0, 1e-2])  # 1 / 10000^(i / 2), i = 0, 1
    want = torch.cat([torch.sin(r * f), torch.cos(r * f), torch.sin(c * f), torch.cos(c * f)])
    torch.testing.assert_close(pe[r * 4 + c], want)
    assert math.isclose(float(pe[0, 2]), 1.0)  # cos(0)


def test_unet_kernels_are_channels_last_and_compute_as_contiguous_ones():
    model = randomize(build("unet")).train()
    kernels = [p for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert kernels and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                            for p in kernels)
    plain = build("unet").train()
    plain.load_state_dict(model.state_dict())
    plain.to(memory_format=torch.contiguous_format)
    assert all(p.is_contiguous() for p in plain.parameters())
    inp = inputs(model)
    outs = []
    for m in (model, plain):
        y = run(m, inp)
        y.square().mean().backward()
        outs.append((y, [p.grad for p in m.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    for g0, g1 in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(g0, g1, rtol=1e-4, atol=1e-6)
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in plain.state_dict().items())
