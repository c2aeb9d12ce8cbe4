"""Muon + AdamW optimizer (train/muon.py): the orthogonalisation against an SVD, the AdamW half against torch's
AdamW, the parameter split, resume through a weights-only state dict."""

import copy
import io

import pytest
import torch
from torch import nn

from ldmkit.config import apply_overrides
from ldmkit.train.common import TrainConfig, make_adamw
from ldmkit.train.muon import NS_COEFFS, MuonAdamW, is_matrix, orthogonalize


@pytest.mark.parametrize("shape", [(24, 80), (80, 24), (32, 32)])
def test_orthogonalize_keeps_singular_vectors_and_flattens_singular_values(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(g, full_matrices=False)
    S = torch.logspace(0, -2, S.numel(), dtype=torch.float64)  # singular values spread over 100x
    g = U @ torch.diag(S) @ Vh
    u = orthogonalize(g, steps=5, dtype=torch.float64)
    core = U.T @ u @ Vh.T  # diagonal iff u has g's singular vectors
    off = core - torch.diag(torch.diagonal(core))
    assert off.abs().max() < 1e-9
    d = torch.diagonal(core)
    assert d.min() > 0.3 and d.max() < 1.2  # the quintic iteration lands near 1, not on it
    # the update's spread is far smaller than the gradient's: max/min 100 -> under 4
    assert d.max() / d.min() < 4


def plain_newton_schulz(g: torch.Tensor, steps: int) -> torch.Tensor:
    """The textbook quintic iteration X <- a X + b (X X^T) X + c (X X^T)^2 X on X0 = g / ||g||_F."""
    a, b, c = NS_COEFFS
    x = g / (torch.linalg.matrix_norm(g, keepdim=True) + 1e-7)  # the same guard as orthogonalize
    tall = x.shape[-2] > x.shape[-1]
    x = x.mT if tall else x
    for _ in range(steps):
        A = x @ x.mT
        x = a * x + b * A @ x + c * A @ A @ x
    return x.mT if tall else x


@pytest.mark.parametrize("shape", [(24, 80), (80, 24), (3, 16, 144)])
@pytest.mark.parametrize("steps", [1, 2, 5])
def test_gram_form_equals_the_plain_iteration(shape, steps):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = plain_newton_schulz(g, steps)
    torch.testing.assert_close(orthogonalize(g, steps, torch.float64), want, atol=1e-10, rtol=1e-10)
    # the float32 run (what training uses) stays close to the float64 one
    torch.testing.assert_close(orthogonalize(g.float(), steps).double(), want, atol=1e-5, rtol=1e-4)


def test_parameter_split_and_adamw_half_matches_torch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 32, 3), nn.GroupNorm(4, 32), nn.Conv2d(32, 32, 3), nn.Conv2d(32, 2, 1))
    opt = MuonAdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    muon, rest = opt.param_groups
    assert muon["muon"] and [p.shape for p in muon["params"]] == [(32, 32, 3, 3)]
    assert not rest["muon"] and len(rest["params"]) == 7  # conv_in (1x9 per row), norm, biases, the 2x32 conv
    assert is_matrix(model[2].weight) and not is_matrix(model[0].weight) and not is_matrix(model[3].weight)
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if not is_matrix(p)], lr=1e-2, betas=(0.9, 0.99),
                                weight_decay=0.1, foreach=False)
    x = torch.randn(4, 1, 9, 9)
    for _ in range(5):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
        with torch.no_grad():  # the reference follows the Muon-updated matrix, so both see the same gradients
            ref[2].weight.copy_(model[2].weight)
    for p, q in zip(model.parameters(), ref.parameters()):
        if not is_matrix(p):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)


def test_muon_step_size_and_resume_through_weights_only_state():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=False)
    w0 = lin.weight.detach().clone()
    opt = MuonAdamW(lin.parameters(), lr=1e-3, ns_dtype=torch.float32)
    (lin(torch.randn(128, 64)) * torch.randn(128, 32)).sum().backward()  # a full-rank gradient
    opt.step()
    step = lin.weight.detach() - w0
    # RMS of an orthogonalised (32, 64) matrix is ~sqrt(32 / (32 * 64)); scaled by 0.2 * sqrt(64) and lr
    rms = step.square().mean().sqrt().item()
    assert 0.5 * 1e-3 * 0.2 < rms < 1.2 * 1e-3 * 0.2
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "w": lin.state_dict()}, buf)
    twin = nn.Linear(64, 32, bias=False)
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    twin.load_state_dict(saved["w"])
    twin_opt = MuonAdamW(twin.parameters(), lr=1e-3, ns_dtype=torch.float32)
    twin_opt.load_state_dict(saved["opt"])
    x = torch.randn(8, 64)
    for m, o in ((lin, opt), (twin, twin_opt)):
        o.zero_grad()
        m(x).square().sum().backward()
        o.step()
    torch.testing.assert_close(lin.weight, twin.weight, atol=0, rtol=0)


def test_make_adamw_picks_the_optimizer():
    params = list(nn.Linear(32, 32).parameters())
    assert isinstance(make_adamw(params, TrainConfig(optimizer="muon")), MuonAdamW)
    assert isinstance(make_adamw(params, TrainConfig()), torch.optim.AdamW)
    assert apply_overrides(TrainConfig(), ["optimizer=muon"]).optimizer == "muon"
    with pytest.raises(ValueError, match="optimizer"):
        apply_overrides(TrainConfig(), ["optimizer=sgd"])
