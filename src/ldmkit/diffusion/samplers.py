"""Samplers: pure functions over a denoiser in sigma space.

Every sampler has the signature `sampler(denoise, x, sigmas, *, generator=None, progress=False, ...) -> x0` where
  - `denoise(x, sigma) -> x0_hat` with x (B, ...) in sigma space (x = x0 + sigma * eps) and sigma a (B,) tensor;
  - `x` is the start sample at sigmas[0] (see `prior_noise`), `sigmas` a decreasing 1-D tensor, usually ending in 0.

Randomness. `generator` is None (global RNG), one torch.Generator, or a list of B generators, one per example:
with a list, example i draws all its noise (prior and per-step) from generator i only, so an image does not depend
on what else is in the batch. `example_generators(seed, indices)` builds such a list from a seed and global indices.
Noise is drawn on the CPU and moved to x's device, so results do not depend on the device's RNG.

Pure noise. sigmas[0] may be inf (zero terminal SNR, rectified flow at t = 1). Then x holds the unit-variance noise
itself (see schedules.py), the noise estimate at that step is eps_hat = x, and the step is the first-order
DDIM/Euler step x_next = x0_hat + sigma_next * eps_hat (second-order corrections start from the next step).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ldmkit.nn import per_example
from ldmkit.seeding import Generators, randn

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def prior_noise(sigmas: torch.Tensor, shape: Sequence[int], *, generator: Generators = None, device=None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The start sample x_T in sigma space: sigmas[0] * N(0, I), or plain N(0, I) when sigmas[0] = inf.

    For a VP model this is the usual x_T ~ N(0, I) in VP space scaled up by sqrt(1 + sigma_max^2) ~ sigma_max
    (the VP prior has variance 1 + sigma_max^2 in sigma space; the difference is at most 1/(2 sigma_max^2) relative).
    """
    s0 = float(sigmas[0])
    z = randn(shape, generator, device, dtype)
    return z if math.isinf(s0) else z * s0


# ---------------------------------------------------------------------------------------------- helpers


def _check(x: torch.Tensor, sigmas: torch.Tensor) -> list[float]:
    """Validate the sigma grid and return it as Python floats (exact float64 coefficient arithmetic)."""
    if sigmas.dim() != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D tensor with at least 2 entries, got shape {tuple(sigmas.shape)}")
    s = [float(v) for v in sigmas]
    if any(math.isinf(v) for v in s[1:]):
        raise ValueError(f"only sigmas[0] may be inf (pure noise), got {s}")
    if any(math.isnan(v) or v < 0 for v in s) or any(b >= a for a, b in zip(s, s[1:])):
        raise ValueError(f"sigmas must be non-negative and strictly decreasing, got {s}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains inf/nan; at sigma = inf pass the unit noise itself (see prior_noise)")
    return s


def _denoise(denoise: Denoiser, x: torch.Tensor, sigma: float) -> torch.Tensor:
    return denoise(x, torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device))


def _eps(x: torch.Tensor, x0: torch.Tensor, sigma: float) -> torch.Tensor:
    """Noise estimate eps_hat = (x - x0_hat) / sigma; at sigma = inf x holds the noise, so eps_hat = x."""
    return x if math.isinf(sigma) else (x - x0) / sigma


def _ancestral(s: float, s_next: float, eta: float) -> tuple[float, float]:
    """Split a step s -> s_next into a deterministic part to sigma_down and fresh noise sigma_up (DDIM eq. 16).

    sigma_up = eta * s_next * sqrt(1 - s_next^2 / s^2) (capped at s_next), sigma_down^2 = s_next^2 - sigma_up^2.
    """
    r = 0.0 if math.isinf(s) else (s_next / s) ** 2
    up = min(s_next, eta * s_next * math.sqrt(max(1 - r, 0.0)))
    return math.sqrt(max(s_next**2 - up**2, 0.0)), up


def _steps(n: int, progress: bool, name: str):
    return tqdm(range(n), desc=name, disable=not progress, leave=False)


# --------------------------------------------------------------------------------------------- samplers


