"""ldmkit: latent diffusion end to end, from a 2-core laptop to many GPUs."""

__version__ = "0.1.0"
