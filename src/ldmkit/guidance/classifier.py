"""Classifier guidance (Dhariwal & Nichol 2021) in sigma space, and the noise-aware latent classifier it uses.

Sigma space: x = x0 + sigma * eps. Tweedie's formula gives E[x0 | x] = x + sigma^2 grad_x log p(x), and
log p(x | y) = log p(x) + log p(y | x) + const, so conditioning on y moves the denoiser by

    x0_hat(x | y) = x0_hat(x) + sigma^2 * grad_x log p(y | x);   with a scale s:  + s * sigma^2 * grad.

VP correspondence: x_vp = alpha x with alpha = 1 / sqrt(1 + sigma^2) and sigma_vp = alpha * sigma (so
alpha^2 + sigma_vp^2 = 1). By the chain rule grad_x = alpha * grad_{x_vp}, hence

    s * sigma^2 * grad_x = s * (sigma_vp^2 / alpha^2) * alpha * grad_{x_vp} = s * (sigma_vp^2 / alpha) * grad_{x_vp},

the DESIGN's (sigma_t^2 / alpha_t) * s * grad, which is also Dhariwal & Nichol's eps_hat - s * sigma_vp * grad_{x_vp}
seen through x0_hat = (x_vp - sigma_vp * eps_hat) / alpha.

`grad_log_p(x, sigma)` always takes sigma-space x and returns grad_x log p(y | x) in sigma space; a classifier that
reads another input scaling (VP x_vp, flow x_t, model time) does so through `to_model_input`, and autograd applies
the chain rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.kernels import group_norm
from ldmkit.nn import per_example, timestep_embedding, zero_module

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GradLogP = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ModelInput = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

LOG_SIGMA_SCALE = 250.0  # noise level fed to the classifier = 250 ln(sigma) = 1000 * EDM's c_noise (ln(sigma) / 4)


def _sigma_vector(sigma, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma has shape {tuple(sigma.shape)}; expected a scalar or ({x.shape[0]},)")
    return sigma


# ----------------------------------------------------------------------------------------------------------------
# Guidance

def classifier_guidance(denoise: Denoiser, grad_log_p: GradLogP, scale: float) -> Denoiser:
    """Wrap `denoise(x, sigma) -> x0_hat` so x0_hat moves by scale * sigma^2 * grad_log_p(x, sigma) (Tweedie).

    Works inside samplers running under torch.no_grad(): the gradient is computed under torch.enable_grad() and
    detached. Composes with CFG: `classifier_guidance(cfg(denoise, cond, uncond, w), grad_log_p, s)`.

    Rows at sigma = inf (the pure-noise first step of flow / VE samplers, where x holds the noise itself) are left
    unguided: there x carries no information about y, so grad log p(y | x) is 0 while sigma^2 is infinite, and
    the product has no finite value to compute. Guidance starts at the first finite noise level.
    """
    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = _sigma_vector(sigma, x)
        x0_hat = denoise(x, sigma)
        finite = torch.isfinite(sigma)
        if scale == 0 or not bool(finite.any()):
            return x0_hat
        idx = finite.nonzero().squeeze(1)
        xs, ss = x.detach()[idx], sigma.detach()[idx]
        with torch.enable_grad():
            grad = grad_log_p(xs, ss)
        if grad.shape != xs.shape:
            raise ValueError(f"grad_log_p returned shape {tuple(grad.shape)} for x of shape {tuple(xs.shape)}")
        shift = scale * per_example(ss, xs) ** 2 * grad.detach().to(x0_hat.dtype)  # Tweedie shift
        return x0_hat.index_add(0, idx, shift)

    return guided


def log_sigma_input(x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Default classifier input: VP-scaled x / sqrt(1 + sigma^2) (unit variance for unit-variance latents) and
    noise level 250 ln(sigma). Replace it with the objective's own (input, model time) map to share the denoiser's."""
    x_in = x / per_example(torch.sqrt(1 + sigma**2), x)  # (B, C, H, W)
    level = LOG_SIGMA_SCALE * torch.log(sigma.clamp_min(1e-20))  # (B,), sigma = 0 is a clean input
    return x_in, level


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Sigma-space noising x = x0 + sigma * eps (the default; pass the objective's own to share its schedule)."""
    return x0 + per_example(sigma, x0) * noise


def classifier_grad_fn(classifier: nn.Module, labels: torch.Tensor,
                       to_model_input: ModelInput = log_sigma_input) -> GradLogP:
    """grad_log_p(x, sigma) = d log_softmax(classifier(to_model_input(x, sigma)))[labels] / dx, sigma-space x.

    Put the classifier in eval mode first. Only x receives a gradient (the classifier's .grad stays untouched).
    """
    def grad_log_p(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if labels.shape != (x.shape[0],):
            raise ValueError(f"labels have shape {tuple(labels.shape)}; expected ({x.shape[0]},) class indices")
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            logits = classifier(*to_model_input(x, _sigma_vector(sigma, x)))  # (B, K)
            log_p = F.log_softmax(logits.float(), dim=-1).gather(1, labels[:, None].long())  # (B, 1) log p(y|x)
            (grad,) = torch.autograd.grad(log_p.sum(), x)  # examples are independent, so sum gives per-row grads
        return grad.detach()

    return grad_log_p


def classifier_loss(classifier: nn.Module, x0: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor,
                    sigma: torch.Tensor, *, noise_fn: Callable = add_noise,
                    to_model_input: ModelInput = log_sigma_input) -> torch.Tensor:
    """Per-example cross-entropy of the noise-aware classifier on noised latents: (B,).

    x = noise_fn(x0, noise, sigma) must be in sigma space and `to_model_input` must be the map the guidance will
    use, so training and sampling see the same inputs. The caller draws sigma from the denoiser's time
    distribution (same schedule), so the classifier is accurate where guidance is applied.
    """
    x = noise_fn(x0, noise, sigma)
    logits = classifier(*to_model_input(x, sigma))  # (B, K)
    return F.cross_entropy(logits.float(), labels, reduction="none")  # (B,)


# ----------------------------------------------------------------------------------------------------------------
# Noise-aware latent classifier

@dataclass(frozen=True)
class ClassifierConfig:
    in_channels: int = 4  # latent channels
    num_classes: int = 10  # K
    channels: tuple[int, ...] = (32, 64)  # width per resolution level; each level after the first halves H, W
    blocks_per_level: int = 1  # residual blocks per level
    freq_dim: int = 64  # sinusoidal features of the noise level
    emb_dim: int = 128  # width of the noise-level embedding
    dropout: float = 0.0  # dropout inside residual blocks
    groups: int = 32  # max GroupNorm groups (reduced to divide the width)

    def __post_init__(self):
        if self.num_classes < 2:
            raise ValueError(f"ClassifierConfig.num_classes={self.num_classes} must be >= 2")
        if not self.channels or self.blocks_per_level < 1:
            raise ValueError(f"ClassifierConfig needs channels (got {self.channels}) and blocks_per_level >= 1")


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with the noise embedding added in between; 1x1 skip when the width changes."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, cfg: ClassifierConfig):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in, cfg.groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = group_norm(c_out, cfg.groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.drop = nn.Dropout(cfg.dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = h + self.emb(F.silu(emb))[:, :, None, None]  # add the noise-level embedding
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class NoisyLatentClassifier(nn.Module):
    """Small conv net over noised latents (C x H x W, e.g. 4 x 8 x 8) conditioned on the noise level.

    forward(x, noise_level) -> logits (B, K); noise_level is a (B,) float (250 ln sigma by default, or the
    denoiser's model time), embedded sinusoidally and added in every residual block. Global average pooling
    makes it resolution-agnostic.
    """

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = cfg = config
        self.time = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.emb_dim), nn.SiLU(), nn.Linear(cfg.emb_dim, cfg.emb_dim))
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.channels[0], 3, padding=1)
        self.blocks, self.downs = nn.ModuleList(), nn.ModuleList()
        c = cfg.channels[0]
        for level, width in enumerate(cfg.channels):
            if level > 0:
                self.downs.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
            self.blocks.append(nn.ModuleList(
                ResBlock(c if i == 0 else width, width, cfg.emb_dim, cfg) for i in range(cfg.blocks_per_level)))
            c = width
        self.norm_out = nn.LayerNorm(c)  # on pooled features: a GroupNorm here would erase global intensity
        self.head = nn.Linear(c, cfg.num_classes)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """All special init: residual branches start as the identity, the head at uniform logits."""
        for level in self.blocks:
            for block in level:
                zero_module(block.conv2)
        zero_module(self.head)

    def forward(self, x: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"classifier input has shape {tuple(x.shape)}; "
                             f"expected (B, {self.config.in_channels}, H, W)")
        freqs = timestep_embedding(noise_level.reshape(-1).expand(x.shape[0]), self.config.freq_dim)  # (B, F)
        emb = self.time(freqs.to(x.dtype))  # (B, E)
        h = self.conv_in(x)  # (B, C0, H, W)
        for level, blocks in enumerate(self.blocks):
            if level > 0:
                h = self.downs[level - 1](h)  # halve H, W
            for block in blocks:
                h = block(h, emb)
        h = h.mean(dim=(2, 3))  # (B, C) global average pool of the residual stream
        return self.head(F.silu(self.norm_out(h)))  # (B, K)


PRESETS = {
    "tiny": ClassifierConfig(channels=(16, 32), freq_dim=32, emb_dim=64),
    "fashion-mnist": ClassifierConfig(channels=(64, 128, 128), blocks_per_level=2, freq_dim=128, emb_dim=256,
                                      dropout=0.1),
}

__all__ = ["classifier_guidance", "classifier_grad_fn", "classifier_loss", "log_sigma_input", "add_noise",
           "ClassifierConfig", "NoisyLatentClassifier", "PRESETS", "LOG_SIGMA_SCALE"]
