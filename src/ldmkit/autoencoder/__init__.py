"""KL autoencoder: model, posterior, perceptual metric, discriminator, losses, latent cache."""

from ldmkit.autoencoder.posterior import DiagonalGaussian
from ldmkit.autoencoder.vae import PRESETS, AutoencoderConfig, AutoencoderKL

__all__ = ["AutoencoderConfig", "AutoencoderKL", "DiagonalGaussian", "PRESETS"]
