"""Classifier-free guidance and its variants, as wrappers around a conditional denoiser.

A conditional denoiser is `denoise(x, sigma, cond) -> x0_hat` in sigma space (x = x0 + sigma * eps, sigma (B,)).
Guidance turns it into the unconditioned closure `guided(x, sigma) -> x0_hat` that samplers take.

Scale convention, used everywhere in ldmkit: the guided prediction is

    D_w = D_u + w * (D_c - D_u)        (Ho & Salimans 2022, eq. 6, with their 1 + w written as our w)

so w = 1 is the conditional model, w = 0 the unconditional one, w > 1 extrapolates away from D_u.

Guidance is combined on x0_hat. For a fixed (x, sigma) every parameterisation is an affine map of x0_hat with the
same coefficients for both branches (eps = (x - x0) / sigma, v, flow velocity), so the linear CFG combination is
identical whichever prediction it is written on. Non-linear variants are not: guidance rescale depends on where
the std is measured (`rescale_space` below), and APG projects on the conditional x0_hat as in its paper.

Variants (all options of one `GuidedDenoiser`, so they compose):
- negative prompt: the negative prompt's prediction replaces the unconditional one; pass its cond as `uncond`
  (`encode_with_negative` builds the pair; a batch-1 uncond is shared by every prompt).
- guidance rescale (Lin et al. 2023, sec. 3.4): rescale the guided prediction to the per-example std of the
  conditional one and mix with weight phi. See `rescale_guided` for the space it is measured in.
- guidance interval (Kynkaanniemi et al. 2024): guide only where sigma is in (lo, hi]; elsewhere return the
  conditional model and do not evaluate the unconditional branch at all.
- adaptive projected guidance (Sadat et al. 2024, APG): `APGConfig`; stateful momentum, so build one guided
  denoiser per sampling run (or call `.reset()` between runs).
- autoguidance (Karras et al. 2024): the guiding branch is a weaker model of the same condition instead of the
  unconditional one, D = D_weak(c) + w (D(c) - D_weak(c)): it pushes away from the weak model's errors rather than
  toward the condition, so it sharpens without narrowing. `weak_mix` lambda < 1 blends the two guiding branches,
  G = lambda D_weak(c) + (1 - lambda) D(u), D = G + w (D(c) - G): lambda = 1 is autoguidance, 0 is CFG.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ldmkit.nn import per_example

Cond = dict[str, torch.Tensor]
CondDenoiser = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]

RESCALE_SPACES = ("x0", "eps", "v", "flow")
MODES = ("cfg", "apg", "autoguidance")


# ----------------------------------------------------------------------------------------------------------------
# Condition dicts: batch-first tensors that are expanded, selected and concatenated along the batch.

def cond_batch(cond: Cond) -> int | None:
    """The batch size of a cond dict (None for an empty dict); raises if its tensors disagree."""
    sizes = {}
    for key, value in cond.items():
        if not isinstance(value, torch.Tensor) or value.ndim == 0:
            raise TypeError(f"cond[{key!r}] is {type(value).__name__}; cond dicts hold batch-first tensors "
                            "(for the null condition use unconditional(cond), which sets 'drop')")
        sizes[key] = value.shape[0]
    if len(set(sizes.values())) > 1:
        raise ValueError(f"cond tensors have different batch sizes {sizes}; give every entry the same batch")
    return next(iter(sizes.values()), None)


def expand_cond(cond: Cond, batch: int) -> Cond:
    """Broadcast a batch-1 cond (e.g. one negative prompt) to `batch` rows; a batch-`batch` cond is returned as is."""
    n = cond_batch(cond)
    if n is None or n == batch:
        return dict(cond)
    if n != 1:
        raise ValueError(f"cond has batch {n} but x has batch {batch}; pass one row per example or a single row")
    return {k: v.expand(batch, *v.shape[1:]) for k, v in cond.items()}


def select_cond(cond: Cond, index: torch.Tensor) -> Cond:
    """Rows `index` of every tensor in `cond`."""
    return {k: v[index] for k, v in cond.items()}


def unconditional(cond: Cond) -> Cond:
    """The null condition matching `cond`: same tensors, `drop` all True (the backbone swaps in its null embedding)."""
    n = cond_batch(cond)
    if n is None:
        raise ValueError("unconditional() needs a non-empty cond dict to know the batch size and keys")
    device = next(iter(cond.values())).device
    return {**cond, "drop": torch.ones(n, dtype=torch.bool, device=device)}


def _pad_tokens(cond: Cond, length: int) -> Cond:
    """Zero-pad `context` to `length` tokens, with `context_mask` False on the padding (created if missing)."""
    ctx = cond["context"]  # (B, T, Dc)
    mask = cond.get("context_mask")
    if mask is None:
        mask = torch.ones(ctx.shape[:2], dtype=torch.bool, device=ctx.device)  # (B, T)
    pad = length - ctx.shape[1]
    if pad > 0:
        ctx = torch.cat([ctx, ctx.new_zeros(ctx.shape[0], pad, ctx.shape[2])], dim=1)  # (B, length, Dc)
        mask = torch.cat([mask, mask.new_zeros(mask.shape[0], pad)], dim=1)  # (B, length)
    return {**cond, "context": ctx, "context_mask": mask}


def cat_cond(a: Cond, b: Cond) -> Cond:
    """Concatenate two cond dicts along the batch: rows of `a` first, then rows of `b`.

    A missing `drop` counts as all False. Contexts of different token lengths are zero-padded to the longer one
    with `context_mask` False on the padding, so a short negative prompt can share a batch with long prompts.
    """
    for d in (a, b):
        cond_batch(d)  # type and batch checks with a clear message
    a, b = dict(a), dict(b)
    for d, other in ((a, b), (b, a)):
        if "drop" in other and "drop" not in d and d:
            d["drop"] = torch.zeros(cond_batch(d), dtype=torch.bool, device=other["drop"].device)
    if "context" in a and "context" in b:
        ta, tb = a["context"].shape[1], b["context"].shape[1]
        if ta != tb or ("context_mask" in a) != ("context_mask" in b):
            a, b = _pad_tokens(a, max(ta, tb)), _pad_tokens(b, max(ta, tb))
    if set(a) != set(b):
        raise ValueError(f"cond keys {sorted(a)} and uncond keys {sorted(b)} differ; build the uncond with "
                         "unconditional(cond) or encode it with the same encoder")
    out = {}
    for key in a:
        if a[key].shape[1:] != b[key].shape[1:] or a[key].dtype != b[key].dtype:
            raise ValueError(f"cond[{key!r}] is {tuple(a[key].shape)} {a[key].dtype} but uncond[{key!r}] is "
                             f"{tuple(b[key].shape)} {b[key].dtype}; they must match beyond the batch dim")
        out[key] = torch.cat([a[key], b[key]], dim=0)
    return out


def split(out: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a batched output into its first `n` rows (conditional) and the rest (unconditional)."""
    return out[:n], out[n:]


