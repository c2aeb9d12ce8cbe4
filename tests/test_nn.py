"""Shared layers of ldmkit.nn against torch's own implementations."""

import pytest
import torch
import torch.nn.functional as F

from ldmkit.nn import GroupNorm, group_norm

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
