"""The CPU speed kernels (ldmkit.kernels) against the plain torch forms they replace: values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from ldmkit import kernels
from ldmkit.kernels import ConvLinear, GroupNorm, attention, group_norm, nearest_upsample_conv, written_out_attention

CL = torch.channels_last


@pytest.mark.parametrize("channels,groups", [(8, 8), (12, 6), (16, 8)])
def test_channels_last_group_norm_equals_torch_values_and_gradients(channels, groups):
    torch.manual_seed(0)
    x = (torch.randn(3, channels, 5, 7, dtype=torch.float64) * 2 + 3).contiguous(memory_format=CL)
    g = torch.randn(3, channels, 5, 7, dtype=torch.float64)
    norm = GroupNorm(groups, channels, eps=1e-6).double()
    torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    ref_norm = torch.nn.GroupNorm(groups, channels, eps=1e-6).double()
    ref_norm.load_state_dict(norm.state_dict())
    xa, xb = x.clone().requires_grad_(), x.contiguous().requires_grad_()
    out, ref = norm(xa), ref_norm(xb)
    assert out.is_contiguous(memory_format=CL) and not out.is_contiguous()  # the channels-last path ran
    out.backward(g), ref.backward(g)
    for a, r, name in [(out, ref, "output"), (xa.grad, xb.grad, "d x"), (norm.weight.grad, ref_norm.weight.grad,
                                                                         "d weight"),
                       (norm.bias.grad, ref_norm.bias.grad, "d bias")]:
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10, msg=name)


def test_channels_last_group_norm_float32_keeps_a_large_mean_accurate():
    torch.manual_seed(0)
    x = torch.randn(4, 32, 8, 8) + 1000.0  # variance 1 under a mean 1000x larger: two-pass statistics
    norm = group_norm(32, 32)
    ref = F.group_norm(x.double(), 32, norm.weight.double(), norm.bias.double(), 1e-6)
    out = norm(x.contiguous(memory_format=CL))
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-3)  # fp32 spacing at 1000 is 6e-5 per input


def test_group_norm_keeps_torch_kernel_elsewhere():
    torch.manual_seed(0)
    for channels, groups, layout, dtype in [(32, 8, CL, torch.float32),  # 4 channels per group
                                            (32, 32, torch.contiguous_format, torch.float32),  # NCHW
                                            (32, 32, CL, torch.bfloat16)]:
        norm = GroupNorm(groups, channels).to(dtype)
        torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
        x = torch.randn(2, channels, 6, 6, dtype=dtype).contiguous(memory_format=layout)
        assert torch.equal(norm(x), F.group_norm(x, groups, norm.weight, norm.bias, norm.eps))


def test_group_norm_state_dict_loads_from_torch_groupnorm():
    ours, theirs = group_norm(64, 32), torch.nn.GroupNorm(32, 64, eps=1e-6)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())  # strict: same names and shapes


@pytest.mark.parametrize("shape", [(5, 7, 12), (3, 12), (2, 1, 12)])
def test_conv_linear_matches_torch_linear(shape):
    torch.manual_seed(0)
    layer = ConvLinear(12, 20)
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    ref = F.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, layer.weight, layer.bias), g)
    want = torch.autograd.grad(ref, (x, layer.weight, layer.bias), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert list(layer.state_dict()) == list(torch.nn.Linear(12, 20).state_dict())


def test_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    B, T, S, D, H = 3, 5, 7, 16, 4
    mha = torch.nn.MultiheadAttention(D, H, bias=False, batch_first=True)
    q, k, v = torch.randn(B, T, D), torch.randn(B, S, D), torch.randn(B, S, D)
    mask = torch.rand(B, S) > 0.3
    mask[:, 0] = True
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    ours = attention(q @ wq.T, k @ wk.T, v @ wv.T, H, mask) @ mha.out_proj.weight.T
    ref, _ = mha(q, k, v, key_padding_mask=~mask, need_weights=False)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape,out_ch", [((2, 5, 3, 7), 5), ((3, 16, 8, 8), 16), ((2, 6, 4, 5), 3)])
def test_nearest_upsample_conv_equals_interpolate_then_conv(shape, out_ch):
    """The folded 4x4 transposed conv against nearest x2 + the 3x3 conv, written with torch's own ops: same output
    and same gradients for input, weight and bias (fp32); also when the conv changes the width."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(shape[1], out_ch, 3, padding=1)
    x = torch.randn(*shape, requires_grad=True)
    ref = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), conv.weight, conv.bias, padding=1)
    out = nearest_upsample_conv(x, conv.weight, conv.bias)
    assert out.shape == ref.shape == (shape[0], out_ch, 2 * shape[2], 2 * shape[3])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, [x, conv.weight, conv.bias], g)
    want = torch.autograd.grad(ref, [x, conv.weight, conv.bias], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_written_out_attention_equals_sdpa_values_and_gradients():
    """The written-out form against torch's fused kernel in float64, with and without a key mask."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 10, 6, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.rand(3, 1, 10, generator=g) > 0.3
    mask[..., 0] = True
    for m in (None, mask):
        out, ref = written_out_attention(q, k, v, m), F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
        gy = torch.randn_like(ref)
        for a, b in zip(torch.autograd.grad(out, [q, k, v], gy), torch.autograd.grad(ref, [q, k, v], gy)):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    lo = torch.randn(2, 5, 4, dtype=torch.bfloat16, generator=g)  # bf16 in, bf16 out, float32 softmax inside
    assert written_out_attention(lo, lo, lo).dtype == torch.bfloat16


def test_attention_paths_agree(monkeypatch):
    """Single-head attention over few keys is written out on the CPU, everything else fused: both paths give the
    same result on either side of the cap, and the written-out path is the one taken below it."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 16, 8, generator=g) for _ in range(3))
    calls = []
    monkeypatch.setattr(kernels, "written_out_attention",
                        lambda *a: calls.append(1) or written_out_attention(*a))
    small = attention(q, k, v)
    assert calls == [1]
    monkeypatch.setattr(kernels, "WRITTEN_OUT_MAX_KEYS", 0)
    torch.testing.assert_close(attention(q, k, v), small, atol=1e-6, rtol=1e-5)
    assert calls == [1]


def test_attention_core_is_float32_under_cpu_autocast():
    """Under bf16 autocast the projections are bf16 but the fused core runs in float32: the output is the float32
    attention of the bf16 inputs, cast back to bf16. The written-out path keeps bf16 matmuls, float32 softmax."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 9, 16, generator=g).to(torch.bfloat16) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, written = attention(q, k, v, 4), attention(q, k, v, 1)
    assert fused.dtype == written.dtype == torch.bfloat16
    assert torch.equal(fused, attention(q.float(), k.float(), v.float(), 4).to(torch.bfloat16))
    assert torch.equal(written, written_out_attention(q, k, v))