def _flat_dims(x: torch.Tensor) -> list[int]:
    return list(range(1, x.ndim))


# ----------------------------------------------------------------------------------------------------------------
# Combination rules on (conditional, unconditional) predictions.

@dataclass(frozen=True)
class APGConfig:
    """Adaptive projected guidance (Sadat et al. 2024, "Eliminating Oversaturation and Artifacts of High Guidance
    Scales in Diffusion Models"); the defaults are the paper's. With eta=1, momentum=0 and no threshold APG is CFG."""

    eta: float = 0.0  # weight of the update's component parallel to D_c (0 removes it: the oversaturating part)
    momentum: float = -0.5  # beta of the running sum avg <- diff + beta * avg across sampler steps
    norm_threshold: float = 0.0  # r: rescale the update to L2 norm <= r per example; 0 disables

    def __post_init__(self):
        if self.norm_threshold < 0:
            raise ValueError(f"APGConfig.norm_threshold={self.norm_threshold} must be >= 0 (0 disables it)")


APG_DEFAULTS = APGConfig()


@dataclass(frozen=True)
class Guidance:
    """Every guidance setting of one sampling call, from the CLI, the Python API and the web UI down to the guided
    denoiser (`Guidance.wrap`). The scale follows the convention of this module: 1 is the conditional model."""

    scale: float = 3.0                       # w: 1 = conditional, 0 = unconditional (Ho & Salimans write 1 + w)
    mode: str = "cfg"                        # cfg | apg (configured by `apg`) | autoguidance (the pipeline's guide/)
    rescale: float = 0.0                     # guidance rescale phi (Lin et al. 2023); 0 = off
    interval: tuple[float, float] | None = None  # guide only for sigma in (lo, hi]; None = every step
    negative_prompt: str | None = None       # its prediction replaces the unconditional one for every prompt
    classifier_scale: float = 0.0            # classifier guidance strength s; 0 = off
    apg: APGConfig = APGConfig()             # mode="apg" only
    image_scale: float | None = None         # w_i of an image prompt (`ldmkit.guidance.multi`); None = scale
    guide_mix: float = 1.0                   # autoguidance: the guide's share of the guiding branch (0 = CFG)

    def wrap(self, denoise: CondDenoiser, cond: Cond, uncond: Cond, rescale_space: str = "eps",
             guide: CondDenoiser | None = None) -> "GuidedDenoiser":
        """The guided denoiser of these settings (classifier guidance is added by the caller, which holds the
        classifier: `ldmkit.guidance.classifier.classifier_guidance`). Autoguidance guides with `guide` on the
        prompt itself, blended with `uncond` when guide_mix < 1 (only then has a negative prompt a role)."""
        auto = self.mode == "autoguidance"
        if auto and guide is None:
            raise ValueError("autoguidance needs a guide: a pipeline with a guide/ stage (`ldmkit train pipeline "
                             "--preset fashion-mnist` makes one; `ldmkit train ldm --preset fashion-mnist-guide`)")
        if auto and self.negative_prompt is not None and self.guide_mix == 1.0:
            raise ValueError("autoguidance alone guides with the weaker model on the prompt itself; drop the "
                             "negative prompt, blend in CFG with --guide-mix below 1, or use --guidance-mode cfg")
        if not auto and self.guide_mix != 1.0:
            raise ValueError(f"guide_mix={self.guide_mix} applies to --guidance-mode autoguidance only")
        return GuidedDenoiser(denoise, cond, uncond, self.scale, mode=self.mode, rescale=self.rescale,
                              rescale_space=rescale_space, interval=self.interval, apg=self.apg,
                              weak=guide if auto else None, weak_mix=self.guide_mix)


