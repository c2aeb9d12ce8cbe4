"""Schedules and samplers: closed-form Gaussian checks, convergence orders, and step-by-step diffusers references."""

import math

import pytest
import torch
from conftest import require

from ldmkit.diffusion import samplers as S
from ldmkit.diffusion import schedules as sch
from ldmkit.diffusion.objectives import Objective, make_denoiser
from ldmkit.seeding import example_generators

MU = torch.tensor([1.0, -0.5, 0.25, 2.0])  # data mean per dimension
STD = torch.tensor([0.5, 1.0, 0.3, 1.5])  # data std per dimension


def gaussian_denoiser(x, sigma):
    """Exact E[x0 | x] for x0 ~ N(MU, diag STD^2), x = x0 + sigma eps (at sigma = inf: MU)."""
    sg = sigma.view(-1, 1).to(x.dtype)
    mu, s = MU.to(x.dtype), STD.to(x.dtype)
    return mu + s**2 / (s**2 + sg**2) * (x - mu)


def exact_ode_solution(x_T, sigma_max):
    """Probability-flow ODE from sigma_max to 0 for Gaussian data: x0 = mu + (x_T - mu) s / sqrt(s^2 + sigma_max^2)."""
    mu, s = MU.to(x_T.dtype), STD.to(x_T.dtype)
    return mu + (x_T - mu) * s / (s**2 + sigma_max**2).sqrt()


# ------------------------------------------------------------------------------------------ schedules


def test_schedules_match_diffusers():
    diffusers = require("diffusers")
    cases = [("scaled-linear", "scaled_linear", 0.00085, 0.012), ("linear", "linear", 1e-4, 0.02),
             ("cosine", "squaredcos_cap_v2", 1e-4, 0.02)]
    for ours, theirs, b0, b1 in cases:
        for zero_snr in (False, True):
            ref = diffusers.DDIMScheduler(beta_schedule=theirs, beta_start=b0, beta_end=b1,
                                          rescale_betas_zero_snr=zero_snr).alphas_cumprod.double()
            got = sch.get_schedule(ours, zero_snr).alphas_cumprod
            torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-7, msg=f"{ours} zero_snr={zero_snr}")


def test_zero_snr_schedule_ends_in_pure_noise():
    s = sch.get_schedule("scaled-linear", zero_snr=True)
    assert s.alphas_cumprod[-1] == 0 and math.isinf(s.sigma_max)
    assert s.timestep(torch.tensor([math.inf])).item() == 999
    sigmas = s.sample_sigmas(10)
    assert math.isinf(sigmas[0]) and sigmas[-1] == 0 and torch.isfinite(sigmas[1:]).all()
    with pytest.raises(ValueError, match="sigma_max"):
        s.sample_sigmas(10, "karras")
    assert torch.isfinite(s.sample_sigmas(10, "karras", sigma_max=80.0)).all()


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_sample_sigmas_match_diffusers(spacing):
    diffusers = require("diffusers")
    for n in (1, 7, 10, 50) if spacing != "linspace" else (7, 10, 50):  # diffusers' linspace n=1 starts at t=0
        ref = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                               timestep_spacing=spacing)
        ref.set_timesteps(n)
        ours = sch.get_schedule("scaled-linear")
        torch.testing.assert_close(sch.spacing_timesteps(spacing, n).float(), ref.timesteps)
        got = ours.sample_sigmas(n, spacing)
        assert got.shape == (n + 1,) and got[-1] == 0
        if spacing != "linspace":  # fractional timesteps: we interpolate log sigma, diffusers interpolates sigma
            torch.testing.assert_close(got, ref.sigmas, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.timestep(got[:-1].double()).float(), ref.timesteps, rtol=0, atol=1e-3)


def test_karras_sigmas_match_diffusers():
    diffusers = require("diffusers")
    ref = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                           timestep_spacing="linspace", use_karras_sigmas=True)
    ref.set_timesteps(25)
    ours = sch.get_schedule("scaled-linear")
    torch.testing.assert_close(ours.sample_sigmas(25, "karras"), ref.sigmas, rtol=1e-5, atol=1e-6)
    # diffusers' own sigma -> t map (log-sigma interpolation) agrees with ours at non-table sigmas
    torch.testing.assert_close(ours.timestep(ref.sigmas[:-1].double()).float(), ref.timesteps, rtol=0, atol=1e-3)


