"""Muon for the weight matrices, AdamW for everything else, in one optimizer (`train.optimizer=muon`).

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"): keep a momentum of the gradient, replace the
(Nesterov) momentum matrix G by the nearest semi-orthogonal matrix U V^T of its SVD G = U S V^T, approximated by
five Newton-Schulz iterations on the normalised G (run on the small Gram matrix G G^T in float32, see
`orthogonalize`), and step along that. Every direction of the layer then moves by the same amount, however
unevenly the raw gradient spreads over them. A conv kernel (O, I, k, k) is the (O, I*k*k) matrix of its im2col
form. The update is scaled by 0.2 * sqrt(max(O, I*k*k)) so that its RMS matches a typical AdamW
update (Liu et al. 2025, "Muon is scalable for LLM training"), which lets both parameter kinds share one learning
rate and schedule. Parameters that are not matrices, and thin ones (fewer than `MIN_SIDE` rows or columns: a
one-channel image conv, the latent 1x1 convs), take the AdamW update (Loshchilov & Hutter 2019).
"""

from __future__ import annotations

import torch
from torch.optim.adam import adam

from ldmkit.train.optim import can_fuse

MIN_SIDE = 16  # a matrix with fewer rows or columns than this takes the AdamW update
NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz coefficients (Jordan et al. 2024)


def is_matrix(p: torch.Tensor) -> bool:
    return p.ndim >= 2 and min(p.shape[0], p[0].numel()) >= MIN_SIDE


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximately U V^T for g = U S V^T, (r, c) or a batch (n, r, c) of equal shapes: `steps` quintic
    Newton-Schulz iterations X <- (a I + b A + c A^2) X with A = X X^T, on X0 = g / ||g||_F (per matrix).

    Every iterate is X_k = Q_k X0 with Q_k a polynomial in A0 = X0 X0^T (r x r, r the smaller side), and all these
    polynomials commute, so the iteration runs on r x r matrices alone: P = a I + b A + c A^2, Q <- P Q,
    A <- P^2 A; then X = Q X0. Two (r x r x c) products instead of two per iteration: for the 128 x 1152 conv
    kernels of the autoencoder that makes float32 faster than the plain iteration in bfloat16, and ~1e-6 from a
    float64 run of it instead of ~2e-2."""
    a, b, c = NS_COEFFS
    x = g.to(dtype)
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)  # singular values in [0, 1]
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    A = x @ x.mT
    eye = torch.eye(A.shape[-1], dtype=dtype, device=A.device)
    Q = None
    for k in range(steps):
        P = a * eye + b * A + c * (A @ A)
        Q = P if Q is None else P @ Q
        if k + 1 < steps:
            A = P @ (P @ A)
    x = x if Q is None else Q @ x
    return (x.mT if tall else x).to(g.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer, two update rules: group 0 (matrices) Muon, group 1 (the rest) AdamW; `lr`, `weight_decay`
    and the schedule (`set_lr`) are shared. State is plain tensors, so `state_dict` round-trips through
    `torch.load(weights_only=True)` like AdamW's."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0, momentum: float = 0.95,
                 ns_steps: int = 5, ns_dtype: torch.dtype = torch.float32, eps: float = 1e-8):
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
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon if group["muon"] else self._adamw)(params, group)

    def _muon(self, params: list[torch.Tensor], group: dict) -> None:
        """Nesterov momentum, then one batched Newton-Schulz per distinct matrix shape (fewer, larger matmuls)."""
        mu, by_shape = group["momentum"], {}
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])  # decoupled weight decay
        for p in params:
            if not self.state[p]:
                self.state[p]["momentum"] = torch.zeros_like(p)
        grads = [p.grad for p in params]
        bufs = [self.state[p]["momentum"] for p in params]
        torch._foreach_lerp_(bufs, grads, 1 - mu)
        looks = torch._foreach_lerp(grads, bufs, mu)  # Nesterov: look one momentum step ahead
        for p, g in zip(params, looks):
            by_shape.setdefault(g.shape, []).append((p, g.reshape(g.shape[0], -1)))  # (O, I*k*k)
        for items in by_shape.values():
            u = orthogonalize(torch.stack([m for _, m in items]), group["ns_steps"], self.ns_dtype)
            scale = -group["lr"] * 0.2 * max(items[0][1].shape) ** 0.5
            torch._foreach_add_([p for p, _ in items], [s.view_as(p) for (p, _), s in zip(items, u.unbind(0))],
                                alpha=scale)

    def _adamw(self, params: list[torch.Tensor], group: dict) -> None:
        """torch's AdamW update (its functional form, fused where torch has it) with the state kept here."""
        for p in params:
            if not self.state[p]:
                self.state[p].update(step=torch.zeros(()), exp_avg=torch.zeros_like(p),
                                     exp_avg_sq=torch.zeros_like(p))
        states = [self.state[p] for p in params]
        b1, b2 = group["betas"]
        adam(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
             [], [s["step"] for s in states], fused=can_fuse(params), decoupled_weight_decay=True, amsgrad=False,
             beta1=b1, beta2=b2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
