"""`ldmkit eval implicit-classifier PIPELINE`: the classifier that classifier-free guidance follows, computed.

Bayes' rule gives p(c | x_t) = p(x_t | c) p(c) / p(x_t), so grad log p(c | x_t) = grad log p(x_t | c) - grad log
p(x_t). With Tweedie's formula D(x_t, sigma) = x_t + sigma^2 grad log p(x_t), CFG's direction D_c - D_u is
sigma^2 grad log p(c | x_t): the gradient of an *implicit* classifier, where classifier guidance uses an explicit,
noise-aware one. The implicit classifier's values come from the same conditional model. The denoising error
E_eps ||x_0 - D(x_0 + sigma eps, sigma, c)||^2 is, at one noise level, the diffusion ELBO's term for
-log p(x_0 | c) up to a weight and terms that do not depend on c (the "diffusion classifier" of Li et al. 2023);
with equal priors,

    log p(c | x_0) ~ -w(sigma) E_eps ||x_0 - D(x_0 + sigma eps, sigma, c)||^2 + const,   w = 1 / (2 sigma^2),

and the predicted class is the one whose prompt denoises the image best. Every class is scored on the *same*
noise draws (paired), which removes most of the Monte Carlo noise from the comparison.

The command scores test images (their autoencoder latents) at several noise levels with a few draws each, beside
the pipeline's noise-aware classifier on the same noised latents and CLIP's zero-shot accuracy on the clean images.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from ldmkit.diffusion.objectives import make_denoiser
from ldmkit.guidance.cfg import select_cond
from ldmkit.seeding import example_generators, randn

DEFAULT_SIGMAS = (0.25, 0.5, 1.0, 2.0)


@torch.no_grad()
def implicit_log_posterior(denoise, x0: torch.Tensor, sigma: float, class_cond: dict, noise: torch.Tensor,
                           micro: int = 256) -> torch.Tensor:
    """(N, K) estimates of log p(c_k | x0) + const at noise level `sigma`, averaged over the D draws of `noise`
    (D, N, *x0.shape[1:]): -mean_d ||x0 - denoise(x0 + sigma eps_d, sigma, c_k)||^2 / (2 sigma^2).
    `class_cond`: the conditions of the K class prompts (one row each)."""
    n, k = x0.shape[0], next(v for v in class_cond.values() if torch.is_tensor(v)).shape[0]
    err = torch.zeros(n, k, dtype=torch.float64)
    for eps in noise:
        x_t = x0 + sigma * eps
        # every (image, class) pair: rows image-major, classes inner
        xs = x_t.repeat_interleave(k, 0)
        ref = x0.repeat_interleave(k, 0)
        cls = torch.arange(k).repeat(n)
        for i in range(0, xs.shape[0], micro):
            sl = slice(i, i + micro)
            c = select_cond(class_cond, cls[sl])
            d = denoise(xs[sl], torch.full((xs[sl].shape[0],), float(sigma), dtype=x0.dtype), c)
            e = (d - ref[sl]).double().square().flatten(1).sum(1)
            err.view(-1)[sl] += e
    return -(err / noise.shape[0]) / (2 * sigma ** 2)


@torch.no_grad()
def noise_aware_logits(classifier, x0: torch.Tensor, sigma: float, noise: torch.Tensor,
                       micro: int = 256) -> torch.Tensor:
    """(N, K) log-probabilities of the explicit noise-aware classifier on the same noised latents, averaged over
    the draws."""
    from ldmkit.guidance.classifier import log_sigma_input
    total = 0
    for eps in noise:
        x_t = x0 + sigma * eps
        parts = []
        for i in range(0, x_t.shape[0], micro):
            xb = x_t[i:i + micro]
            parts.append(torch.log_softmax(classifier(*log_sigma_input(xb, torch.full((xb.shape[0],), sigma))).float(),
                                           -1))
        total = total + torch.cat(parts)
    return total / noise.shape[0]


def evaluate(pipe, ds, num: int = 500, sigmas=DEFAULT_SIGMAS, draws: int = 4, seed: int = 0,
             progress: bool = True) -> dict:
    """Accuracy of the implicit classifier (and of the noise-aware classifier, when the pipeline has one) at each
    noise level on the first `num` test images, and CLIP's zero-shot accuracy on the same clean images."""
    if "class" not in ds.labels:
        raise ValueError(f"{ds.name} has no class labels: the implicit classifier needs classes (Fashion-MNIST or "
                         "an image folder of class subfolders)")
    names = ds.label_names["class"]
    template = (pipe.spec.get("data_options") or {}).get("template", "a photo of a {}")
    prompts = [template.format(c) for c in names]
    num = min(num, len(ds))
    top, left, h, w = ds.crop_box
    images = ds.images[:num].permute(0, 2, 3, 1).numpy()[:, top:top + h, left:left + w]
    labels = ds.labels["class"][:num]
    x0 = pipe.encode_images(images)
    denoise = make_denoiser(pipe.backbone, pipe.objective)
    class_cond = {k: v for k, v in pipe.encode(prompts).items()}
    gens = example_generators(seed, list(range(num)))
    out = {"images": num, "classes": len(names), "draws": draws, "prompt_template": template, "levels": {}}
    for s in sigmas:
        noise = torch.stack([randn(tuple(x0.shape), gens) for _ in range(draws)])  # (D, N, ...)
        row = {}
        logp = implicit_log_posterior(denoise, x0, float(s), class_cond, noise)
        row["implicit_classifier"] = round(float((logp.argmax(1) == labels).double().mean()), 4)
        if pipe.classifier is not None:
            lp = noise_aware_logits(pipe.classifier, x0, float(s), noise)
            row["noise_aware_classifier"] = round(float((lp.argmax(1) == labels).double().mean()), 4)
        out["levels"][f"{s:g}"] = row
        if progress:
            print(f"sigma {s:g}: {json.dumps(row)}", file=sys.stderr, flush=True)
    out["clip_zero_shot"] = clip_zero_shot(pipe, ds, num, prompts, labels)
    return out


