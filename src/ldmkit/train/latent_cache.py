"""The latent cache: a dataset encoded once by an autoencoder, reused by every later stage.

The cache (one safetensors file, `ldmkit.autoencoder.latents` format) stores each image's posterior mean and
log-variance (not one sample), so later stages can draw a fresh latent per step, seeded by the global sample index,
exactly as if they encoded on the fly. It lives in the
autoencoder's directory (`latents/`) and records the autoencoder's weight hash: a cache from other weights is never
used. When the autoencoder directory is read-only the cache goes to `fallback_dir`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ldmkit.autoencoder.latents import encode_dataset, load_latent_cache, save_latent_cache
from ldmkit.seeding import example_generators


def _cache_name(spec: str, split: str, n: int) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{spec}-{split}-{n}") + ".safetensors"


def posterior_cache(ae_dir: str | Path, autoencoder, ae_hash: str, dataset, spec: str, split: str,
                    fallback_dir: str | Path | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """{"mean", "logvar"} (N, c, h, w) of (`spec`, `split`) for these autoencoder weights: loaded from the cache
    when one made by the same weights exists, else encoded (`encode_dataset`, moments) and saved."""
    name = _cache_name(spec, split, len(dataset))
    candidates = [Path(ae_dir) / "latents" / name] + ([Path(fallback_dir) / "latents" / name] if fallback_dir else [])
    for path in candidates:
        if path.exists():
            try:
                moments, _ = load_latent_cache(path, autoencoder_hash=ae_hash)
            except ValueError:  # made by other weights (or an older format): encode again and overwrite
                continue
            return split_moments(moments)
    moments = encode_dataset(autoencoder, dataset.images, mode="moments", progress=progress)
    meta = {"autoencoder_hash": ae_hash, "data": spec, "split": split, "n": len(dataset), "mode": "moments"}
    for path in candidates:
        try:
            save_latent_cache(path, moments, meta)
            break
        except OSError:
            continue
    return split_moments(moments)


def split_moments(moments: torch.Tensor) -> dict[str, torch.Tensor]:
    mean, logvar = moments.chunk(2, dim=1)
    return {"mean": mean, "logvar": logvar}


def draw_latents(cache: dict[str, torch.Tensor], idx: torch.Tensor, gidx: torch.Tensor, seed: int,
                 scale: float, shift: float, sample: bool = True) -> torch.Tensor:
    """Scaled latents (B, c, h, w) for dataset rows `idx`; the posterior draw of sample g is seeded by (seed, g)."""
    mean = cache["mean"][idx]
    if sample:
        std = torch.exp(0.5 * cache["logvar"][idx])
        gens = example_generators(seed, gidx, stream=3)
        eps = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in gens])
        mean = mean + std * eps  # z ~ N(mu, sigma^2), reparameterised
    return (mean - shift) * scale
