"""The diagonal Gaussian posterior q(z | x) = N(mean, diag(exp(logvar))) of the KL autoencoder.

The encoder predicts `2 * latent_channels` moments: the first half is the mean, the second the log-variance
(Kingma & Welling 2014, "Auto-Encoding Variational Bayes"; Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models", appendix G). All statistics are computed in float32 whatever the autocast dtype.
"""

from __future__ import annotations

import math

import torch

from ldmkit.nn import sum_flat


class DiagonalGaussian:
    """Posterior over latents (B, C, h, w) built from encoder moments (B, 2C, h, w)."""

    def __init__(self, moments: torch.Tensor, logvar_clamp: tuple[float, float] = (-30.0, 20.0)):
        if moments.ndim != 4 or moments.shape[1] % 2:
            raise ValueError(f"moments must be (B, 2C, h, w) with an even channel count, got {tuple(moments.shape)}")
        mean, logvar = moments.float().chunk(2, dim=1)  # (B, C, h, w) each
        self.mean = mean
        self.logvar = logvar.clamp(*logvar_clamp)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Reparameterised sample z = mean + std * eps: eps is `noise` if given, else N(0, I) drawn from
        `generator`."""
        if noise is not None:
            if noise.shape != self.mean.shape:
                raise ValueError(f"noise has shape {tuple(noise.shape)}, the posterior {tuple(self.mean.shape)}")
            eps = noise.to(self.mean.device, self.mean.dtype)
        else:
            eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        """The most likely latent, the mean."""
        return self.mean

    def kl_per_channel(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over space, per example and latent channel: (B, C)."""
        kl = 0.5 * (self.mean.square() + self.var - 1.0 - self.logvar)  # closed form, Kingma & Welling eq. 10
        return kl.sum(dim=(2, 3))

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over latent elements, per example: (B,)."""
        return self.kl_per_channel().sum(1)

    def nll(self, z: torch.Tensor) -> torch.Tensor:
        """-log q(z | x) summed over latent elements, per example: (B,)."""
        sq = (z.float() - self.mean).square() / self.var
        return 0.5 * sum_flat(math.log(2.0 * math.pi) + self.logvar + sq)


class PointPosterior:
    """The "posterior" of a plain (deterministic) autoencoder: all mass on the encoder's output. Sampling returns
    it, its variance is 0 (log-variance -inf, so cached moments draw exactly the mean) and there is no KL term: the
    latent space is whatever reconstruction alone makes of it, the lecture's unstructured bottleneck."""

    def __init__(self, mean: torch.Tensor):
        if mean.ndim != 4:
            raise ValueError(f"latents must be (B, c, h, w), got {tuple(mean.shape)}")
        self.mean = mean.float()
        self.logvar = torch.full_like(self.mean, float("-inf"))
        self.std = torch.zeros_like(self.mean)
        self.var = torch.zeros_like(self.mean)

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        return self.mean

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl_per_channel(self) -> torch.Tensor:
        """No prior is imposed: zeros (B, c)."""
        return self.mean.new_zeros(self.mean.shape[:2])

    def kl(self) -> torch.Tensor:
        return self.mean.new_zeros(self.mean.shape[0])
