"""Noise schedules in sigma space: variance-preserving (DDPM/LDM) tables, rectified flow, and sampling grids.

Every sampler in this package works in the "EDM / variance-exploding" view: x = x0 + sigma * eps.
A VP schedule with cumulative product a = alphas_cumprod[t] is the same process rescaled:
x_vp = sqrt(a) x0 + sqrt(1 - a) eps = x / sqrt(1 + sigma^2) with sigma = sqrt((1 - a) / a).
Rectified flow x_t = (1 - t) x0 + t eps is the same process rescaled by 1 / (1 + sigma) with sigma = t / (1 - t).

Pure noise (zero terminal SNR, or flow at t = 1) has sigma = inf. Convention used by every module here:
**at sigma = inf, x holds the unit-variance noise itself** (the limit of x / sqrt(1 + sigma^2)), so
`prior_noise` returns plain N(0, I) there, denoiser wrappers feed it to the model unscaled, and samplers take the
noise prediction at that step to be x itself (see samplers.py).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

NUM_TRAIN_STEPS = 1000  # T: discrete training steps of every VP schedule (and the flow time scale t * 1000)
VP_SCHEDULES = ("scaled-linear", "linear", "cosine")
SPACINGS = ("trailing", "leading", "linspace", "karras")


# --------------------------------------------------------------------------------------------- beta tables


def betas_scaled_linear(num_steps: int = NUM_TRAIN_STEPS, start: float = 0.00085, end: float = 0.012) -> torch.Tensor:
    """LDM / Stable Diffusion "scaled linear": linear in sqrt(beta). (T,) float64."""
    return torch.linspace(start**0.5, end**0.5, num_steps, dtype=torch.float64) ** 2


def betas_linear(num_steps: int = NUM_TRAIN_STEPS, start: float = 1e-4, end: float = 0.02) -> torch.Tensor:
    """DDPM linear schedule (Ho et al. 2020, sec. 4). (T,) float64."""
    return torch.linspace(start, end, num_steps, dtype=torch.float64)


def betas_cosine(num_steps: int = NUM_TRAIN_STEPS, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17): abar(t) = cos^2((t/T + s) / (1 + s) * pi/2), beta <= 0.999."""
    t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    abar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2  # (T+1,)
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)  # beta_t = 1 - abar(t+1)/abar(t)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 ("Common diffusion noise schedules and sample steps are flawed"), Algorithm 1.

    Shifts and rescales sqrt(alphas_cumprod) so the last step is exactly pure noise (alphas_cumprod[-1] = 0,
    sigma_max = inf) while the first step keeps its value.
    """
    abar_sqrt = torch.cumprod(1 - betas.double(), 0).sqrt()  # (T,)
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))  # last -> 0, first unchanged
    abar = abar_sqrt**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])  # undo the cumulative product
    return 1 - alphas


# --------------------------------------------------------------------------------------- conversions


def sigma_from_alphas_cumprod(a: torch.Tensor) -> torch.Tensor:
    """sigma = sqrt((1 - a) / a); a = 0 gives inf."""
    return ((1 - a) / a).sqrt()


def vp_coefficients(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma_vp) with x_vp = alpha x0 + sigma_vp eps = alpha * x; exact at sigma = 0 and sigma = inf."""
    alpha = torch.rsqrt(1 + sigma**2)
    sigma_vp = torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma * alpha)
    return alpha, sigma_vp


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Karras et al. 2022 (EDM) eq. 5: n sigmas evenly spaced in sigma^(1/rho), then a final 0. (n + 1,)."""
    _check_steps(n)
    if not (0 < sigma_min < sigma_max < math.inf):
        raise ValueError(f"karras sigmas need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, "
                         f"sigma_max={sigma_max}; with zero terminal SNR or flow pass a finite sigma_max=...")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho  # eq. 5
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(dtype)


def spacing_timesteps(spacing: str, n: int, num_steps: int = NUM_TRAIN_STEPS, integer: bool = True) -> torch.Tensor:
    """Decreasing timesteps in [0, T-1] for `n` sampling steps (Lin et al. 2023, Table 2; diffusers' names).

    trailing: T-1, ..., T/n - 1 (starts at the last training step; default). leading: (n-1)*(T//n), ..., 0.
    linspace: linspace(T-1, 0, n) (fractional). `integer` rounds trailing to whole steps, as diffusers does.
    """
    _check_steps(n)
    if spacing == "trailing":
        t = num_steps - torch.arange(n, dtype=torch.float64) * (num_steps / n)  # T, T - T/n, ..., T/n
        t = (t.round() if integer else t) - 1
    elif spacing == "leading":
        if n > num_steps:
            raise ValueError(f"leading spacing needs n <= {num_steps} steps, got n={n}; use trailing or linspace")
        t = (torch.arange(n, dtype=torch.float64) * (num_steps // n)).flip(0)
    elif spacing == "linspace":
        t = torch.linspace(num_steps - 1, 0, n, dtype=torch.float64)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}")
    if integer and len(set(t.tolist())) < n:
        raise ValueError(f"{spacing} spacing with n={n} repeats a training step (T={num_steps}); use fewer steps")
    return t


def _check_steps(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"number of sampling steps must be a positive int, got {n!r}")


# ------------------------------------------------------------------------------------------- schedules


class VPSchedule:
    """A discrete variance-preserving schedule of T steps, with continuous sigma <-> timestep maps.

    Timesteps are continuous in [0, T-1]; between table entries log(sigma) is interpolated linearly
    (as k-diffusion does), so samplers may visit any sigma. Outside [sigma_min, sigma_max] the timestep is
    clamped to 0 or T-1. With zero terminal SNR the last entry is inf and every finite sigma above the
    second-to-last entry maps to timestep T-2 (the interval to inf has no finite log-length).
    """

    kind = "vp"

    def __init__(self, betas: torch.Tensor):
        if betas.dim() != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        self.betas = betas.double()  # (T,)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, 0)  # (T,) abar_t
        self.sigmas = sigma_from_alphas_cumprod(self.alphas_cumprod)  # (T,) increasing; last may be inf
        if not bool((self.sigmas[1:] > self.sigmas[:-1]).all()):
            raise ValueError("schedule sigmas must increase strictly with the timestep")
        self.log_sigmas = self.sigmas.log()  # (T,)
        self.num_steps = len(betas)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_at(self, timestep: torch.Tensor) -> torch.Tensor:
        """Continuous timestep in [0, T-1] -> sigma (log-linear interpolation of the table). float64."""
        t = torch.as_tensor(timestep, dtype=torch.float64)
        if bool((t < 0).any() or (t > self.num_steps - 1).any()):
            raise ValueError(f"timesteps must lie in [0, {self.num_steps - 1}], got min {float(t.min())}, "
                             f"max {float(t.max())}")
        lo = t.floor().long().clamp(max=self.num_steps - 2)
        w = t - lo  # (...) in [0, 1]
        a, b = self.log_sigmas[lo], self.log_sigmas[lo + 1]
        return torch.where(w == 0, a, a + w * (b - a)).exp()  # w == 0 keeps a finite end point exact

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """sigma -> continuous timestep in [0, T-1] (inverse of `sigma_at`, clamped; inf -> T-1). Same dtype."""
        s = torch.as_tensor(sigma)
        log_s = s.detach().cpu().double().clamp_min(1e-30).log()  # tiny (B,): float64 on the CPU
        table = self.log_sigmas
        lo = (torch.searchsorted(table, log_s, right=True) - 1).clamp(0, self.num_steps - 2)
        a, b = table[lo], table[lo + 1]
        w = ((log_s - a) / (b - a)).nan_to_num(0.0).clamp(0, 1)  # b = inf gives 0 (or nan for s = inf)
        t = torch.where(torch.isinf(log_s), torch.full_like(log_s, self.num_steps - 1), lo + w)
        return t.to(s.device, s.dtype if s.is_floating_point() else torch.float32)

    def model_time(self, sigma: torch.Tensor) -> torch.Tensor:
        """Backbone time input for VP models: the continuous timestep in [0, T-1]."""
        return self.timestep(sigma)

    def input_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """x_vp = input_scale * x = x / sqrt(1 + sigma^2); 1 at sigma = inf (x already holds the noise)."""
        return torch.where(torch.isinf(sigma), torch.ones_like(sigma), torch.rsqrt(1 + sigma**2))

    def sample_sigmas(self, n: int, spacing: str = "trailing", *, rho: float = 7.0, sigma_min: float | None = None,
                      sigma_max: float | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Decreasing sigmas for n sampling steps, ending with a final 0. (n + 1,).

        trailing/leading/linspace pick timesteps (see `spacing_timesteps`) and map them through the table;
        karras spaces sigma^(1/rho) between sigma_min and sigma_max (default: the schedule's range; needs a
        finite sigma_max, so pass one with zero terminal SNR).
        """
        if spacing == "karras":
            return karras_sigmas(n, sigma_min or self.sigma_min, sigma_max or self.sigma_max, rho, dtype)
        if sigma_min is not None or sigma_max is not None:
            raise ValueError(f"sigma_min / sigma_max apply to karras spacing only, not {spacing!r}")
        sigmas = self.sigma_at(spacing_timesteps(spacing, n, self.num_steps, integer=True))
        return torch.cat([sigmas, sigmas.new_zeros(1)]).to(dtype)


class FlowSchedule:
    """Rectified flow (Liu et al. 2022; Esser et al. 2024): x_t = (1 - t) x0 + t eps, t in [0, 1].

    In sigma space sigma = t / (1 - t) and x = x_t / (1 - t); t = 1 is pure noise (sigma = inf).
    Model time is t * T. For spacings, step k of T corresponds to t = (k + 1) / T, so trailing spacing is
    t = 1, 1 - 1/n, ..., 1/n (exactly uniform, no rounding) and every grid starts from pure noise.
    """

    kind = "flow"

    def __init__(self, num_steps: int = NUM_TRAIN_STEPS):
        self.num_steps = num_steps

    @property
    def sigma_min(self) -> float:
        t = 1 / self.num_steps
        return t / (1 - t)

    @property
    def sigma_max(self) -> float:
        return math.inf

    @staticmethod
    def sigma_from_t(t: torch.Tensor) -> torch.Tensor:
        """t in [0, 1] -> sigma = t / (1 - t) (inf at t = 1)."""
        return t / (1 - t)

    @staticmethod
    def t_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
        """sigma -> t = sigma / (1 + sigma) (1 at sigma = inf)."""
        return torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))

    def model_time(self, sigma: torch.Tensor) -> torch.Tensor:
        """Backbone time input for flow models: t * T, in [0, T]."""
        return self.t_from_sigma(sigma) * self.num_steps

    def input_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """x_t = input_scale * x = x / (1 + sigma); 1 at sigma = inf (x already holds the noise)."""
        return torch.where(torch.isinf(sigma), torch.ones_like(sigma), 1 / (1 + sigma))

    def sample_sigmas(self, n: int, spacing: str = "trailing", *, rho: float = 7.0, sigma_min: float | None = None,
                      sigma_max: float | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Decreasing sigmas for n sampling steps, ending with a final 0. (n + 1,). See VPSchedule.sample_sigmas."""
        if spacing == "karras":
            if sigma_max is None:
                raise ValueError("flow schedules reach sigma = inf; karras spacing needs a finite sigma_max=...")
            return karras_sigmas(n, sigma_min or self.sigma_min, sigma_max, rho, dtype)
        if sigma_min is not None or sigma_max is not None:
            raise ValueError(f"sigma_min / sigma_max apply to karras spacing only, not {spacing!r}")
        t = (spacing_timesteps(spacing, n, self.num_steps, integer=False) + 1) / self.num_steps  # (n,) in (0, 1]
        sigmas = self.sigma_from_t(t)
        return torch.cat([sigmas, sigmas.new_zeros(1)]).to(dtype)


@lru_cache(maxsize=None)
def get_schedule(name: str, zero_snr: bool = False, num_steps: int = NUM_TRAIN_STEPS) -> VPSchedule | FlowSchedule:
    """Schedule by name: "scaled-linear" | "linear" | "cosine" (VP, optionally zero terminal SNR) | "flow"."""
    if name == "flow":
        if zero_snr:
            raise ValueError("the flow schedule already ends in pure noise; zero_snr applies to VP schedules only")
        return FlowSchedule(num_steps)
    makers = {"scaled-linear": betas_scaled_linear, "linear": betas_linear, "cosine": betas_cosine}
    if name not in makers:
        raise ValueError(f"unknown schedule {name!r}; choose one of {VP_SCHEDULES + ('flow',)}")
    betas = makers[name](num_steps)
    return VPSchedule(rescale_zero_terminal_snr(betas) if zero_snr else betas)