@torch.no_grad()
def ddpm(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators = None,
         progress: bool = False) -> torch.Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020, eq. 6-7; posterior variance beta_tilde) in sigma space.

    With r = sigma_next^2 / sigma^2 the posterior q(x_next | x, x0) is N(r x + (1 - r) x0, sigma_next^2 (1 - r)):
    the VP posterior over strided steps (beta = 1 - abar_t / abar_s) divided by sqrt(abar_s). Equals DDIM eta=1.
    """
    s = _check(x, sigmas)
    for i in _steps(len(s) - 1, progress, "ddpm"):
        x0 = _denoise(denoise, x, s[i])
        r = 0.0 if math.isinf(s[i]) else (s[i + 1] / s[i]) ** 2
        mean = x0 if r == 0 else r * x + (1 - r) * x0  # posterior mean (eq. 7, sigma space)
        std = s[i + 1] * math.sqrt(1 - r)  # sqrt(beta_tilde) / sqrt(abar_next)
        x = mean + std * randn(x.shape, generator, x.device, x.dtype) if std > 0 else mean
    return x


@torch.no_grad()
def ddim(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, eta: float = 0.0,
         generator: Generators = None, progress: bool = False) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) in sigma space: x_next = x0_hat + sigma_down eps_hat + sigma_up z.

    eta = 0 is deterministic (the same update as Euler in sigma space); eta = 1 is DDPM. eq. 16 gives sigma_up.
    """
    if eta < 0:
        raise ValueError(f"ddim eta must be >= 0, got {eta}")
    s = _check(x, sigmas)
    for i in _steps(len(s) - 1, progress, "ddim"):
        x0 = _denoise(denoise, x, s[i])
        eps = _eps(x, x0, s[i])  # eq. 12 "predicted noise"
        down, up = _ancestral(s[i], s[i + 1], eta)
        x = x0 + down * eps  # "direction pointing to x_t"
        if up > 0:
            x = x + up * randn(x.shape, generator, x.device, x.dtype)  # random noise term
    return x


@torch.no_grad()
def euler(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators = None,
          progress: bool = False) -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, eq. 3)."""
    s = _check(x, sigmas)
    for i in _steps(len(s) - 1, progress, "euler"):
        x0 = _denoise(denoise, x, s[i])
        if math.isinf(s[i]):
            x = x0 + s[i + 1] * x  # pure-noise start: eps_hat = x
        else:
            d = (x - x0) / s[i]  # dx/dsigma
            x = x + (s[i + 1] - s[i]) * d
    return x


@torch.no_grad()
def heun(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators = None,
         progress: bool = False) -> torch.Tensor:
    """Heun's second-order method, EDM Algorithm 1 (Karras et al. 2022) without churn.

    Each step takes an Euler step, then averages the slopes at both ends; the correction is skipped on a step to
    sigma = 0 (the slope there is undefined) and on a step from sigma = inf (first-order pure-noise step).
    """
    s = _check(x, sigmas)
    for i in _steps(len(s) - 1, progress, "heun"):
        x0 = _denoise(denoise, x, s[i])
        d = _eps(x, x0, s[i])  # Alg. 1 line 7: d_i = (x - D(x; sigma)) / sigma
        if math.isinf(s[i]):
            x = x0 + s[i + 1] * d
            continue
        x_next = x + (s[i + 1] - s[i]) * d  # line 8: Euler step
        if s[i + 1] > 0:
            d_next = (x_next - _denoise(denoise, x_next, s[i + 1])) / s[i + 1]  # line 10
            x_next = x + (s[i + 1] - s[i]) * (d + d_next) / 2  # line 11: trapezoidal rule
        x = x_next
    return x


@torch.no_grad()
def dpmpp_2m(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators = None,
             progress: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M), the multistep second-order data-prediction solver (Lu et al. 2022, Algorithm 2).

    With lambda = -log sigma and h = lambda_next - lambda: x_next = (sigma_next / sigma) x - expm1(-h) D, where
    D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_prev and r = h_prev / h; the first step (no history), a step after a
    pure-noise step (h_prev = inf, so 1/(2r) = 0) and the final step to sigma = 0 (gives x0_hat) are first order.
    """
    s = _check(x, sigmas)
    x0_prev, h_prev = None, None
    for i in _steps(len(s) - 1, progress, "dpmpp-2m"):
        x0 = _denoise(denoise, x, s[i])
        if math.isinf(s[i]) or s[i + 1] == 0:
            x = x0 + s[i + 1] * _eps(x, x0, s[i])  # first order; equals x0_hat when sigma_next = 0
            h = math.inf
        else:
            h = math.log(s[i]) - math.log(s[i + 1])  # lambda_next - lambda
            d = x0
            if x0_prev is not None:
                c = h / (2 * h_prev)  # 1 / (2 r), r = h_prev / h
                d = (1 + c) * x0 - c * x0_prev  # Alg. 2 second-order data estimate
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


@torch.no_grad()
def euler_ancestral(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, eta: float = 1.0,
                    s_noise: float = 1.0, generator: Generators = None, progress: bool = False) -> torch.Tensor:
    """Euler ancestral (k-diffusion's sample_euler_ancestral; Karras et al. 2022 / Song et al. 2021 SDE view).

    Euler step down to sigma_down, then add fresh noise of std sigma_up (see `_ancestral`); with eta = 1 this is
    the same Markov chain as DDPM / DDIM(eta=1). `s_noise` scales the added noise.
    """
    s = _check(x, sigmas)
    for i in _steps(len(s) - 1, progress, "euler-ancestral"):
        x0 = _denoise(denoise, x, s[i])
        d = _eps(x, x0, s[i])  # dx/dsigma
        down, up = _ancestral(s[i], s[i + 1], eta)
        x = x0 + down * d if math.isinf(s[i]) else x + (down - s[i]) * d  # Euler step to sigma_down
        if up > 0:
            x = x + s_noise * up * randn(x.shape, generator, x.device, x.dtype)
    return x


