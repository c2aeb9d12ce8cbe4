"""KL autoencoder: model, posterior, perceptual distance, discriminator, losses, latent cache."""

from ldmkit.autoencoder.discriminator import DiscriminatorConfig, NLayerDiscriminator
from ldmkit.autoencoder.featnet import FeatNet, FeatNetConfig, load_featnet, save_featnet, train_featnet
from ldmkit.autoencoder.latents import (
    encode_dataset,
    estimate_scale_factor,
    interpolate,
    load_latent_cache,
    sample_prior,
    save_latent_cache,
)
from ldmkit.autoencoder.loss import (
                                     LossConfig,
                                     adaptive_gan_weight,
                                     build_discriminator,
                                     build_perceptual,
                                     disc_factor,
                                     discriminator_loss,
                                     generator_loss,
                                     init_output_logvar,
)
from ldmkit.autoencoder.lpips import LPIPS, VGG16Features, load_lpips_heads, load_vgg16, lpips_vgg16
from ldmkit.autoencoder.posterior import DiagonalGaussian, PointPosterior
from ldmkit.autoencoder.vae import PRESETS, AutoencoderConfig, AutoencoderKL, PixelSpace, make_autoencoder

__all__ = [
    "AutoencoderConfig", "AutoencoderKL", "PixelSpace", "make_autoencoder", "DiagonalGaussian", "PointPosterior",
    "PRESETS",
    "sample_prior", "interpolate",
    "LossConfig", "generator_loss", "discriminator_loss", "adaptive_gan_weight", "disc_factor",
    "init_output_logvar", "build_discriminator", "build_perceptual",
    "DiscriminatorConfig", "NLayerDiscriminator",
    "LPIPS", "VGG16Features", "load_vgg16", "load_lpips_heads", "lpips_vgg16",
    "FeatNet", "FeatNetConfig", "train_featnet", "save_featnet", "load_featnet",
    "encode_dataset", "estimate_scale_factor", "save_latent_cache", "load_latent_cache",
]