def project(v: torch.Tensor, onto: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split `v` into parts parallel and orthogonal to `onto`, per example over all non-batch dims (float64)."""
    dims = _flat_dims(v)
    u = torch.nn.functional.normalize(onto.double().flatten(1), dim=1).view_as(onto)  # unit D_c per example
    parallel = (v.double() * u).sum(dims, keepdim=True) * u  # <v, u> u
    return parallel.to(v.dtype), (v.double() - parallel).to(v.dtype)


def apg_update(diff: torch.Tensor, d_cond: torch.Tensor, eta: float, norm_threshold: float) -> torch.Tensor:
    """APG update from the (momentum-averaged) difference D_c - D_u: norm cap r, then eta * parallel + orthogonal."""
    if norm_threshold > 0:
        norm = diff.flatten(1).norm(dim=1)  # (B,)
        diff = diff * per_example(torch.clamp(norm_threshold / norm, max=1.0), diff)  # ||diff|| <= r
    parallel, orthogonal = project(diff, d_cond)
    return orthogonal + eta * parallel


def rescale_origin(x: torch.Tensor, sigma: torch.Tensor, space: str) -> torch.Tensor:
    """The point o(x, sigma) with prediction_space = c(sigma) * (x0_hat - o), c a per-example constant.

    x0: o = 0. eps = (x - x0) / sigma: o = x. VP v = alpha eps - sigma_vp x0 = (x - (1 + s^2) x0) / (s sqrt(1 + s^2)):
    o = x / (1 + sigma^2). Flow velocity u = eps - x0 = (x - (1 + s) x0) / s: o = x / (1 + sigma).
    """
    s = per_example(sigma, x)
    if space == "x0":
        return torch.zeros_like(x)
    if space == "eps":
        return x
    if space == "v":
        return x / (1 + s**2)
    if space == "flow":
        return x / (1 + s)
    raise ValueError(f"rescale_space={space!r} is not one of {RESCALE_SPACES}")


def rescale_guided(guided: torch.Tensor, d_cond: torch.Tensor, origin: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, sec. 3.4), measured in the space whose origin is `origin`.

    Rescaling P_g by k in a space P = c (x0_hat - o) is x0_hat -> o + k (x0_hat - o), and since std(c y) = |c| std(y)
    the constant cancels in k = phi * std(P_c) / std(P_g) + 1 - phi. So the same x0_hat formula serves every space;
    the spaces differ only through o, and they do give different results (std is not shift-invariant in x0_hat).
    The default "eps" is diffusers' `guidance_rescale` on an eps-prediction model; "v" is Lin et al.'s own setting
    (their model predicts v); "x0" rescales the predicted clean latent directly; "flow" a velocity model's output.
    """
    dims = _flat_dims(guided)
    std_c = (d_cond - origin).std(dim=dims, keepdim=True)
    std_g = (guided - origin).std(dim=dims, keepdim=True).clamp_min(1e-12)
    k = phi * std_c / std_g + (1 - phi)  # mix rescaled and plain guidance
    return origin + k * (guided - origin)


# ----------------------------------------------------------------------------------------------------------------
# The guided denoiser: one batched call, then the combination.

class GuidedDenoiser:
    """`guided(x, sigma) -> x0_hat` from a conditional denoiser; build it with `guided_denoiser` or `cfg`.

    Each call evaluates `denoise` once on cat[x, x[active]] with cat_cond(cond, uncond[active]), where `active`
    marks the examples that are guided (sigma in the interval and scale != 1); the others only pay for the
    conditional branch. With APG momentum the object keeps a running average across calls, so use one instance
    per sampling run, or call `reset()` before reusing it. With a `weak` denoiser (autoguidance) the guiding branch
    is `weak` on `cond` in its own call, blended with the unconditional one when `weak_mix` < 1.
    """

    def __init__(self, denoise: CondDenoiser, cond: Cond, uncond: Cond, scale: float | torch.Tensor, *,
                 mode: str = "cfg", rescale: float = 0.0, rescale_space: str = "eps",
                 interval: tuple[float, float] | None = None, apg: APGConfig = APGConfig(),
                 weak: CondDenoiser | None = None, weak_mix: float = 1.0):
        if mode not in MODES:
            raise ValueError(f"guidance mode={mode!r} is not one of {MODES}")
        if (mode == "autoguidance") != (weak is not None):
            raise ValueError("autoguidance needs the weak guide denoiser (`weak`), and only autoguidance takes one")
        if not 0.0 <= weak_mix <= 1.0:
            raise ValueError(f"guide mix lambda={weak_mix} must be in [0, 1] (1 = autoguidance alone, 0 = CFG)")
        if rescale_space not in RESCALE_SPACES:
            raise ValueError(f"rescale_space={rescale_space!r} is not one of {RESCALE_SPACES}")
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"guidance rescale phi={rescale} must be in [0, 1] (0 = off, 0.7 is typical)")
        if interval is not None and not (len(interval) == 2 and 0 <= interval[0] < interval[1]):
            raise ValueError(f"guidance interval={interval} must be (lo, hi) with 0 <= lo < hi, in sigma units")
        if isinstance(scale, torch.Tensor) and scale.ndim > 1:
            raise ValueError(f"guidance scale has shape {tuple(scale.shape)}; give a float or a (B,) tensor")
        cond_batch(cond), cond_batch(uncond)  # fail early on malformed dicts
        self.denoise, self.cond, self.uncond, self.scale = denoise, cond, uncond, scale
        self.mode, self.rescale, self.rescale_space = mode, rescale, rescale_space
        self.interval, self.apg, self.weak, self.weak_mix = interval, apg, weak, weak_mix
        self._running: torch.Tensor | None = None  # APG momentum state, (B, ...)

    def reset(self) -> None:
        """Forget the APG momentum average (start of a new sampling run)."""
        self._running = None

    def _active(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example scale (B,) and the mask of examples that need the unconditional branch."""
        scale = torch.as_tensor(self.scale, dtype=torch.float32, device=sigma.device)
        if scale.ndim == 1 and scale.shape[0] not in (1, sigma.shape[0]):
            raise ValueError(f"guidance scale has {scale.shape[0]} entries for a batch of {sigma.shape[0]}")
        scale = scale.expand(sigma.shape[0])
        active = scale != 1.0  # w = 1 is exactly the conditional model
        if self.interval is not None:
            lo, hi = self.interval
            active = active & (sigma > lo) & (sigma <= hi)  # Kynkaanniemi et al. 2024: guide on (lo, hi]
        return scale, active

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        sigma = sigma.expand(B) if sigma.ndim == 0 else sigma
        if sigma.shape != (B,):
            raise ValueError(f"sigma has shape {tuple(sigma.shape)}; expected a scalar or ({B},) "
                             f"for x of shape {tuple(x.shape)}")
        cond = expand_cond(self.cond, B)
        scale, active = self._active(sigma)
        if not bool(active.any()):
            return self.denoise(x, sigma, cond)  # conditional branch only
        idx = active.nonzero().squeeze(1)  # (A,)
        uncond = select_cond(expand_cond(self.uncond, B), idx)
        if self.weak is not None and self.weak_mix == 1.0:  # autoguidance alone: no unconditional branch
            d_cond, d_uncond = self.denoise(x, sigma, cond), None
        else:
            out = self.denoise(torch.cat([x, x[idx]]), torch.cat([sigma, sigma[idx]]), cat_cond(cond, uncond))
            d_cond, d_uncond = split(out, B)  # (B, ...), (A, ...)
        if self.weak is not None:  # the weaker network on the same condition, its own call
            d_weak = self.weak(x[idx], sigma[idx], select_cond(cond, idx))
            d_uncond = d_weak if d_uncond is None else torch.lerp(d_uncond, d_weak.to(d_uncond.dtype), self.weak_mix)
        guided = self._combine(d_cond, d_uncond, x, sigma, scale, idx)
        return d_cond.index_copy(0, idx, guided.to(d_cond.dtype))

    def _combine(self, d_cond_all, d_uncond, x, sigma, scale, idx) -> torch.Tensor:
        dtype = torch.promote_types(d_cond_all.dtype, torch.float32)
        d_c, d_u = d_cond_all[idx].to(dtype), d_uncond.to(dtype)  # (A, ...)
        w = per_example(scale[idx].to(dtype), d_c)
        if self.mode != "apg":
            guided = d_u + w * (d_c - d_u)  # D_u + w (D_c - D_u); autoguidance: D_u is the weak model's
        else:
            diff = self._momentum(d_c - d_u, d_cond_all, idx)
            update = apg_update(diff, d_c, self.apg.eta, self.apg.norm_threshold)
            guided = d_c + (w - 1) * update  # Sadat et al.: D_c + (w - 1) * update; eta=1, beta=0, r=0 gives CFG
        if self.rescale > 0:
            origin = rescale_origin(x[idx].to(dtype), sigma[idx].to(dtype), self.rescale_space)
            guided = rescale_guided(guided, d_c, origin, self.rescale)
        return guided

    def _momentum(self, diff: torch.Tensor, d_cond_all: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """avg <- diff + beta * avg on the guided rows (APG's negative momentum); returns the new average.

        Only guided calls update it: steps outside the guidance interval leave the average untouched."""
        if self.apg.momentum == 0:
            return diff
        if self._running is None:
            self._running = torch.zeros(d_cond_all.shape, dtype=diff.dtype, device=diff.device)
        if self._running.shape != d_cond_all.shape:
            raise RuntimeError(f"APG momentum state has shape {tuple(self._running.shape)} but this call has "
                               f"{tuple(d_cond_all.shape)}; call reset() (or build a new guided denoiser) per run")
        avg = diff + self.apg.momentum * self._running[idx]
        self._running[idx] = avg
        return avg


def guided_denoiser(denoise: CondDenoiser, cond: Cond, uncond: Cond, scale: float | torch.Tensor, *,
                    mode: str = "cfg", rescale: float = 0.0, rescale_space: str = "eps",
                    interval: tuple[float, float] | None = None, apg: APGConfig = APGConfig(),
                    weak: CondDenoiser | None = None, weak_mix: float = 1.0) -> GuidedDenoiser:
    """Front door composing every CFG variant (see the module docstring).

    denoise: conditional denoiser (x, sigma, cond) -> x0_hat. cond / uncond: cond dicts (batch B or 1); for a
    negative prompt pass its cond as `uncond`. scale: w (float or (B,)), 1 = conditional. mode: "cfg" or "apg"
    (configured by `apg`). rescale: phi of guidance rescale in [0, 1], measured in `rescale_space` ("eps"
    matches diffusers' `guidance_rescale` on an eps model, "v" Lin et al.'s v-prediction model, "x0", "flow").
    interval: (lo, hi) in sigma; guidance only for lo < sigma <= hi, the conditional model elsewhere.
    weak: with mode "autoguidance", the weaker denoiser whose prediction on `cond` replaces the unconditional one
    (weak_mix = 1) or is blended with it (weak_mix = lambda in [0, 1)).
    """
    return GuidedDenoiser(denoise, cond, uncond, scale, mode=mode, rescale=rescale, rescale_space=rescale_space,
                          interval=interval, apg=apg, weak=weak, weak_mix=weak_mix)


def cfg(denoise: CondDenoiser, cond: Cond, uncond: Cond, scale: float | torch.Tensor) -> GuidedDenoiser:
    """Plain classifier-free guidance D_u + w (D_c - D_u) in one batched call; w = 1 conditional, 0 unconditional."""
    return guided_denoiser(denoise, cond, uncond, scale)


def encode_with_negative(encoder, prompts: list[str], negative_prompt: str | None = None) -> tuple[Cond, Cond]:
    """(cond, uncond) for `prompts`: uncond is the encoded negative prompt (one row, shared by every prompt), or
    the learned null condition (`unconditional(cond)`) when `negative_prompt` is None. `encoder` exposes
    `encode(list[str]) -> cond dict`. Note "" is a real (empty) prompt, not the null condition."""
    if isinstance(negative_prompt, (list, tuple)):
        raise TypeError("negative_prompt is one string shared by all prompts (or None for the null condition)")
    cond = encoder.encode(list(prompts))
    uncond = unconditional(cond) if negative_prompt is None else encoder.encode([negative_prompt])
    return cond, uncond
