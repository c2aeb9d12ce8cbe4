"""Guidance with two conditions, an image and a text, each with its own scale.

A denoiser trained with the image and the text dropped independently is four models in one: D(-, -), D(i, -),
D(-, t) and D(i, t). Multi-condition classifier-free guidance (Brooks et al. 2023, InstructPix2Pix, eq. 3) walks a
chain from the null condition to the full one and scales each step of it:

    D = D(-, -) + w_i (D(i, -) - D(-, -)) + w_t (D(i, t) - D(i, -))

With w_i = w_t = 1 this is D(i, t), the fully conditional model; with w_t = 0 it is plain CFG on the image alone.
Read through Bayes' rule, w_i scales grad log p(i | x) and w_t scales grad log p(t | x, i): the text is guided given
the image. `ChainGuidance` evaluates every link of the chain in one batched call.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ldmkit.guidance.cfg import Cond, CondDenoiser, cat_cond, expand_cond, rescale_guided, rescale_origin
from ldmkit.nn import per_example


class ChainGuidance:
    """`guided(x, sigma) -> x0_hat` = D(c_0) + sum_k w_k (D(c_k) - D(c_{k-1})) over `conds` = [c_0, ..., c_K].

    c_0 is the null condition, c_K the fullest; `scales` = [w_1, ..., w_K]. Options as in `GuidedDenoiser`:
    `rescale` (phi, measured against D(c_K) in `rescale_space`) and `interval` (guide only for sigma in (lo, hi];
    elsewhere D(c_K) alone, one evaluation).
    """

    def __init__(self, denoise: CondDenoiser, conds: Sequence[Cond], scales: Sequence[float], *,
                 rescale: float = 0.0, rescale_space: str = "eps", interval: tuple[float, float] | None = None):
        if len(conds) != len(scales) + 1 or len(scales) < 1:
            raise ValueError(f"a guidance chain of {len(conds)} conditions needs {len(conds) - 1} scales, "
                             f"got {len(scales)}")
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"guidance rescale phi={rescale} must be in [0, 1] (0 = off)")
        self.denoise, self.conds, self.scales = denoise, list(conds), [float(w) for w in scales]
        self.rescale, self.rescale_space, self.interval = rescale, rescale_space, interval

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        sigma = sigma.expand(B) if sigma.ndim == 0 else sigma
        conds = [expand_cond(c, B) for c in self.conds]
        active = torch.ones(B, dtype=torch.bool, device=x.device)
        if self.interval is not None:
            lo, hi = self.interval
            active = (sigma > lo) & (sigma <= hi)  # Kynkaanniemi et al. 2024: guide on (lo, hi]
            if not bool(active.any()):
                return self.denoise(x, sigma, conds[-1])  # the fully conditional model, one evaluation
        batched = conds[0]
        for c in conds[1:]:
            batched = cat_cond(batched, c)
        n = len(conds)
        out = self.denoise(x.repeat(n, *[1] * (x.ndim - 1)), sigma.repeat(n), batched)
        d = [o.to(torch.promote_types(o.dtype, torch.float32)) for o in out.chunk(n)]  # D(c_0), ..., D(c_K)
        guided = d[0]
        for k, w in enumerate(self.scales):
            guided = guided + w * (d[k + 1] - d[k])
        if self.rescale > 0:
            origin = rescale_origin(x.to(guided.dtype), sigma.to(guided.dtype), self.rescale_space)
            guided = rescale_guided(guided, d[-1], origin, self.rescale)
        return torch.where(per_example(active, guided), guided, d[-1]).to(out.dtype)


def image_text_conds(cond: Cond, uncond: Cond, image: torch.Tensor) -> list[Cond]:
    """The chain (no image, no text) -> (image) -> (image, text) from a text cond, its null (or negative-prompt)
    cond and image embeddings (B, E). Rows whose prompt is empty carry no text at the last link, so for them the
    last step adds nothing; when every row is empty the chain stops at the image."""
    B = image.shape[0]
    yes, no = torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)
    uncond = expand_cond(uncond, B)
    null = {**uncond, "image": image, "drop_image": no}
    image_only = {**expand_cond(cond, B), "drop": torch.ones(B, dtype=torch.bool), "image": image,
                  "drop_image": yes}
    full = {**cond, "image": image, "drop_image": yes}
    if bool(cond["drop"].all()):
        return [null, image_only]
    return [null, image_only, full]


def image_text_scales(conds: list[Cond], image_scale: float, text_scale: float) -> list[float]:
    """[w_i] or [w_i, w_t], matching `image_text_conds`."""
    return [image_scale] if len(conds) == 2 else [image_scale, text_scale]
