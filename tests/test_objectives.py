"""Training objectives and denoiser wrappers: target conversions, seeding, Min-SNR weights, references, overfitting."""

import math

import pytest
import torch
from conftest import require
from torch import nn

from ldmkit.diffusion import samplers as S
from ldmkit.diffusion.objectives import (
    Objective,
    draw_training_noise,
    logit_normal_time,
    make_denoiser,
    min_snr_weight,
    training_loss,
)
from ldmkit.diffusion.schedules import FlowSchedule, get_schedule
from ldmkit.nn import timestep_embedding
from ldmkit.seeding import example_generators

OBJECTIVES = {
    "eps": Objective(kind="eps"),
    "v": Objective(kind="v"),
    "x0": Objective(kind="x0", schedule="cosine"),
    "flow": Objective(kind="flow"),
    "v-zero-snr": Objective(kind="v", schedule="linear", zero_snr=True),
}


def test_objective_config_is_validated():
    with pytest.raises(ValueError, match="kind='v'"):
        Objective(kind="eps", zero_snr=True)
    with pytest.raises(ValueError, match="kind"):
        Objective(kind="score")
    with pytest.raises(ValueError, match="schedule"):
        Objective(schedule="quadratic")
    with pytest.raises(ValueError, match="p_uncond"):
        Objective(p_uncond=1.5)
    with pytest.raises(ValueError, match="min_snr_gamma"):
        Objective(min_snr_gamma=0.0)


