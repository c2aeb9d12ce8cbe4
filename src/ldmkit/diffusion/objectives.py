"""Training objectives (eps / v / x0 on a VP schedule, rectified-flow velocity) and the denoiser wrapper.

Backbone call convention: `backbone(x_in, t_model, drop=drop, **cond) -> out`, shaped like x_in, where
  - VP kinds: x_in = x_vp = sqrt(abar) x0 + sqrt(1 - abar) eps and t_model is the timestep in [0, T-1]
    (integers during training, continuous when sampling);
  - flow: x_in = x_t = (1 - t) x0 + t eps and t_model = t * T (T = 1000).
Raw outputs: eps -> eps; v -> v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022); x0 -> x0;
flow -> velocity eps - x0 (Liu et al. 2022; Lipman et al. 2023).

Reproducibility: each example's noise, time and condition dropout come from its own generator seeded by
hash(seed, global sample index) (`draw_training_noise`), so a run gives the same draws for example i at any batch
size, gradient-accumulation split or number of processes. The cost is one small CPU generator per example
(about 10 us), negligible next to a training step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ldmkit.nn import mean_flat, per_example
from ldmkit.seeding import example_generators

from .schedules import NUM_TRAIN_STEPS, VP_SCHEDULES, FlowSchedule, VPSchedule, get_schedule, vp_coefficients

KINDS = ("eps", "v", "x0", "flow")
TRAIN_STREAM = 1  # generator stream for training draws (sampling uses stream 0)


@dataclass(frozen=True)
class Objective:
    kind: str = "eps"  # what the backbone predicts: eps | v | x0 (VP schedule) | flow (velocity eps - x0)
    schedule: str = "scaled-linear"  # VP noise schedule: scaled-linear | linear | cosine (unused by flow)
    zero_snr: bool = False  # rescale the VP schedule to zero terminal SNR (Lin et al. 2023); unused by flow
    min_snr_gamma: float | None = None  # Min-SNR-gamma loss weighting (Hang et al. 2023), e.g. 5.0; None = off
    logit_mean: float = 0.0  # flow: mean of the logit-normal time distribution (Esser et al. 2024)
    logit_std: float = 1.0  # flow: std of the logit-normal time distribution
    p_uncond: float = 0.1  # probability of dropping the condition (classifier-free guidance training)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown objective kind {self.kind!r}; choose one of {KINDS}")
        if self.schedule not in VP_SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {VP_SCHEDULES}")
        if self.kind == "eps" and self.zero_snr:
            raise ValueError("eps-prediction cannot be trained with zero terminal SNR (at abar = 0 the input is pure "
                             "noise and x0 = (x - sigma eps) / alpha is undefined); use kind='v' with zero_snr=True")
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0 or None, got {self.min_snr_gamma}")
        if not self.logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")
        if not 0 <= self.p_uncond <= 1:
            raise ValueError(f"p_uncond must lie in [0, 1], got {self.p_uncond}")

    def get_schedule(self) -> VPSchedule | FlowSchedule:
        return get_schedule("flow") if self.kind == "flow" else get_schedule(self.schedule, self.zero_snr)


# ------------------------------------------------------------------------------------------ random draws


def draw_training_noise(seed: int, indices: torch.Tensor, shape: tuple[int, ...], p_uncond: float, *,
                        device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example draws for global sample `indices` (B,) int64 -> (noise (B, *shape), u (B,) in [0, 1), drop (B,)).

    Example i uses generator hash(seed, TRAIN_STREAM, indices[i]) and draws, in this order: u (uniform time), the
    dropout uniform (drop = it < p_uncond), then the noise; the draws of an example never depend on its batch.
    """
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64 or indices.dim() != 1:
        raise ValueError("indices must be a 1-D int64 tensor of global sample indices")
    B = len(indices)
    uniforms = torch.empty(B, 2)
    noise = torch.empty(B, *shape)
    for i, g in enumerate(example_generators(seed, indices, TRAIN_STREAM)):
        uniforms[i] = torch.rand(2, generator=g)
        noise[i] = torch.randn(tuple(shape), generator=g)
    return noise.to(device), uniforms[:, 0].to(device), (uniforms[:, 1] < p_uncond).to(device)


