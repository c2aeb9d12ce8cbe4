"""Seeding: every random draw in ldmkit comes from a generator seeded by (run seed, example index, stream).

An example's noise, caption draws and augmentations depend only on the run's seed, the example's global index and
what the draw is for (its stream), never on the batch it lands in, the batch size or the number of processes. So
an image does not change with `--num` or `--batch-size`, a resumed run draws what an uninterrupted one would, and
`torchrun` with N processes trains the single-process model. Streams in use: 0 sampling noise and training noise,
1-3 the denoiser's and classifier's training draws, 5 the autoencoder's posterior samples, and the CLIP stage's
caption and twin streams (its module names them).
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One round of the splitmix64 finaliser (Steele et al. 2014): a cheap, well-mixed 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def example_seed(seed: int, index: int, stream: int = 0) -> int:
    """64-bit seed for example `index` of run `seed`; `stream` separates uses (0 sampling, 1 training noise)."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ stream) ^ (index & _MASK64))


def example_generators(seed: int, indices: Sequence[int] | torch.Tensor, stream: int = 0) -> list[torch.Generator]:
    """One CPU generator per global example index, seeded by hash(seed, stream, index)."""
    idx = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
    return [torch.Generator().manual_seed(example_seed(seed, int(i), stream)) for i in idx]


def randn(shape: Sequence[int], generator: Generators = None, device=None,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal (B, ...) from None / one generator / a list of B per-example generators (drawn on CPU)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} per-example generators for a batch of {shape[0]}")
        z = torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=dtype) for g in generator])
    else:
        z = torch.randn(tuple(shape), generator=generator, dtype=dtype)
    return z.to(device)


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's global generators (model initialisation; every data draw has its own)."""
    random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- data order
_perm_cache: dict[tuple[int, int, int], torch.Tensor] = {}


def _epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    key = (n, seed, epoch)
    if key not in _perm_cache:
        if len(_perm_cache) > 4:
            _perm_cache.clear()
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        _perm_cache[key] = torch.randperm(n, generator=g)
    return _perm_cache[key]


def batch_indices(n: int, batch_size: int, step: int, seed: int, rank: int = 0,
                  world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(dataset indices, global sample indices) of this rank's share of global batch `step`.

    The global order is a fresh seeded permutation per epoch, a pure function of (seed, step), so a resumed
    or multi-process run sees exactly the examples an uninterrupted single-process run sees.
    """
    if batch_size % world:
        raise ValueError(f"train.batch_size={batch_size} must be divisible by the {world} processes")
    per = batch_size // world
    g = torch.arange(step * batch_size + rank * per, step * batch_size + (rank + 1) * per)  # global sample ids
    epochs, pos = g // n, g % n
    idx = torch.empty_like(g)
    for e in epochs.unique().tolist():
        sel = epochs == e
        idx[sel] = _epoch_perm(n, seed, e)[pos[sel]]
    return idx, g


def rng_state() -> dict:
    """The global generators' state as a resume checkpoint keeps it (tuples as lists, so it stays plain data)."""
    return {"torch": torch.get_rng_state(), "python": _to_list(random.getstate())}


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` saved: a resumed run draws what the uninterrupted one would have."""
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))


def _to_list(x):
    return [_to_list(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (tuple, list)) else x