# ------------------------------------------------------------------------------ target conversions


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_exact_target_gives_back_x0(name):
    """A backbone that outputs the exact training target makes the denoiser return x0 (float64, to 1e-10)."""
    obj = OBJECTIVES[name]
    schedule = obj.get_schedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.03, 0.7, 1.0, 3.3, 14.0, 2.2], dtype=torch.float64)
    if math.isinf(schedule.sigma_max):
        sigma[-1] = math.inf  # pure noise: x holds eps itself
    col = sigma.view(-1, 1, 1, 1)
    x = torch.where(torch.isinf(col), eps, x0 + col * eps)

    def oracle(x_in, t, **_):
        if obj.kind == "flow":  # model time t * 1000, input (1 - t) x0 + t eps
            tt = (t / 1000).view(-1, 1, 1, 1)
            torch.testing.assert_close(x_in, (1 - tt) * x0 + tt * eps, rtol=0, atol=1e-10)
            return eps - x0
        a = 1 / (1 + schedule.sigma_at(t) ** 2).view(-1, 1, 1, 1)  # abar at the continuous timestep
        torch.testing.assert_close(x_in, a.sqrt() * x0 + (1 - a).sqrt() * eps, rtol=0, atol=1e-10)
        return {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[obj.kind]

    torch.testing.assert_close(make_denoiser(oracle, obj)(x, sigma), x0, rtol=0, atol=1e-10)


def test_denoiser_rejects_bad_sigma_shape():
    den = make_denoiser(lambda x, t, **_: x, Objective(kind="v"))
    with pytest.raises(ValueError, match="sigma must have shape"):
        den(torch.zeros(3, 4), torch.tensor(1.0))


def test_vp_training_inputs_match_diffusers():
    """x_t and the v target equal diffusers' DDPMScheduler.add_noise / get_velocity at the drawn timesteps."""
    diffusers = require("diffusers")
    ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x0 = torch.randn(16, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    idx = torch.arange(100, 116)
    seen = {}

    def recorder(x_t, t, **kw):
        seen.update(x_t=x_t, t=t, drop=kw["drop"])
        return torch.zeros_like(x_t)

    loss = training_loss(recorder, x0, None, idx, Objective(kind="v"), seed=3)
    noise, u, drop = draw_training_noise(3, idx, (2, 4, 4), 0.1)
    k = (u * 1000).long()
    torch.testing.assert_close(seen["t"], k.float())
    assert torch.equal(seen["drop"], drop)
    torch.testing.assert_close(seen["x_t"], ref.add_noise(x0, noise, k), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loss, ref.get_velocity(x0, noise, k).pow(2).flatten(1).mean(1), atol=1e-6, rtol=1e-5)


def test_logit_normal_time_matches_torch_distributions():
    u = torch.linspace(0.001, 0.999, 101)
    ref = torch.sigmoid(torch.distributions.Normal(0.5, 1.3).icdf(u))
    torch.testing.assert_close(logit_normal_time(u, 0.5, 1.3), ref, atol=1e-6, rtol=1e-5)


def test_flow_training_input_and_target():
    x0 = torch.randn(8, 3, generator=torch.Generator().manual_seed(2))
    seen = {}

    def recorder(x_t, t, **_):
        seen.update(x_t=x_t, t=t)
        return torch.zeros_like(x_t)

    obj = Objective(kind="flow", logit_mean=-0.5, logit_std=0.8)
    loss = training_loss(recorder, x0, {}, torch.arange(8), obj, seed=4)
    noise, u, _ = draw_training_noise(4, torch.arange(8), (3,), obj.p_uncond)
    t = logit_normal_time(u, -0.5, 0.8)
    torch.testing.assert_close(seen["t"], t * 1000)
    torch.testing.assert_close(seen["x_t"], (1 - t[:, None]) * x0 + t[:, None] * noise)
    torch.testing.assert_close(loss, (noise - x0).pow(2).mean(1))


# ----------------------------------------------------------------------------------------- seeding


def test_training_draws_depend_only_on_the_sample_index():
    a = draw_training_noise(11, torch.tensor([5, 6, 7, 8]), (2, 3), 0.3)
    b = draw_training_noise(11, torch.tensor([7]), (2, 3), 0.3)
    for full, single in zip(a, b):
        assert torch.equal(full[2:3], single)
    c = draw_training_noise(12, torch.tensor([7]), (2, 3), 0.3)
    assert not torch.equal(b[0], c[0])
    noise, u, drop = draw_training_noise(0, torch.arange(4000), (1,), 0.25)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.02
    assert abs(drop.float().mean().item() - 0.25) < 0.03 and abs(noise.std().item() - 1) < 0.05
    with pytest.raises(ValueError, match="int64"):
        draw_training_noise(0, torch.arange(4, dtype=torch.int32), (1,), 0.1)


def test_training_loss_is_batch_independent_and_merges_drop():
    net = nn.Linear(3, 3).double()
    drops = []

    def backbone(x, t, drop=None, **_):
        drops.append(drop)
        return net(x) * (1 + t[:, None] / 1000)

    x0 = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    obj = Objective(kind="eps", p_uncond=0.0)
    full = training_loss(backbone, x0, None, torch.arange(20, 26), obj, seed=9)
    part = training_loss(backbone, x0[3:5], None, torch.arange(23, 25), obj, seed=9)
    torch.testing.assert_close(full[3:5], part)
    forced = torch.tensor([True, False, False, False, False, True])
    training_loss(backbone, x0, {"drop": forced}, torch.arange(6), obj, seed=9)
    assert torch.equal(drops[-1], forced)


# ------------------------------------------------------------------------------------------ Min-SNR


def test_min_snr_weights_match_their_formulas():
    snr = torch.logspace(-3, 3, 25, dtype=torch.float64)
    g = 5.0
    torch.testing.assert_close(min_snr_weight(snr, "eps", g), torch.minimum(snr, torch.full_like(snr, g)) / snr)
    torch.testing.assert_close(min_snr_weight(snr, "x0", g), snr.clamp(max=g))
    torch.testing.assert_close(min_snr_weight(snr, "v", g), snr.clamp(max=g) / (snr + 1))
    # flow: x0_hat = x_t - t v_hat, so |x0 error|^2 = t^2 |v error|^2; weight = min(SNR, g) t^2 with SNR = ((1-t)/t)^2
    t = 1 / (1 + snr.sqrt())
    torch.testing.assert_close(min_snr_weight(snr, "flow", g), snr.clamp(max=g) * t**2)
    assert min_snr_weight(torch.tensor([math.inf]), "flow", g).item() == 0  # t = 0


@pytest.mark.parametrize("kind", ["eps", "v", "x0", "flow"])
def test_min_snr_weighting_is_applied(kind):
    x0 = torch.randn(32, 4, generator=torch.Generator().manual_seed(6))
    ts = []

    def backbone(x, t, **_):
        ts.append(t)
        return 0.5 * x

    plain = training_loss(backbone, x0, None, torch.arange(32), Objective(kind=kind), seed=1)
    weighted = training_loss(backbone, x0, None, torch.arange(32), Objective(kind=kind, min_snr_gamma=5.0), seed=1)
    if kind == "flow":
        t = ts[-1] / 1000
        snr = ((1 - t) / t) ** 2
    else:
        abar = get_schedule("scaled-linear").alphas_cumprod[ts[-1].long()].float()
        snr = abar / (1 - abar)
    torch.testing.assert_close(weighted, plain * min_snr_weight(snr, kind, 5.0))


# ------------------------------------------------------------------------------------------- overfit


class TinyMLP(nn.Module):
    """A small time-conditioned MLP backbone over flattened 2x4x4 latents (test-only)."""

    def __init__(self, dim=32, width=256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 64, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x, t, drop=None, **_):
        h = torch.cat([x.flatten(1), timestep_embedding(t, 64)], dim=1)
        return self.net(h).view_as(x)


def optimal_backbone(data, obj):
    """The exact minimiser of the training loss for the empirical distribution of `data` (closed form)."""
    schedule = obj.get_schedule()

    def backbone(x_in, t, **_):
        if obj.kind == "flow":
            sigma = FlowSchedule.sigma_from_t(t / 1000)
        else:
            sigma = schedule.sigma_at(t.double()).float()
        col = sigma.view(-1, 1, 1, 1)
        x = x_in / schedule.input_scale(sigma).view(-1, 1, 1, 1)  # back to x = x0 + sigma eps
        d2 = (x[:, None] - data[None]).pow(2).flatten(2).sum(2)  # (B, N) squared distances
        x0 = torch.einsum("bn,n...->b...", torch.softmax(-d2 / (2 * col.view(-1, 1) ** 2), 1), data)  # E[x0 | x]
        eps = (x - x0) / col
        a = 1 / (1 + col**2)
        return {"x0": x0, "eps": eps, "flow": eps - x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[obj.kind]

    return backbone



@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_overfits_eight_latents(name, one_thread):
    """Excess loss over the closed-form optimum falls >10x in 2000 steps; ODE samples land on training points."""
    torch.manual_seed(0)
    obj = OBJECTIVES[name]
    data = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(123))
    model = TinyMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    steps, batch = 2000, 64
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    eval_idx = 10**6 + torch.arange(1024)

    def eval_loss(backbone):
        with torch.no_grad():
            return training_loss(backbone, data[eval_idx % 8], None, eval_idx, obj, seed=0).mean().item()

    floor, before = eval_loss(optimal_backbone(data, obj)), eval_loss(model)
    for step in range(steps):
        idx = step * batch + torch.arange(batch)  # global sample indices
        loss = training_loss(model, data[idx % 8], None, idx, obj, seed=0).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    after = eval_loss(model)
    assert after - floor < (before - floor) / 10, (floor, before, after)

    denoise = make_denoiser(model.eval(), obj)
    sigmas = obj.get_schedule().sample_sigmas(30)
    median_bound = 0.35 if obj.kind == "eps" else 0.1  # eps errors are amplified by sigma_max at the first steps
    for sampler in ("euler", "dpmpp-2m"):
        x = S.prior_noise(sigmas, (64, 2, 4, 4), generator=example_generators(0, range(64)))
        out = S.get_sampler(sampler)(lambda x, s: denoise(x, s), x, sigmas)
        dist = torch.cdist(out.flatten(1), data.flatten(1)).min(1).values / math.sqrt(32)  # RMS per element
        # (a standard-normal draw lies ~1.3 from the nearest training point)
        assert dist.median() < median_bound and dist.quantile(0.9) < 0.6, (sampler, dist.median(), dist.max())