def logit_normal_time(u: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Uniform u -> t = sigmoid(mean + std * Phi^-1(u)) (logit-normal, Esser et al. 2024 sec. 3.1); u = 0 -> t = 0."""
    return torch.sigmoid(mean + std * torch.special.ndtri(u.double())).to(u.dtype)


# -------------------------------------------------------------------------------------------- weighting


def min_snr_weight(snr: torch.Tensor, kind: str, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023): min(SNR, gamma) in x0 space, divided by each target's x0 factor.

    eps: min(SNR, g) / SNR; x0: min(SNR, g); v: min(SNR, g) / (SNR + 1); flow: min(SNR, g) / (1 + sqrt(SNR))^2
    (|v_flow error|^2 = |x0 error|^2 / t^2 and 1/t^2 = (1 + 1/sigma)^2). SNR = 1 / sigma^2 (alpha^2 / sigma_vp^2).
    """
    clipped = snr.clamp(max=gamma)
    if kind == "eps":
        return clipped / snr
    if kind == "x0":
        return clipped
    if kind == "v":
        return clipped / (snr + 1)
    if kind == "flow":
        return torch.where(torch.isinf(snr), torch.zeros_like(snr), clipped / (1 + snr.sqrt()) ** 2)
    raise ValueError(f"unknown objective kind {kind!r}; choose one of {KINDS}")


# ---------------------------------------------------------------------------------------------- losses


def vp_loss(backbone: Callable, x0: torch.Tensor, noise: torch.Tensor, u: torch.Tensor, drop: torch.Tensor,
            cond: dict, objective: Objective) -> torch.Tensor:
    """eps / v / x0 regression on a VP schedule (Ho et al. 2020 eq. 14; Salimans & Ho 2022). (B,)."""
    schedule = objective.get_schedule()
    k = (u.cpu() * schedule.num_steps).long().clamp(max=schedule.num_steps - 1)  # (B,) discrete timestep
    abar = schedule.alphas_cumprod[k].to(x0.device, torch.float32)  # (B,)
    a, s = per_example(abar.sqrt(), x0), per_example((1 - abar).sqrt(), x0)
    x_t = a * x0 + s * noise  # q(x_t | x0), eq. 4
    target = {"eps": noise, "v": a * noise - s * x0, "x0": x0}[objective.kind]
    out = backbone(x_t, k.to(x0.device, torch.float32), drop=drop, **cond)
    loss = mean_flat((out.float() - target.float()) ** 2)  # (B,)
    if objective.min_snr_gamma is not None:
        loss = loss * min_snr_weight(abar / (1 - abar), objective.kind, objective.min_snr_gamma)
    return loss


def flow_loss(backbone: Callable, x0: torch.Tensor, noise: torch.Tensor, u: torch.Tensor, drop: torch.Tensor,
              cond: dict, objective: Objective) -> torch.Tensor:
    """Rectified-flow / conditional flow matching: regress the velocity eps - x0 at x_t = (1-t) x0 + t eps. (B,)."""
    t = logit_normal_time(u, objective.logit_mean, objective.logit_std)  # (B,)
    tb = per_example(t, x0)
    x_t = (1 - tb) * x0 + tb * noise
    out = backbone(x_t, t * NUM_TRAIN_STEPS, drop=drop, **cond)
    loss = mean_flat((out.float() - (noise - x0).float()) ** 2)  # (B,)
    if objective.min_snr_gamma is not None:
        loss = loss * min_snr_weight(((1 - t) / t) ** 2, "flow", objective.min_snr_gamma)
    return loss


def training_loss(backbone: Callable, x0: torch.Tensor, cond: dict | None, indices: torch.Tensor,
                  objective: Objective, seed: int) -> torch.Tensor:
    """Per-example loss (B,) for clean latents x0 (B, ...) at global sample `indices` (B,) int64.

    Noise, time and condition dropout come from `draw_training_noise(seed, indices, ...)`. If `cond` carries a
    "drop" (B,) bool, the example is dropped when either it or the random dropout says so.
    """
    if len(indices) != len(x0):
        raise ValueError(f"got {len(indices)} sample indices for a batch of {len(x0)}")
    cond = dict(cond or {})
    noise, u, drop = draw_training_noise(seed, indices, tuple(x0.shape[1:]), objective.p_uncond, device=x0.device)
    if "drop" in cond:
        drop = drop | cond.pop("drop").to(drop.device, torch.bool)
    noise = noise.to(x0.dtype)
    fn = flow_loss if objective.kind == "flow" else vp_loss
    return fn(backbone, x0, noise, u, drop, cond, objective)


# ---------------------------------------------------------------------------------------------- denoiser


def make_denoiser(backbone: Callable, objective: Objective) -> Callable:
    """Wrap a backbone as `denoise(x, sigma, cond=None) -> x0_hat` in sigma space (x = x0 + sigma eps).

    VP: x_vp = x / sqrt(1 + sigma^2), t = schedule.timestep(sigma); flow: x_t = x / (1 + sigma), t = sigma/(1+sigma).
    At sigma = inf, x holds the noise itself and is fed unscaled. `cond` is passed to the backbone as keyword
    arguments (including "drop" if present).
    """
    schedule = objective.get_schedule()
    kind = objective.kind

    def denoise(x: torch.Tensor, sigma: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        if sigma.shape != (x.shape[0],):
            raise ValueError(f"sigma must have shape ({x.shape[0]},) for x of shape {tuple(x.shape)}, "
                             f"got {tuple(sigma.shape)}")
        sigma = sigma.to(x.device, torch.float64 if x.dtype == torch.float64 else torch.float32)
        x_in = x * per_example(schedule.input_scale(sigma), x)  # model-space input
        out = backbone(x_in, schedule.model_time(sigma).to(sigma.dtype), **(cond or {})).to(x.dtype)
        if kind == "flow":
            t = per_example(FlowSchedule.t_from_sigma(sigma), x)
            return x_in - t * out  # x_t - t (eps - x0) = x0
        if kind == "x0":
            return out
        if kind == "eps":
            return x - per_example(sigma, x) * out  # x = x0 + sigma eps
        alpha, sigma_vp = vp_coefficients(sigma)
        return per_example(alpha, x) * x_in - per_example(sigma_vp, x) * out  # x0 = alpha x_vp - sigma_vp v

    return denoise
