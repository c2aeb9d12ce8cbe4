"""The latent cache: a dataset encoded once by an autoencoder, reused by every later stage.

The cache stores each image's posterior mean and log-variance (not one sample), so later stages can draw a fresh
latent per step, seeded by the global sample index, exactly as if they encoded on the fly. It lives in the
autoencoder's directory (`latents/`) and records the autoencoder's weight hash: a cache from other weights is never
used. When the autoencoder directory is read-only the cache goes to `fallback_dir`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ldmkit.checkpoint import load_safetensors, save_safetensors
from ldmkit.diffusion.samplers import example_generators


def _cache_name(spec: str, split: str, n: int) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{spec}-{split}-{n}") + ".safetensors"


@torch.no_grad()
def encode_posteriors(autoencoder, dataset, batch_size: int = 256, progress: bool = True) -> dict[str, torch.Tensor]:
    """{"mean", "logvar"} (N, c, h, w) float32 for every image of `dataset` (uint8 images, [-1, 1] inputs)."""
    from tqdm.auto import tqdm
    autoencoder.eval()
    means, logvars = [], []
    for i in tqdm(range(0, len(dataset), batch_size), desc="encoding latents", disable=not progress):
        post = autoencoder.encode(dataset.to_float(dataset.images[i:i + batch_size]))
        means.append(post.mean.float())
        logvars.append(post.logvar.float())
    return {"mean": torch.cat(means), "logvar": torch.cat(logvars)}


def posterior_cache(ae_dir: str | Path, autoencoder, ae_hash: str, dataset, spec: str, split: str,
                    fallback_dir: str | Path | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """Load the cached posteriors of (`spec`, `split`) for these autoencoder weights, or encode and save them."""
    name = _cache_name(spec, split, len(dataset))
    candidates = [Path(ae_dir) / "latents" / name] + ([Path(fallback_dir) / "latents" / name] if fallback_dir else [])
    for path in candidates:
        if path.exists():
            from safetensors import safe_open
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            if meta.get("autoencoder_sha256") == ae_hash:
                return load_safetensors(path)
    cache = encode_posteriors(autoencoder, dataset, progress=progress)
    meta = {"autoencoder_sha256": ae_hash, "data": spec, "split": split, "n": str(len(dataset))}
    for path in candidates:
        try:
            save_safetensors(cache, path, meta)
            break
        except OSError:
            continue
    return cache


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


def is_writable(path: str | Path) -> bool:
    return os.access(path, os.W_OK)