# ------------------------------------------------------------------------------- score-SDE (Song et al. 2021)
# The denoiser gives the score: grad_x log p_sigma(x) = (x0_hat - x) / sigma^2 in sigma space (Tweedie).


def _score(denoise: Denoiser, x: torch.Tensor, sigma: float) -> torch.Tensor:
    return (_denoise(denoise, x, sigma) - x) / sigma**2


@torch.no_grad()
def sde_ve(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators = None,
           progress: bool = False) -> torch.Tensor:
    """Euler-Maruyama on the reverse-time VE SDE dx = -d[sigma^2] score + sqrt(d[sigma^2]) dw (Song et al. 2021,
    eq. 6 with f = 0, g^2 = d[sigma^2]/dt; their "reverse diffusion" predictor): x_next = x + (s^2 - s_next^2)
    score + sqrt(s^2 - s_next^2) z. The last step (to sigma = 0) returns the denoiser's mean x0_hat, as is usual."""
    s = _check(x, sigmas)
    for i in _steps(len(s) - 1, progress, "sde"):
        if math.isinf(s[i]) or s[i + 1] == 0:  # pure-noise start or the final step: the first-order mean
            x0 = _denoise(denoise, x, s[i])
            x = x0 + s[i + 1] * _eps(x, x0, s[i])
            continue
        g2 = s[i] ** 2 - s[i + 1] ** 2  # g^2 dt over the step
        x = x + g2 * _score(denoise, x, s[i]) + math.sqrt(g2) * randn(x.shape, generator, x.device, x.dtype)
    return x


@torch.no_grad()
def sde_vp(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators = None,
           progress: bool = False) -> torch.Tensor:
    """The reverse-time VP SDE dy = [-beta/2 y - beta score_y] dt + sqrt(beta) dw on y = x / sqrt(1 + sigma^2),
    discretised as Song et al. 2021's reverse-diffusion predictor (their eq. 45 form): with a = 1 / (1 + sigma^2)
    and beta = 1 - a / a_next over the step, y_next = (2 - sqrt(1 - beta)) y + beta score_y + sqrt(beta) z, where
    score_y = (sqrt(a) x0_hat - y) / (1 - a). The same marginals as `sde_ve` in sigma space, another path."""
    s = _check(x, sigmas)
    for i in _steps(len(s) - 1, progress, "sde-vp"):
        if math.isinf(s[i]) or s[i + 1] == 0:
            x0 = _denoise(denoise, x, s[i])
            x = x0 + s[i + 1] * _eps(x, x0, s[i])
            continue
        a, a_next = 1 / (1 + s[i] ** 2), 1 / (1 + s[i + 1] ** 2)
        beta = 1 - a / a_next
        y = x * math.sqrt(a)
        score_y = (math.sqrt(a) * _denoise(denoise, x, s[i]) - y) / (1 - a)
        y = (2 - math.sqrt(1 - beta)) * y + beta * score_y + math.sqrt(beta) * randn(x.shape, generator, x.device,
                                                                                      x.dtype)
        x = y / math.sqrt(a_next)
    return x


@torch.no_grad()
def pc(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, snr: float = 0.16, corrector_steps: int = 1,
       generator: Generators = None, progress: bool = False) -> torch.Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Algorithms 2 and 4): at each noise level `corrector_steps`
    Langevin steps x <- x + e score + sqrt(2 e) z with e = 2 (snr |z| / |score|)^2, then the `sde_ve` predictor
    to the next level. Norms are per example (the paper takes the batch mean), so a sample never depends on the
    rest of its batch; with one example both agree."""
    if snr <= 0 or corrector_steps < 0:
        raise ValueError(f"pc needs snr > 0 and corrector_steps >= 0, got {snr}, {corrector_steps}")
    s = _check(x, sigmas)
    for i in _steps(len(s) - 1, progress, "pc"):
        for _ in range(corrector_steps if math.isfinite(s[i]) and s[i] > 0 else 0):
            g = _score(denoise, x, s[i])
            z = randn(x.shape, generator, x.device, x.dtype)
            ratio = z.flatten(1).norm(dim=1) / g.flatten(1).norm(dim=1).clamp_min(1e-12)
            e = per_example(2 * (snr * ratio) ** 2, x)  # step size per example
            x = x + e * g + (2 * e).sqrt() * z
        x = sde_ve(denoise, x, sigmas[i:i + 2], generator=generator)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "euler": euler,
    "heun": heun,
    "dpmpp-2m": dpmpp_2m,
    "euler-ancestral": euler_ancestral,
    "sde": sde_ve,
    "sde-vp": sde_vp,
    "pc": pc,
}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """Sampler function by id; unknown ids fail with the list of valid ones."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]
