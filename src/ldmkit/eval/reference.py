"""`ldmkit eval SAMPLES.npz --reference DATA --pipeline DIR`: distribution metrics for any dataset.

Features are the pipeline's own CLIP image tower (always there, trained on the same kind of images), so the
metrics work on a folder of one's own images as on the built-in datasets. Reported: Frechet distance (FD), kernel
distance (KID, Binkowski et al. 2018), k-NN precision / recall (k = 3), and a CLIP score (100 x the mean cosine
between each sample and its prompt), each beside its floor: the same metric for the same number of real training
images against the reference (test) split. FD is biased upward at small sample counts (compare it only at equal
counts, with its floor); KID is unbiased.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ldmkit.data import load_split
from ldmkit.eval.clip_cli import image_features, text_features
from ldmkit.eval.metrics import frechet_distance, kernel_distance, precision_recall
from ldmkit.stages import load_clip, weights_hash


def to_model_resolution(images: np.ndarray, ds) -> torch.Tensor:
    """uint8 samples (N, h, w, C) at the dataset's native size (or its model resolution) -> (N, C, H, W) as the
    dataset stores its images (Fashion-MNIST's 28x28 placed back in its 32x32 canvas)."""
    (top, left, h, w), (H, W) = ds.crop_box, ds.image_size
    if images.shape[3] != ds.channels or images.shape[1:3] not in ((h, w), (H, W)):
        raise ValueError(f"samples are {images.shape[1]}x{images.shape[2]}x{images.shape[3]}, the reference "
                         f"{ds.name} is {h}x{w}x{ds.channels}: sample with the pipeline trained on it")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if images.shape[1:3] == (H, W):
        return x
    canvas = torch.zeros((len(x), ds.channels, H, W), dtype=torch.uint8)
    canvas[:, :, top:top + h, left:left + w] = x
    return canvas


def score_against_reference(images: np.ndarray, prompts: list[str] | None, reference: str, pipeline: str | Path,
                            seed: int = 0, options: dict | None = None, data_dir: str | None = None) -> dict:
    clip_dir = Path(pipeline) / "clip" if (Path(pipeline) / "clip").is_dir() else Path(pipeline)
    model = load_clip(clip_dir).eval()
    test = load_split(reference, "test", options, data_dir)
    train = load_split(reference, "train", options, data_dir)
    fake = image_features(model, to_model_resolution(images, test)).double()
    real = image_features(model, test.images).double()
    n = min(len(images), len(train))
    pick = torch.from_numpy(np.random.default_rng(seed).choice(len(train), n, replace=False))
    floor = image_features(model, train.images[pick]).double()
    k = 3 if min(len(fake), len(real)) > 3 else 1
    out = {"reference": reference, "split": "test", "features": "clip image tower",
           "clip_sha256": weights_hash(clip_dir), "n_samples": len(fake), "n_reference": len(real),
           "n_floor": n, "fd": frechet_distance(real, fake), "fd_floor": frechet_distance(real, floor)}
    out["kid"], out["kid_std"] = kernel_distance(real, fake, seed=seed)
    out["kid_floor"], _ = kernel_distance(real, floor, seed=seed)
    out["precision"], out["recall"] = precision_recall(real, fake, k=k)
    out["precision_floor"], out["recall_floor"] = precision_recall(real, floor, k=k)
    if prompts is not None and any(prompts):
        with torch.no_grad():
            txt = text_features(model, list(prompts)).double()
        out["clip_score"] = float(100 * (fake * txt).sum(1).clamp_min(0).mean())
        real_txt = text_features(model, [train.caption(int(i)) for i in pick]).double()
        out["clip_score_floor"] = float(100 * (floor * real_txt).sum(1).clamp_min(0).mean())
    out["note"] = ("floors: the same number of real training images against the reference split; FD is biased "
                   "upward at small counts, KID is not")
    return out