def test_timestep_sigma_round_trip():
    s = sch.get_schedule("cosine")
    t = torch.rand(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 999
    torch.testing.assert_close(s.timestep(s.sigma_at(t)), t)
    assert s.timestep(torch.tensor([1e-6, 1e6])).tolist() == [0.0, 999.0]  # clamped outside the table
    with pytest.raises(ValueError, match="timesteps must lie"):
        s.sigma_at(torch.tensor([1000.0]))


def test_flow_schedule_grid():
    f = sch.get_schedule("flow")
    sigmas = f.sample_sigmas(8).double()
    t = torch.linspace(1, 0, 9, dtype=torch.float64)
    assert math.isinf(sigmas[0]) and sigmas[-1] == 0
    torch.testing.assert_close(sigmas[1:-1], t[1:-1] / (1 - t[1:-1]))
    torch.testing.assert_close(f.model_time(sigmas), t * 1000)
    with pytest.raises(ValueError, match="sigma_max"):
        f.sample_sigmas(8, "karras")


def test_bad_inputs_fail_loudly():
    with pytest.raises(ValueError, match="dpmpp-2m"):
        S.get_sampler("dpm++")
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="strictly decreasing"):
        S.euler(gaussian_denoiser, x, torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="strictly decreasing"):
        S.dpmpp_2m(gaussian_denoiser, x, torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="only sigmas"):
        S.euler(gaussian_denoiser, x, torch.tensor([math.inf, math.inf, 0.0]))
    with pytest.raises(ValueError, match="spacing"):
        sch.get_schedule("linear").sample_sigmas(10, "uniform")
    with pytest.raises(ValueError, match="per-example generators"):
        S.prior_noise(torch.tensor([1.0, 0.0]), (3, 4), generator=example_generators(0, [0, 1]))


# ------------------------------------------------------------------------------------ closed-form checks

STEPS = {"heun": 50, "dpmpp-2m": 50, "euler": 200, "ddim": 200, "ddpm": 500, "euler-ancestral": 500, "sde": 500,
         "sde-vp": 500, "pc": 200}


