"""Guidance: CFG and its variants against closed forms and diffusers; classifier guidance and the latent classifier."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import require

from ldmkit.guidance import (
    PRESETS,
    APGConfig,
    ClassifierConfig,
    NoisyLatentClassifier,
    cat_cond,
    cfg,
    classifier_grad_fn,
    classifier_guidance,
    classifier_loss,
    encode_with_negative,
    guided_denoiser,
    log_sigma_input,
    unconditional,
)

C, H, W, T, D, P = 4, 8, 8, 5, 6, 3


class ToyDenoiser:
    """A deterministic, row-independent conditional denoiser with a learned-null-style `drop`.

    The context enters through a masked mean, so zero padding with mask False does not change the output.
    """

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.wc, self.wp = torch.randn(D, C, generator=g), torch.randn(P, C, generator=g)
        self.null_c, self.null_p = torch.randn(D, generator=g), torch.randn(P, generator=g)
        self.calls = []  # batch size of every call

    def __call__(self, x, sigma, cond):
        self.calls.append(x.shape[0])
        ctx = cond["context"]
        mask = cond.get("context_mask", torch.ones(ctx.shape[:2], dtype=torch.bool))
        drop = cond.get("drop", torch.zeros(x.shape[0], dtype=torch.bool))
        mean = (ctx * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (B, D)
        mean = torch.where(drop[:, None], self.null_c, mean)
        pooled = torch.where(drop[:, None], self.null_p, cond["pooled"])
        shift = (mean @ self.wc + pooled @ self.wp)[:, :, None, None]  # (B, C, 1, 1)
        s = sigma.view(-1, 1, 1, 1)
        return torch.tanh(x / torch.sqrt(1 + s**2)) * (1 + 0.3 * shift) + 0.5 * shift


def make_cond(batch, tokens=T, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[0, -2:] = False  # some padding already present
    return {"context": torch.randn(batch, tokens, D, generator=g), "context_mask": mask,
            "pooled": torch.randn(batch, P, generator=g)}


def setup(batch=3, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(batch, C, H, W) * 2
    sigma = torch.rand(batch) * 3 + 0.1
    return ToyDenoiser(seed), x, sigma, make_cond(batch, seed=seed + 1), make_cond(batch, tokens=3, seed=seed + 2)


def flat_std(t):
    return t.flatten(1).std(1)


# ------------------------------------------------------------------------------------------------ CFG

def test_cfg_scale_zero_and_one_are_the_two_models():
    den, x, sigma, cond, uncond = setup()
    d_c, d_u = den(x, sigma, cond), den(x, sigma, uncond)
    torch.testing.assert_close(cfg(den, cond, uncond, 0.0)(x, sigma), d_u, atol=1e-6, rtol=0)
    torch.testing.assert_close(cfg(den, cond, uncond, 1.0)(x, sigma), d_c, atol=1e-6, rtol=0)
    assert (d_c - d_u).abs().max() > 0.1  # the test would notice a swap


def test_cfg_is_one_batched_call_and_the_formula():
    den, x, sigma, cond, uncond = setup(batch=4)
    w = 3.5
    d_c, d_u = den(x, sigma, cond), den(x, sigma, uncond)
    den.calls.clear()
    out = cfg(den, cond, uncond, w)(x, sigma)
    assert den.calls == [8]  # cat[x, x] in a single call
    torch.testing.assert_close(out, d_u + w * (d_c - d_u), atol=1e-5, rtol=1e-5)


def test_cfg_per_example_scale_and_null_condition():
    den, x, sigma, cond, _ = setup(batch=3)
    uncond = unconditional(cond)
    assert uncond["drop"].all() and "drop" not in cond
    w = torch.tensor([0.0, 1.0, 4.0])
    d_c, d_u = den(x, sigma, cond), den(x, sigma, uncond)
    den.calls.clear()
    out = cfg(den, cond, uncond, w)(x, sigma)
    assert den.calls == [3 + 2]  # the w = 1 row skips its unconditional branch
    torch.testing.assert_close(out, d_u + w.view(-1, 1, 1, 1) * (d_c - d_u), atol=1e-5, rtol=1e-5)


def test_cat_cond_pads_shorter_context_with_masked_zeros():
    a, b = make_cond(2, tokens=5), unconditional(make_cond(1, tokens=2))
    b.pop("context_mask")
    out = cat_cond(a, b)
    assert out["context"].shape == (3, 5, D) and out["context_mask"].shape == (3, 5)
    assert out["context"][2, 2:].abs().sum() == 0 and not out["context_mask"][2, 2:].any()
    assert out["context_mask"][2, :2].all()
    assert out["drop"].tolist() == [False, False, True]
    with pytest.raises(ValueError, match="keys"):
        cat_cond(a, {"pooled": a["pooled"]})


class ToyEncoder:
    """Prompt -> cond dict with one token per word (so lengths differ)."""

    def encode(self, prompts):
        longest = max(len(p.split()) for p in prompts) or 1
        ctx, mask = torch.zeros(len(prompts), longest, D), torch.zeros(len(prompts), longest, dtype=torch.bool)
        for i, p in enumerate(prompts):
            for j, word in enumerate(p.split()):
                ctx[i, j] = torch.randn(D, generator=torch.Generator().manual_seed(sum(map(ord, word))))
                mask[i, j] = True
        pooled = ctx.sum(1)[:, :P]
        return {"context": ctx, "context_mask": mask, "pooled": pooled}


def test_negative_prompt_replaces_unconditional_prediction():
    den, x, sigma, _, _ = setup(batch=3)
    prompts = ["a red small square at left", "a shoe", "blue circle"]
    cond, uncond = encode_with_negative(ToyEncoder(), prompts, "blurry dark")
    assert uncond["context"].shape[0] == 1  # one negative prompt shared by all prompts
    neg = ToyEncoder().encode(["blurry dark"] * 3)
    d_c, d_neg = den(x, sigma, cond), den(x, sigma, neg)
    torch.testing.assert_close(cfg(den, cond, uncond, 0.0)(x, sigma), d_neg, atol=1e-6, rtol=0)
    torch.testing.assert_close(cfg(den, cond, uncond, 2.0)(x, sigma), d_neg + 2 * (d_c - d_neg), atol=1e-5, rtol=0)
    _, null = encode_with_negative(ToyEncoder(), prompts, None)
    assert null["drop"].all()


# ------------------------------------------------------------------------------------------------ rescale

def test_rescale_phi_zero_is_cfg_and_phi_one_matches_conditional_std():
    den, x, sigma, cond, uncond = setup(batch=4)
    plain = cfg(den, cond, uncond, 5.0)(x, sigma)
    d_c = den(x, sigma, cond)
    torch.testing.assert_close(guided_denoiser(den, cond, uncond, 5.0, rescale=0.0)(x, sigma), plain)
    out_x0 = guided_denoiser(den, cond, uncond, 5.0, rescale=1.0, rescale_space="x0")(x, sigma)
    torch.testing.assert_close(flat_std(out_x0), flat_std(d_c), atol=1e-5, rtol=1e-5)
    out_eps = guided_denoiser(den, cond, uncond, 5.0, rescale=1.0, rescale_space="eps")(x, sigma)
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(flat_std((x - out_eps) / s), flat_std((x - d_c) / s), atol=1e-5, rtol=1e-5)
    assert (flat_std(plain) - flat_std(d_c)).abs().min() > 1e-2  # rescaling really changed something
    assert (out_x0 - out_eps).abs().max() > 1e-3  # and the two spaces are genuinely different


def test_rescale_in_eps_space_matches_diffusers():
    rescale_noise_cfg = require("diffusers.guiders.guider_utils").rescale_noise_cfg
    den, x, sigma, cond, uncond = setup(batch=3)
    w, phi = 6.0, 0.7
    s = sigma.view(-1, 1, 1, 1)
    eps_c, eps_u = (x - den(x, sigma, cond)) / s, (x - den(x, sigma, uncond)) / s
    ref_eps = rescale_noise_cfg(eps_u + w * (eps_c - eps_u), eps_c, guidance_rescale=phi)
    out = guided_denoiser(den, cond, uncond, w, rescale=phi, rescale_space="eps")(x, sigma)
    torch.testing.assert_close(out, x - s * ref_eps, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("space,make_pred", [
    ("v", lambda x, d, s: (x - (1 + s**2) * d) / (s * torch.sqrt(1 + s**2))),  # VP v-prediction
    ("flow", lambda x, d, s: (x - (1 + s) * d) / s),  # rectified-flow velocity eps - x0
])
def test_rescale_spaces_equal_rescaling_that_prediction(space, make_pred):
    den, x, sigma, cond, uncond = setup(batch=3)
    w, phi = 4.0, 0.5
    s = sigma.view(-1, 1, 1, 1)
    p_c, p_u = make_pred(x, den(x, sigma, cond), s), make_pred(x, den(x, sigma, uncond), s)
    p_g = p_u + w * (p_c - p_u)
    ref = p_g * (phi * flat_std(p_c) / flat_std(p_g) + 1 - phi).view(-1, 1, 1, 1)
    out = guided_denoiser(den, cond, uncond, w, rescale=phi, rescale_space=space)(x, sigma)
    torch.testing.assert_close(make_pred(x, out, s), ref, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ interval

def test_interval_covering_no_step_is_the_conditional_model_without_uncond_calls():
    den, x, sigma, cond, uncond = setup(batch=3)
    g = guided_denoiser(den, cond, uncond, 7.0, interval=(10.0, 20.0), rescale=0.5, mode="apg",
                        apg=APGConfig(eta=0.0, momentum=-0.5, norm_threshold=1.0))
    den.calls.clear()
    outs = [g(x, sigma * f) for f in (1.0, 0.5, 0.1)]
    assert den.calls == [3, 3, 3]  # the unconditional branch is never evaluated
    for f, out in zip((1.0, 0.5, 0.1), outs):
        torch.testing.assert_close(out, den(x, sigma * f, cond), atol=0, rtol=0)


def test_interval_is_half_open_and_per_example():
    den, x, _, cond, uncond = setup(batch=4)
    sigma = torch.tensor([0.5, 1.0, 2.0, 3.0])  # interval (1, 2]: only row 2 (sigma = 1 is excluded)
    out = guided_denoiser(den, cond, uncond, 3.0, interval=(1.0, 2.0))(x, sigma)
    full, d_c = cfg(den, cond, uncond, 3.0)(x, sigma), den(x, sigma, cond)
    inside = torch.tensor([False, False, True, False])
    torch.testing.assert_close(out[inside], full[inside])
    torch.testing.assert_close(out[~inside], d_c[~inside])
    with pytest.raises(ValueError, match="interval"):
        guided_denoiser(den, cond, uncond, 3.0, interval=(2.0, 1.0))


# ------------------------------------------------------------------------------------------------ APG

def test_apg_with_eta_one_and_nothing_else_is_cfg():
    den, x, sigma, cond, uncond = setup(batch=3)
    apg = guided_denoiser(den, cond, uncond, 4.0, mode="apg", apg=APGConfig(eta=1.0, momentum=0.0))
    torch.testing.assert_close(apg(x, sigma), cfg(den, cond, uncond, 4.0)(x, sigma), atol=1e-5, rtol=1e-5)


def test_apg_eta_zero_removes_the_parallel_component():
    den, x, sigma, cond, uncond = setup(batch=3)
    w = 4.0
    d_c, d_u = den(x, sigma, cond), den(x, sigma, uncond)
    out = guided_denoiser(den, cond, uncond, w, mode="apg", apg=APGConfig(eta=0.0))(x, sigma)
    update = (out - d_c).flatten(1).double()
    cos = (update * d_c.flatten(1)).sum(1) / (update.norm(dim=1) * d_c.flatten(1).norm(dim=1))
    assert cos.abs().max() < 1e-6  # orthogonal to D_c
    diff = (d_c - d_u).flatten(1).double()
    u = F.normalize(d_c.flatten(1).double(), dim=1)
    orth = diff - (diff * u).sum(1, keepdim=True) * u
    torch.testing.assert_close(update, (w - 1) * orth, atol=1e-4, rtol=1e-4)


def test_apg_threshold_caps_the_update_norm():
    den, x, sigma, cond, uncond = setup(batch=3)
    w, r = 5.0, 0.5
    d_c, d_u = den(x, sigma, cond), den(x, sigma, uncond)
    assert (d_c - d_u).flatten(1).norm(dim=1).min() > r  # the cap is active on every row
    conf = APGConfig(eta=1.0, momentum=0.0, norm_threshold=r)
    out = guided_denoiser(den, cond, uncond, w, mode="apg", apg=conf)(x, sigma)
    norms = (out - d_c).flatten(1).norm(dim=1) / (w - 1)
    torch.testing.assert_close(norms, torch.full((3,), r), atol=1e-5, rtol=1e-5)


def test_apg_with_momentum_matches_diffusers_over_steps_and_resets():
    apg_mod = require("diffusers.guiders.adaptive_projected_guidance")
    den, x, sigma, cond, uncond = setup(batch=3)
    w, conf = 6.0, APGConfig(eta=0.0, momentum=-0.5, norm_threshold=2.0)
    ours = guided_denoiser(den, cond, uncond, w, mode="apg", apg=conf)
    buffer = apg_mod.MomentumBuffer(conf.momentum)
    firsts = []
    for step in range(3):
        xs, ss = x * (1 - 0.2 * step), sigma * (1 - 0.3 * step)
        d_c, d_u = den(xs, ss, cond), den(xs, ss, uncond)
        # diffusers' "original formulation" is pred_cond + s * update, i.e. our w - 1
        ref = apg_mod.normalized_guidance(d_c, d_u, w - 1, buffer, conf.eta, conf.norm_threshold,
                                          use_original_formulation=True)
        out = ours(xs, ss)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        firsts.append(out)
    ours.reset()
    torch.testing.assert_close(ours(x, sigma), firsts[0])
    no_memory = guided_denoiser(den, cond, uncond, w, mode="apg", apg=conf)(x * 0.8, sigma * 0.7)
    assert (firsts[1] - no_memory).abs().max() > 1e-4  # the momentum really carried over
    one = make_cond(1)  # a batch-1 cond serves any batch, so only the momentum state can object
    shared = guided_denoiser(den, one, unconditional(one), w, mode="apg", apg=conf)
    shared(x, sigma)
    with pytest.raises(RuntimeError, match="reset"):
        shared(x[:2], sigma[:2])


# ------------------------------------------------------------------------------------------------ classifier guidance

def gaussian_likelihood(m, v):
    """log p(y | x) = -|x - m|^2 / (2 v): closed-form gradient and an autograd version (needs grad mode)."""
    closed = lambda x, sigma: -(x - m) / v  # noqa: E731

    def autograd(x, sigma):
        x = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad((-((x - m) ** 2).sum() / (2 * v)), x)
        return g

    return closed, autograd


def test_classifier_guidance_shifts_x0_by_sigma_squared_scale_grad_under_no_grad():
    den, x, sigma, cond, _ = setup(batch=3)
    base = lambda x, s: den(x, s, cond)  # noqa: E731
    m, v, s = torch.randn(1, C, H, W), 0.7, 2.5
    closed, autograd = gaussian_likelihood(m, v)
    with torch.no_grad():
        out = classifier_guidance(base, autograd, s)(x, sigma)
    assert not out.requires_grad
    expected = base(x, sigma) + sigma.view(-1, 1, 1, 1) ** 2 * s * (-(x - m) / v)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(classifier_guidance(base, closed, 0.0)(x, sigma), base(x, sigma))


def test_classifier_guidance_skips_rows_at_infinite_sigma():
    """The first step of a flow sampler runs at sigma = inf: that row must stay unguided (and finite), while the
    other rows get the usual shift; grad_log_p only ever sees finite sigmas."""
    den, x, sigma, cond, _ = setup(batch=3)
    base = lambda x, s: torch.nan_to_num(den(x, s.clamp_max(1e4), cond))  # noqa: E731
    m, v, s = torch.randn(1, C, H, W), 0.7, 2.5
    closed, _ = gaussian_likelihood(m, v)
    seen = []

    def grad(x, sig):
        seen.append(sig.clone())
        return closed(x, sig)
    sig = torch.tensor([math.inf, 0.5, 3.0])
    with torch.no_grad():
        out = classifier_guidance(base, grad, s)(x, sig)
        only_inf = classifier_guidance(base, grad, s)(x[:1], sig[:1])
    assert torch.isfinite(out).all() and all(torch.isfinite(t).all() for t in seen)
    torch.testing.assert_close(out[0], base(x, sig)[0])
    torch.testing.assert_close(only_inf, base(x[:1], sig[:1]))
    expected = base(x, sig)[1:] + sig[1:].view(-1, 1, 1, 1) ** 2 * s * (-(x[1:] - m) / v)
    torch.testing.assert_close(out[1:], expected, atol=1e-5, rtol=1e-5)


def test_classifier_guidance_composes_with_cfg():
    den, x, sigma, cond, uncond = setup(batch=3)
    m, v, s = torch.zeros(1, C, H, W), 1.3, 0.8
    _, autograd = gaussian_likelihood(m, v)
    with torch.no_grad():
        both = classifier_guidance(cfg(den, cond, uncond, 3.0), autograd, s)(x, sigma)
        plain = cfg(den, cond, uncond, 3.0)(x, sigma)
    torch.testing.assert_close(both - plain, sigma.view(-1, 1, 1, 1) ** 2 * s * (-x / v), atol=1e-5, rtol=1e-5)


def test_tweedie_shift_is_exact_for_gaussian_data():
    """x0 ~ N(0, I), y = x0 + tau n: guiding the exact unconditional denoiser with the exact grad log p(y | x) at
    scale 1 must give the exact posterior mean E[x0 | x, y] of the joint Gaussian."""
    torch.manual_seed(0)
    x, y, sigma, tau2 = torch.randn(2, C, H, W) * 2, torch.randn(2, C, H, W), torch.tensor([0.5, 2.0]), 0.3
    s2 = sigma.view(-1, 1, 1, 1) ** 2
    denoise = lambda x, s: x / (1 + s.view(-1, 1, 1, 1) ** 2)  # noqa: E731  E[x0 | x]

    def grad_log_p(x, s):  # y | x ~ N(x / (1 + s^2), (tau^2 + s^2 / (1 + s^2)) I)
        s2 = s.view(-1, 1, 1, 1) ** 2
        return (y - x / (1 + s2)) / (tau2 + s2 / (1 + s2)) / (1 + s2)

    out = classifier_guidance(denoise, grad_log_p, 1.0)(x, sigma)
    precision = 1 + 1 / s2 + 1 / tau2  # x0 | x, y: prior N(0, 1), x = x0 + sigma eps, y = x0 + tau n
    torch.testing.assert_close(out, (x / s2 + y / tau2) / precision, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ noisy classifier

def test_classifier_shapes_init_loss_and_gradient(one_thread):
    torch.manual_seed(0)
    model = NoisyLatentClassifier(PRESETS["tiny"]).eval()
    x, sigma, labels = torch.randn(5, C, H, W), torch.rand(5) + 0.1, torch.tensor([0, 3, 9, 1, 2])
    assert model(*log_sigma_input(x, sigma)).shape == (5, 10)
    loss = classifier_loss(model, x, labels, torch.randn_like(x), sigma)
    torch.testing.assert_close(loss, torch.full((5,), math.log(10)))  # zero-init head: uniform logits
    with torch.no_grad():  # heads are zero at init, so perturb to get a non-trivial gradient
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    with torch.no_grad():
        grad = classifier_grad_fn(model, labels)(x, sigma)
    assert grad.shape == x.shape and grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    # directional derivative against a central finite difference in float64
    model.double()
    xd, sd, dirn = x.double(), sigma.double(), torch.randn_like(x).double()
    grad = classifier_grad_fn(model, labels)(xd, sd)
    logp = lambda z: F.log_softmax(model(*log_sigma_input(z, sd)), -1).gather(1, labels[:, None]).sum()  # noqa: E731
    fd = (logp(xd + 1e-6 * dirn) - logp(xd - 1e-6 * dirn)) / 2e-6
    torch.testing.assert_close((grad * dirn).sum(), fd, atol=1e-6, rtol=1e-5)


def test_classifier_learns_sign_of_mean_on_noised_inputs(one_thread):
    torch.manual_seed(0)
    model = NoisyLatentClassifier(ClassifierConfig(num_classes=2, channels=(16, 32), freq_dim=32, emb_dim=32))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def batch(n):
        labels = torch.randint(0, 2, (n,))
        x0 = torch.randn(n, C, H, W) + (2 * labels - 1).view(-1, 1, 1, 1) * 0.5  # class = sign of the mean
        sigma = torch.exp(torch.empty(n).uniform_(math.log(0.05), math.log(1.0)))
        return x0, labels, torch.randn_like(x0), sigma

    for _ in range(25):
        loss = classifier_loss(model, *batch(32)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x0, labels, noise, sigma = batch(256)
    with torch.no_grad():
        logits = model(*log_sigma_input(x0 + sigma.view(-1, 1, 1, 1) * noise, sigma))
    assert (logits.argmax(1) == labels).float().mean() > 0.9
    # and guidance toward class 1 raises the mean of x0_hat for every example
    with torch.no_grad():
        guided = classifier_guidance(lambda x, s: x, classifier_grad_fn(model, torch.ones(8, dtype=torch.long)), 1.0)
        xs, ss = torch.randn(8, C, H, W), torch.full((8,), 0.8)
        assert ((guided(xs, ss) - xs).flatten(1).mean(1) > 0).all()
