"""Muon for the weight matrices, AdamW for everything else, in one optimizer (`train.optimizer=muon`).

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"): keep a momentum of the gradient, replace the
(Nesterov) momentum matrix G by the nearest semi-orthogonal matrix U V^T of its SVD G = U S V^T, approximated by
five Newton-Schulz iterations on the normalised G, and step along that. Every direction of the layer then moves by
the same amount, however unevenly the raw gradient spreads over them. A conv kernel (O, I, k, k) is the (O, I*k*k)
matrix of its im2col form. The update is scaled by 0.2 * sqrt(max(O, I*k*k)) so that its RMS matches a typical AdamW
update (Liu et al. 2025, "Muon is scalable for LLM training"), which lets both parameter kinds share one learning
rate and schedule. Parameters that are not matrices, and thin ones (fewer than `MIN_SIDE` rows or columns: a
one-channel image conv, the latent 1x1 convs), take the AdamW update (Loshchilov & Hutter 2019).
"""

from __future__ import annotations

import torch

MIN_SIDE = 16  # a matrix with fewer rows or columns than this takes the AdamW update
NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz coefficients (Jordan et al. 2024)


def is_matrix(p: torch.Tensor) -> bool:
    return p.ndim >= 2 and min(p.shape[0], p[0].numel()) >= MIN_SIDE


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximately U V^T for a 2-D g = U S V^T: quintic Newton-Schulz iterations on g / ||g||_F."""
    a, b, c = NS_COEFFS
    x = g.to(dtype)
    x = x / (x.norm() + 1e-7)  # singular values in [0, 1]
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        A = x @ x.T  # (r, r) with r the smaller side
        x = a * x + (b * A + c * A @ A) @ x
    return (x.T if tall else x).to(g.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer, two update rules: group 0 (matrices) Muon, group 1 (the rest) AdamW; `lr`, `weight_decay`
    and the schedule (`set_lr`) are shared. State is plain tensors, so `state_dict` round-trips through
    `torch.load(weights_only=True)` like AdamW's."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0, momentum: float = 0.95,
                 ns_steps: int = 5, ns_dtype: torch.dtype = torch.bfloat16, eps: float = 1e-8):
        params = list(params)
        groups = [{"params": [p for p in params if is_matrix(p)], "muon": True},
                  {"params": [p for p in params if not is_matrix(p)], "muon": False}]
        super().__init__([g for g in groups if g["params"]],
                         {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay, "momentum": momentum,
                          "ns_steps": ns_steps, "eps": eps})
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled weight decay
                (self._muon if group["muon"] else self._adamw)(p, group)

    def _muon(self, p: torch.Tensor, group: dict) -> None:
        state, mu = self.state[p], group["momentum"]
        if not state:
            state["momentum"] = torch.zeros_like(p)
        buf = state["momentum"].lerp_(p.grad, 1 - mu)
        g = p.grad.lerp(buf, mu)  # Nesterov: look one momentum step ahead
        m = g.reshape(g.shape[0], -1)  # (O, I*k*k)
        u = orthogonalize(m, group["ns_steps"], self.ns_dtype)
        p.add_(u.view_as(p), alpha=-group["lr"] * 0.2 * max(m.shape) ** 0.5)

    def _adamw(self, p: torch.Tensor, group: dict) -> None:
        state, (b1, b2) = self.state[p], group["betas"]
        if not state:
            state["step"] = torch.zeros(())
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        state["step"] += 1
        t = float(state["step"])
        state["exp_avg"].lerp_(p.grad, 1 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        denom = (state["exp_avg_sq"] / (1 - b2 ** t)).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - b1 ** t))