@torch.no_grad()
def clip_zero_shot(pipe, ds, num: int, prompts: list[str], labels: torch.Tensor) -> float:
    """CLIP's zero-shot accuracy on the clean images with the same class prompts."""
    from ldmkit.images import to_float
    from ldmkit.stages import load_clip
    clip = load_clip(pipe.root / pipe.spec["stages"]["clip"]["path"])
    text = torch.nn.functional.normalize(clip.encode_prompts(prompts).float(), dim=-1)
    feats = torch.cat([torch.nn.functional.normalize(clip.encode_image(to_float(ds.images[i:i + 500])).float(), dim=-1)
                       for i in range(0, num, 500)])[:num]
    return round(float(((feats @ text.T).argmax(1) == labels).double().mean()), 4)


def main(argv: list[str] | None = None) -> int:
    from ldmkit.data import load_split
    from ldmkit.pipeline import Pipeline
    from ldmkit.stages import find_pipeline
    p = argparse.ArgumentParser(allow_abbrev=False, prog="ldmkit eval implicit-classifier",
                                description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("pipeline", help="pipeline directory or bundled name (its data must have classes)")
    p.add_argument("--num", type=int, default=500, help="test images")
    p.add_argument("--sigmas", default=",".join(f"{s:g}" for s in DEFAULT_SIGMAS),
                   help="noise levels (sigma of the scaled latents, which have unit variance)")
    p.add_argument("--draws", type=int, default=4, help="noise draws per image and level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder, if not installed")
    p.add_argument("--out", default=None, help="JSON file (default: print only)")
    args = p.parse_args(argv)
    try:
        sigmas = [float(v) for v in args.sigmas.split(",")]
    except ValueError:
        raise ValueError(f"--sigmas {args.sigmas!r} must be numbers separated by commas, e.g. 0.5,1,2") from None
    if not sigmas or not all(np.isfinite(s) and s > 0 for s in sigmas):
        raise ValueError(f"--sigmas {args.sigmas!r}: every level must be a positive number")
    if not 1 <= args.num <= 100000 or not 1 <= args.draws <= 64:
        raise ValueError(f"--num {args.num} must lie in 1..100000 and --draws {args.draws} in 1..64")
    pipe = Pipeline.load(find_pipeline(args.pipeline))
    ds = load_split(pipe.spec["data"], "test", pipe.spec.get("data_options"), args.data_dir)
    result = {"pipeline": str(args.pipeline), **evaluate(pipe, ds, args.num, sigmas, args.draws, args.seed),
              "command": "ldmkit eval implicit-classifier " + " ".join(sys.argv[1:] if argv is None else argv)}
    print(json.dumps(result, indent=1))
    if args.out:
        from ldmkit.checkpoint import write_bytes
        write_bytes(Path(args.out), (json.dumps(result, indent=1) + "\n").encode())
    return 0
