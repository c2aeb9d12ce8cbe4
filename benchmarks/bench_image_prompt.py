"""Image prompts on Fashion-MNIST, scored by the frozen evaluation classifier.

    .venv/bin/python benchmarks/bench_image_prompt.py PIPELINE [--per-class 100] [--image-scales 1,2,3,5]
        [--out benchmarks/results/image_prompt.json]
    .venv/bin/python benchmarks/bench_image_prompt.py PIPELINE --text-only   # the text rows alone (any pipeline)

Prompt images: the first `per_class` test images of every class. Variations (an image prompt, no text) at each
image scale: how often the classifier reads the prompt image's class, FD / precision / recall against the test set,
and how much closer a variation is to its own prompt than to another prompt of the same class (cosine in the
classifier's features: a copy would sit at 1, an unrelated image of the class at the "other" figure). Mixed
prompts: the image of class a with the text "a photo of a {b}", b = a + 1 mod 10, at image scale 1 and text scales
1, 3, 5: how often the sample is read as b (the text) and as a (the image). Text alone: "a photo of a {class}" at the
pipeline's default guidance, to compare with a denoiser trained on text only. The pipeline's sampler, steps, and
rescale default throughout.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import Scorer, class_prompts  # noqa: E402

from ldmkit.checkpoint import provenance, write_json  # noqa: E402
from ldmkit.data import FASHION_CLASSES  # noqa: E402
from ldmkit.eval.classifier import predict  # noqa: E402
from ldmkit.pipeline import Pipeline  # noqa: E402


def prompt_images(xte: np.ndarray, yte: np.ndarray, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `per_class` test images of each class, class by class: uint8 (N, 28, 28, 1), labels (N,)."""
    idx = np.concatenate([np.flatnonzero(yte == c)[:per_class] for c in range(10)])
    return np.asarray(xte)[idx], np.asarray(yte)[idx]


def closeness(model, samples: np.ndarray, prompts: np.ndarray, per_class: int) -> dict:
    """Mean cosine (classifier features) of each sample to its own prompt and to the next prompt of its class."""
    _, fs = predict(model, samples)
    _, fp = predict(model, prompts)
    fs, fp = torch.nn.functional.normalize(fs, dim=1), torch.nn.functional.normalize(fp, dim=1)
    n = len(samples)
    other = (np.arange(n) // per_class) * per_class + (np.arange(n) % per_class + 1) % per_class
    return {"cos_own_prompt": float((fs * fp).sum(1).mean()),
            "cos_other_prompt_same_class": float((fs * fp[other]).sum(1).mean())}


def run(pipe: Pipeline, score: Scorer, images: np.ndarray | None, prompts: list[str], labels, scale, image_scale):
    g = pipe.guidance(scale, image_scale=image_scale)
    t0 = time.perf_counter()
    out = pipe.generate(prompts, guidance=g, image_prompts=images, progress=False, micro_batch=64)
    took = time.perf_counter() - t0
    return out, {"guidance": g.scale, "image_guidance": image_scale, "guidance_rescale": g.rescale,
                 "images_per_second": len(out) / took, **score(out, labels)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pipeline")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--image-scales", default="1,2,3,5")
    p.add_argument("--text-only", action="store_true", help="only the text rows (a text-only pipeline works too)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="benchmarks/results/image_prompt.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    pipe, score = Pipeline.load(args.pipeline), Scorer(Path(args.pipeline), args.data_dir)
    result = {"pipeline": Path(args.pipeline).name, "stages": {k: v["sha256"] for k, v in pipe.spec["stages"].items()},
              "eval_classifier_sha256": score.sha, "per_class": args.per_class, "sampler": pipe.defaults["sampler"],
              "steps": pipe.defaults["steps"], "load_average_at_start": os.getloadavg()[0]}
    text, text_labels = class_prompts(args.per_class, None)
    _, row = run(pipe, score, None, text, text_labels, None, None)
    result["text"] = row
    print(f"text alone: {row}", file=sys.stderr)
    if not args.text_only:
        images, labels = prompt_images(score.xte, score.yte, args.per_class)
        result["variations"] = []
        for w in (float(v) for v in args.image_scales.split(",")):
            out, row = run(pipe, score, images, [""] * len(images), labels, None, w)
            row.update(closeness(score.model, out, images, args.per_class))
            result["variations"].append(row)
            print(f"variations w_image={w}: {row}", file=sys.stderr)
        mixed_text = [f"a photo of a {FASHION_CLASSES[(y + 1) % 10]}" for y in labels]
        result["mixed"] = []
        for wt in (1.0, 3.0, 5.0):
            out, row = run(pipe, score, images, mixed_text, (labels + 1) % 10, wt, 1.0)
            read, _ = predict(score.model, out)
            row["read_as_image_class"] = float((read.argmax(1).numpy() == labels).mean())
            row["read_as_text_class"] = row["accuracy"]
            result["mixed"].append(row)
            print(f"image class a + text class a+1, w_text={wt}: {row}", file=sys.stderr)
    result["load_average_at_end"] = os.getloadavg()[0]
    result["provenance"] = provenance()
    write_json(args.out, result)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
