"""Tiled decoding and encoding: images larger than the autoencoder was trained on, in overlapping tiles.

The latent (or image) is cut into tiles of `tile` cells that overlap by `overlap` cells; each tile is decoded
(encoded) alone, and the overlaps are blended with linear ramps, so memory stays that of one tile and no seam
shows. The mid-block attention then sees one tile at a time, which is what the autoencoder saw in training.

    img = tiled_decode(ae, z, tile=16, overlap=4)      # z (B, c, h, w) with h, w > 16
    ae.enable_tiling(tile=16, overlap=4)               # or: every ae.decode / ae.encode goes through tiles
"""

from __future__ import annotations

import torch


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins covering 0..size with tiles of `tile` overlapping by at least `overlap` (last one flush)."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(starts))


def _ramp(n: int, lo_overlap: int, hi_overlap: int, device, dtype) -> torch.Tensor:
    """1-D blending weights of one tile: rising over its first `lo_overlap` cells, falling over its last ones."""
    w = torch.ones(n, device=device, dtype=dtype)
    if lo_overlap:
        w[:lo_overlap] = torch.arange(1, lo_overlap + 1, device=device, dtype=dtype) / (lo_overlap + 1)
    if hi_overlap:
        w[n - hi_overlap:] = torch.minimum(w[n - hi_overlap:], torch.arange(hi_overlap, 0, -1, device=device,
                                                                           dtype=dtype) / (hi_overlap + 1))
    return w


def tiled_apply(fn, x: torch.Tensor, tile: int, overlap: int, scale: float, out_channels: int) -> torch.Tensor:
    """fn over overlapping tiles of x (B, C, H, W) whose outputs are `scale` times larger; blended."""
    if not 0 <= overlap < tile:
        raise ValueError(f"tiling needs 0 <= overlap < tile, got overlap={overlap}, tile={tile}")
    B, _, H, W = x.shape
    ys, xs = _starts(H, tile, overlap), _starts(W, tile, overlap)
    out = acc = None
    for i, y0 in enumerate(ys):
        for j, x0 in enumerate(xs):
            part = fn(x[:, :, y0:y0 + tile, x0:x0 + tile])
            if out is None:
                out = part.new_zeros((B, out_channels, round(H * scale), round(W * scale)))
                acc = part.new_zeros((1, 1, out.shape[2], out.shape[3]))
            h, w = part.shape[2:]
            # overlap with the previous / next tile in cells of the output
            lo_y = round((ys[i - 1] + tile - y0) * scale) if i else 0
            hi_y = round((y0 + tile - ys[i + 1]) * scale) if i + 1 < len(ys) else 0
            lo_x = round((xs[j - 1] + tile - x0) * scale) if j else 0
            hi_x = round((x0 + tile - xs[j + 1]) * scale) if j + 1 < len(xs) else 0
            wgt = _ramp(h, lo_y, hi_y, part.device, part.dtype)[:, None] * \
                _ramp(w, lo_x, hi_x, part.device, part.dtype)[None, :]
            Y, X = round(y0 * scale), round(x0 * scale)
            out[:, :, Y:Y + h, X:X + w] += part * wgt
            acc[:, :, Y:Y + h, X:X + w] += wgt
    return out / acc


def tiled_decode(ae, z: torch.Tensor, tile: int = 16, overlap: int = 4) -> torch.Tensor:
    """Decode latents (B, c, h, w) in tiles of `tile` x `tile` latent cells overlapping by `overlap`."""
    f = ae.cfg.downsample_factor
    return tiled_apply(ae.decode_untiled, z, tile, overlap, f, ae.cfg.out_channels)


def tiled_encode_moments(ae, x: torch.Tensor, tile: int = 64, overlap: int = 16) -> torch.Tensor:
    """The posterior moments (B, 2c, H/f, W/f) of images in pixel tiles of `tile` overlapping by `overlap`."""
    f = ae.cfg.downsample_factor
    if tile % f or overlap % f:
        raise ValueError(f"encoder tiles and overlaps must be multiples of the downsampling factor {f}")
    return tiled_apply(ae.encode_moments, x, tile, overlap, 1 / f, ae.cfg.moment_channels)