@pytest.mark.parametrize("name", sorted(S.SAMPLERS))
def test_sampler_reproduces_gaussian_moments(name):
    """Start from pure noise (sigma = inf), then karras steps 80 -> 0.002: samples have the data's mean and std.
    The predictor-corrector sampler runs on 256 dimensions (the data's 4 repeated): its Langevin step size comes
    from the ratio of noise and score norms, which needs many dimensions to be steady (as in images)."""
    n, reps, count = STEPS[name], (64 if name == "pc" else 1), (2000 if name == "pc" else 20000)
    sigmas = torch.cat([torch.tensor([math.inf]), sch.karras_sigmas(n - 1, 0.002, 80.0)])
    g = torch.Generator().manual_seed(0)
    x = S.prior_noise(sigmas, (count, 4 * reps), generator=g)
    out = S.get_sampler(name)(tiled_denoiser(reps), x, sigmas, generator=g).view(count * reps // reps, reps, 4)
    out = out.transpose(0, 1).reshape(-1, 4) if reps > 1 else out.view(count, 4)
    assert torch.all((out.mean(0) - MU).abs() < 4 * STD / math.sqrt(len(out)) + 0.01 * (reps > 1)), out.mean(0)
    # pc: one Langevin step size for all dimensions (from the norms over all of them) is too large for the
    # narrowest one (std 0.3), whose spread comes out ~5% wide at snr 0.16 however many steps are taken
    assert torch.all((out.std(0) / STD - 1).abs() < (0.06 if name == "pc" else 0.03)), out.std(0)


def tiled_denoiser(reps: int):
    """The exact Gaussian denoiser on `reps` copies of the 4 data dimensions side by side."""
    if reps == 1:
        return gaussian_denoiser
    mu, std = MU.repeat(reps), STD.repeat(reps)

    def denoise(x, sigma):
        sg = sigma.view(-1, 1).to(x.dtype)
        return mu.to(x.dtype) + std.to(x.dtype) ** 2 / (std.to(x.dtype) ** 2 + sg**2) * (x - mu.to(x.dtype))
    return denoise


@pytest.mark.parametrize("name,band", [("euler", (1.6, 2.6)), ("ddim", (1.6, 2.6)), ("heun", (3.0, 5.5)),
                                       ("dpmpp-2m", (3.0, 5.5))])
def test_convergence_order(name, band):
    """Error vs the exact probability-flow solution falls ~2x (first order) or ~4x (second order) per doubling."""
    x_T = 10 * torch.randn(2000, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = exact_ode_solution(x_T, 10.0)
    errs = []
    for n in (20, 40, 80):
        sigmas = sch.karras_sigmas(n, 1e-4, 10.0, dtype=torch.float64)
        errs.append((S.get_sampler(name)(gaussian_denoiser, x_T, sigmas) - exact).abs().max().item())
    ratios = [errs[0] / errs[1], errs[1] / errs[2]]
    assert all(band[0] <= r <= band[1] for r in ratios), (errs, ratios)


def test_ddim_eta0_equals_euler():
    sigmas = sch.get_schedule("scaled-linear").sample_sigmas(25)
    x = S.prior_noise(sigmas, (64, 4), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(S.ddim(gaussian_denoiser, x, sigmas), S.euler(gaussian_denoiser, x, sigmas))


def test_ddpm_ddim_eta1_and_euler_ancestral_are_one_chain():
    sigmas = sch.get_schedule("scaled-linear", zero_snr=True).sample_sigmas(20)
    x = S.prior_noise(sigmas, (64, 4), generator=torch.Generator().manual_seed(3))
    outs = [fn(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(4))
            for fn in (S.ddpm, lambda *a, **k: S.ddim(*a, eta=1.0, **k), S.euler_ancestral)]
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(outs[0], outs[2])


@pytest.mark.parametrize("name", ["ddpm", "euler-ancestral", "ddim"])
def test_per_example_generators_make_images_batch_independent(name):
    sigmas = sch.get_schedule("linear").sample_sigmas(10)
    kw = {"eta": 0.5} if name == "ddim" else {}

    def run(indices):
        gens = example_generators(7, indices)
        x = S.prior_noise(sigmas, (len(indices), 4), generator=gens)
        return S.get_sampler(name)(gaussian_denoiser, x, sigmas, generator=gens, **kw)

    batch = run([10, 11, 12, 13])
    alone = run([12])
    torch.testing.assert_close(batch[2:3], alone, rtol=0, atol=0)
    assert not torch.allclose(batch[0], batch[1])
    assert S.euler(gaussian_denoiser, S.prior_noise(sigmas, (2, 4)), sigmas, progress=True).shape == (2, 4)


# ------------------------------------------------------------------------------- diffusers step references


def eps_model(x, t, **_):
    """A fixed nonlinear "eps network" of (x_vp, timestep); t may be a scalar or (B,)."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return 0.8 * torch.tanh(x) + 0.3 * torch.cos(t / 150.0 + x)


def v_model(x, t, **_):
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return 0.5 * torch.sin(2 * x) - 0.7 * x * (t / 1000.0)


def scheduler(cls_name, **kw):
    diffusers = require("diffusers")
    return getattr(diffusers, cls_name)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        timestep_spacing="trailing", **kw)


def ours(kind="eps", zero_snr=False):
    den = make_denoiser(eps_model if kind == "eps" else v_model, Objective(kind=kind, zero_snr=zero_snr))
    return lambda x, sigma: den(x, sigma)


def start(shape=(2, 3, 4, 4), seed=5):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def to_sigma_space(x_vp, sigma):
    return x_vp * (1 + float(sigma) ** 2) ** 0.5


def test_euler_matches_diffusers():
    ref = scheduler("EulerDiscreteScheduler")
    ref.set_timesteps(10)
    sigmas = sch.get_schedule("scaled-linear").sample_sigmas(10)
    x = start() * ref.init_noise_sigma
    for i, t in enumerate(ref.timesteps):
        step = S.euler(ours(), x, sigmas[i:i + 2])
        x = ref.step(eps_model(ref.scale_model_input(x, t), t), t, x).prev_sample
        torch.testing.assert_close(step, x, atol=1e-5, rtol=1e-5)


def test_heun_matches_diffusers():
    ref = scheduler("HeunDiscreteScheduler")
    ref.set_timesteps(8)
    sigmas = sch.get_schedule("scaled-linear").sample_sigmas(8)
    x = start() * ref.init_noise_sigma
    mine = x.clone()
    steps_done = 0
    for t in ref.timesteps:
        x = ref.step(eps_model(ref.scale_model_input(x, t), t), t, x).prev_sample
        if ref.state_in_first_order:  # a full Heun step (two evaluations, or one on the final step) finished
            mine = S.heun(ours(), mine, sigmas[steps_done:steps_done + 2])
            steps_done += 1
            torch.testing.assert_close(mine, x, atol=1e-5, rtol=1e-5)
    assert steps_done == 7  # diffusers' final step to sigma = 0 is a lone Euler step (state stays "second order")
    mine = S.heun(ours(), mine, sigmas[7:])
    torch.testing.assert_close(mine, x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_matches_diffusers(eta):
    ref = scheduler("DDIMScheduler", clip_sample=False, set_alpha_to_one=True)
    ref.set_timesteps(10)
    sigmas = sch.get_schedule("scaled-linear").sample_sigmas(10)
    x_vp = start()
    for i, t in enumerate(ref.timesteps):
        noise = torch.randn(x_vp.shape, generator=torch.Generator().manual_seed(100 + i))
        step = S.ddim(ours(), to_sigma_space(x_vp, sigmas[i]), sigmas[i:i + 2], eta=eta,
                      generator=torch.Generator().manual_seed(100 + i))
        x_vp = ref.step(eps_model(x_vp, t), t, x_vp, eta=eta, variance_noise=noise).prev_sample
        torch.testing.assert_close(step, to_sigma_space(x_vp, sigmas[i + 1]), atol=1e-5, rtol=1e-5)


def test_ddim_zero_snr_v_prediction_matches_diffusers():
    """The first step starts from pure noise (sigma = inf): our x holds the noise itself."""
    ref = scheduler("DDIMScheduler", clip_sample=False, set_alpha_to_one=True, rescale_betas_zero_snr=True,
                    prediction_type="v_prediction")
    ref.set_timesteps(10)
    sigmas = sch.get_schedule("scaled-linear", zero_snr=True).sample_sigmas(10)
    assert math.isinf(sigmas[0])
    x_vp = start()
    x = S.prior_noise(sigmas, x_vp.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(x, x_vp)
    for i, t in enumerate(ref.timesteps):
        x = S.ddim(ours("v", zero_snr=True), x, sigmas[i:i + 2])
        x_vp = ref.step(v_model(x_vp, t), t, x_vp).prev_sample
        torch.testing.assert_close(x, to_sigma_space(x_vp, sigmas[i + 1]), atol=1e-5, rtol=1e-5)


def test_ddpm_matches_diffusers():
    ref = scheduler("DDPMScheduler", clip_sample=False, variance_type="fixed_small")
    ref.set_timesteps(10)
    sigmas = sch.get_schedule("scaled-linear").sample_sigmas(10)
    x_vp = start()
    for i, t in enumerate(ref.timesteps):
        step = S.ddpm(ours(), to_sigma_space(x_vp, sigmas[i]), sigmas[i:i + 2],
                      generator=torch.Generator().manual_seed(200 + i))
        x_vp = ref.step(eps_model(x_vp, t), t, x_vp, generator=torch.Generator().manual_seed(200 + i)).prev_sample
        torch.testing.assert_close(step, to_sigma_space(x_vp, sigmas[i + 1]), atol=1e-5, rtol=1e-5)


def test_euler_ancestral_matches_diffusers():
    ref = scheduler("EulerAncestralDiscreteScheduler")
    ref.set_timesteps(10)
    sigmas = sch.get_schedule("scaled-linear").sample_sigmas(10)
    x = start() * ref.init_noise_sigma
    for i, t in enumerate(ref.timesteps):
        step = S.euler_ancestral(ours(), x, sigmas[i:i + 2], generator=torch.Generator().manual_seed(300 + i))
        x = ref.step(eps_model(ref.scale_model_input(x, t), t), t, x,
                     generator=torch.Generator().manual_seed(300 + i)).prev_sample
        torch.testing.assert_close(step, x, atol=1e-5, rtol=1e-5)


def test_dpmpp_2m_matches_diffusers():
    ref = scheduler("DPMSolverMultistepScheduler", algorithm_type="dpmsolver++", solver_order=2)
    ref.set_timesteps(10)
    sigmas = sch.get_schedule("scaled-linear").sample_sigmas(10)
    torch.testing.assert_close(sigmas, ref.sigmas, rtol=1e-5, atol=1e-6)
    x0_vp = start()
    traj = [x0_vp]
    for t in ref.timesteps:
        traj.append(ref.step(eps_model(traj[-1], t), t, traj[-1]).prev_sample)
    x = to_sigma_space(x0_vp, sigmas[0])
    two = S.dpmpp_2m(ours(), x, sigmas[:3])  # the second step uses the multistep history
    torch.testing.assert_close(two, to_sigma_space(traj[2], sigmas[2]), atol=1e-5, rtol=1e-5)
    full = S.dpmpp_2m(ours(), x, sigmas)
    torch.testing.assert_close(full, traj[-1], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ score-SDE samplers


def test_the_langevin_corrector_repairs_a_coarse_predictor():
    """With 40 predictor steps the reverse-SDE (Euler-Maruyama) samples come out ~15% too wide; one Langevin
    corrector step per level (snr 0.16) halves that (measured: 0.145 -> 0.070 mean relative error of the std;
    exact score, 256 dimensions as in the moments test)."""
    sigmas = torch.cat([torch.tensor([math.inf]), sch.karras_sigmas(40, 0.002, 80.0)])
    errs = {}
    for name, fn in (("sde", S.sde_ve), ("pc", S.pc)):
        g = torch.Generator().manual_seed(5)
        x = S.prior_noise(sigmas, (2000, 256), generator=g)
        out = fn(tiled_denoiser(64), x, sigmas, generator=g).view(2000, 64, 4).reshape(-1, 4)
        errs[name] = (out.std(0) / STD - 1).abs().mean().item()
    assert errs["pc"] < 0.6 * errs["sde"], errs


def test_score_sde_steps_match_diffusers_score_sde_ve_scheduler():
    """One corrector step then one predictor step, against diffusers' ScoreSdeVeScheduler.step_correct and
    step_pred fed the exact score and the same generator (one example, where per-example and batch norms agree)."""
    diffusers = require("diffusers")
    sched = diffusers.ScoreSdeVeScheduler(snr=0.16, sigma_min=0.01, sigma_max=50.0)
    sched.set_timesteps(20)
    sched.set_sigmas(20)
    t = sched.timesteps[5]
    k = int((t * (len(sched.timesteps) - 1)).long())
    sigma, prev = float(sched.discrete_sigmas[k]), float(sched.discrete_sigmas[k - 1])
    x = 3 * torch.randn(1, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def score(v, s):
        return (gaussian_denoiser(v, torch.tensor([s], dtype=v.dtype)) - v) / s**2
    g = torch.Generator().manual_seed(7)
    y = sched.step_correct(score(x, sigma), x, generator=g).prev_sample
    ref = sched.step_pred(score(y, sigma), t, y, generator=g).prev_sample
    ours = S.pc(gaussian_denoiser, x, torch.tensor([sigma, prev], dtype=torch.float64), snr=0.16,
                generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-8)
