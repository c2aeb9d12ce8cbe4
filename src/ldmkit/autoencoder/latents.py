"""Latents of a trained autoencoder: encode a dataset once, estimate the scale factor, cache them on disk.

The diffusion model is trained on `scale_factor * (z - shift)` so its inputs have about unit variance (Rombach et
al. 2022, sec. 4.3.2 and appendix G: the "rescaling by the component-wise standard deviation"; SD's 0.18215). The
cache records a hash of the autoencoder weights it came from, so a cache made by another autoencoder is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from ldmkit.checkpoint import load_safetensors, save_safetensors
from ldmkit.images import as_float_images

META_KEY = "ldmkit_latent_cache"
MODES = ("mode", "sample", "moments")


def estimate_scale_factor(latents: torch.Tensor) -> float:
    """1 / std over all latent elements (computed in float64)."""
    std = latents.double().std().item()
    if not std > 0 or std != std or std == float("inf"):
        raise ValueError(f"latent std is {std}; cannot estimate a scale factor (are the latents all equal or NaN?)")
    return 1.0 / std


def sample_prior(n: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """n latents from the prior N(0, I) (in the scaled latent space the diffusion model sees), latent i seeded by
    (seed, i). Decoded, they show what the KL term alone gives: a VAE's prior is where its latents live, but not
    every point there is an image; the denoiser is what finds the images."""
    from ldmkit.seeding import example_generators, randn  # local: seeding imports nothing from here
    return randn((n, *shape), example_generators(seed, range(n)))


def interpolate(za: torch.Tensor, zb: torch.Tensor, steps: int = 8, mode: str = "linear") -> torch.Tensor:
    """`steps` latents from za to zb (both (c, h, w) or (1, c, h, w)), ends included: "linear" mixes them,
    "slerp" follows the great circle (for N(0, I) latents a linear mix has too small a norm in between)."""
    if steps < 2:
        raise ValueError(f"interpolate needs steps >= 2 (the two ends), got {steps}")
    if mode not in ("linear", "slerp"):
        raise ValueError(f"interpolate mode={mode!r}; use 'linear' or 'slerp'")
    a, b = za.reshape(-1).double(), zb.reshape(-1).double()
    if a.shape != b.shape:
        raise ValueError(f"latents of different shapes: {tuple(za.shape)} and {tuple(zb.shape)}")
    t = torch.linspace(0, 1, steps, dtype=torch.float64)[:, None]
    if mode == "linear":
        out = (1 - t) * a + t * b
    else:
        cos = torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-12)
        omega = torch.arccos(cos.clamp(-1, 1))
        if float(omega) < 1e-6:  # parallel: slerp is the linear mix
            out = (1 - t) * a + t * b
        else:
            out = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
    shape = za.shape[-3:]
    return out.reshape(steps, *shape).to(za.dtype)


def _batches(images: torch.Tensor | Iterable[torch.Tensor], batch_size: int):
    """(iterator over image batches, number of batches or None)."""
    if isinstance(images, torch.Tensor):
        n = images.shape[0]
        return (images[i:i + batch_size] for i in range(0, n, batch_size)), -(-n // batch_size)
    return iter(images), (len(images) if hasattr(images, "__len__") else None)


@torch.no_grad()
def encode_dataset(model: nn.Module, images: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 256,
                   mode: str = "mode", generator: torch.Generator | None = None,
                   progress: bool = True) -> torch.Tensor:
    """Encode images (a (N, C, H, W) tensor, or an iterable of such batches; uint8 or float in [-1, 1]) to CPU
    float32 latents: the posterior mean ("mode"), a sample ("sample", from `generator`), or mean and log-variance
    stacked on channels ("moments", (N, 2c, h, w)) for sampling fresh latents every epoch."""
    if mode not in MODES:
        raise ValueError(f"encode_dataset mode={mode!r}; use one of {MODES}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    batches, total = _batches(images, batch_size)
    for xb in tqdm(batches, total=total, desc=f"encode ({mode})", disable=not progress, leave=False):
        post = model.encode(as_float_images(xb).to(device))
        if mode == "mode":
            z = post.mode()
        elif mode == "sample":
            z = post.sample(generator)
        else:
            z = torch.cat([post.mean, post.logvar], dim=1)
        out.append(z.float().cpu())
    model.train(was_training)
    if not out:
        raise ValueError("encode_dataset got no images")
    return torch.cat(out)


def save_latent_cache(path: str | Path, latents: torch.Tensor, meta: dict) -> None:
    """Write latents with JSON metadata into one safetensors file (atomic). `meta` must carry
    "autoencoder_hash" (e.g. ldmkit.checkpoint.file_hash of the autoencoder's model.safetensors)."""
    if "autoencoder_hash" not in meta:
        raise ValueError("latent cache meta needs 'autoencoder_hash' so a stale cache can be detected")
    try:
        text = json.dumps(meta)
    except TypeError as e:
        raise ValueError(f"latent cache meta must be JSON-serialisable: {e}") from None
    save_safetensors({"latents": latents.float()}, path, metadata={META_KEY: text})


def load_latent_cache(path: str | Path, autoencoder_hash: str | None = None) -> tuple[torch.Tensor, dict]:
    """(latents, meta) from a cache file; raises if `autoencoder_hash` is given and differs from the recorded one."""
    path = Path(path)
    tensors = load_safetensors(path)  # raises a clear error if missing or unreadable
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(META_KEY)
    if raw is None or "latents" not in tensors:
        raise ValueError(f"{path} is not a latent cache written by save_latent_cache")
    meta = json.loads(raw)
    if autoencoder_hash is not None and meta.get("autoencoder_hash") != autoencoder_hash:
        raise ValueError(f"stale latent cache {path}: made by autoencoder {meta.get('autoencoder_hash')}, but the "
                         f"current one is {autoencoder_hash}; delete the file to re-encode the dataset")
    return tensors["latents"], meta
