"""How much of the class a CLIP image tower's outputs carry: a linear probe on each representation.

    .venv/bin/python benchmarks/bench_clip_class_info.py CLIP_STAGE_DIR [--out benchmarks/results/clip_class_info.json]

Fashion-MNIST: the image tower's outputs for all 60,000 training images (the unit embedding, the pooled vector
before the projection, every last-layer token concatenated) standardised, a linear classifier fitted on each with
Adam (15 epochs, batch 256, weight decay 1e-4, seed 0), read on the 10,000 test images. The figure bounds what a
denoiser prompted by that representation can know of the prompt's class (`bench_image_prompt.py`).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from ldmkit.checkpoint import provenance, write_json
from ldmkit.data import load_dataset
from ldmkit.images import to_float
from ldmkit.stages import load_clip, weights_hash


@torch.no_grad()
def representations(clip, images: torch.Tensor, batch: int = 1000) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {"embedding": [], "pooled": [], "tokens": []}
    for i in range(0, len(images), batch):
        pooled, tokens = clip.vision(to_float(images[i:i + batch]))
        out["embedding"].append(F.normalize(clip.image_proj(pooled), dim=-1))
        out["pooled"].append(pooled)
        out["tokens"].append(tokens.flatten(1))
    return {k: torch.cat(v) for k, v in out.items()}


def linear_probe(xtr, ytr, xte, yte, epochs: int = 15) -> float:
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    torch.manual_seed(0)
    lin = torch.nn.Linear(xtr.shape[1], int(ytr.max()) + 1)
    opt = torch.optim.Adam(lin.parameters(), 1e-3, weight_decay=1e-4)
    for _ in range(epochs):
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 256):
            j = perm[i:i + 256]
            loss = F.cross_entropy(lin(xtr[j]), ytr[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float((lin(xte).argmax(1) == yte).float().mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("clip")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="benchmarks/results/clip_class_info.json")
    args = p.parse_args(argv)
    clip = load_clip(args.clip)
    tr = load_dataset("fashion-mnist", split="train", data_dir=args.data_dir)
    te = load_dataset("fashion-mnist", split="test", data_dir=args.data_dir)
    t0 = time.perf_counter()
    ftr, fte = representations(clip, tr.images), representations(clip, te.images)
    result = {"clip_sha256": weights_hash(args.clip), "train_images": len(tr), "test_images": len(te), "probes": {}}
    for name in ftr:
        acc = linear_probe(ftr[name], tr.labels["class"], fte[name], te.labels["class"])
        result["probes"][name] = {"width": ftr[name].shape[1], "test_accuracy": round(acc, 4)}
        print(f"{name} ({ftr[name].shape[1]} features): linear probe {acc:.2%}", file=sys.stderr)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["provenance"] = provenance()
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
