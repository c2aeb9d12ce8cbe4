"""Text-to-image quality of a Fashion-MNIST pipeline, scored by the frozen evaluation classifier.

    .venv/bin/python benchmarks/bench_pipeline.py PIPELINE_DIR [--out benchmarks/results/pipeline.json] [--quick]

Measures, with the pipeline's default sampler and 20 steps: accuracy / FD / precision / recall of 1,000 images
(100 per class, "a photo of a {class}") for CFG scales 0, 1, 2, 3, 5 and the preset's scale; the same with the
held-out templates and paraphrases; classifier guidance on the unconditional path (w = 0) against classifier scale;
each guidance variant at the preset scale; and images per second at 20 steps with CFG. Every figure sits beside
the real-image floor and the evaluation classifier's weight hash, with the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

from ldmkit.checkpoint import provenance, write_json
from ldmkit.data import FASHION_CLASSES, HELDOUT_TEMPLATES, fill_template
from ldmkit.eval.classifier import score_images
from ldmkit.eval.score import load_eval_classifier
from ldmkit.pipeline import Pipeline
from ldmkit.train.eval_classifier import fashion_uint8


def class_prompts(per_class: int, templates: list[str] | None, seed: int = 0) -> tuple[list[str], list[int]]:
    """`per_class` prompts per class: "a photo of a {class}" or a seeded choice among `templates`."""
    rng = random.Random(seed)
    prompts, labels = [], []
    for c, name in enumerate(FASHION_CLASSES):
        for _ in range(per_class):
            t = "a photo of a {}" if templates is None else rng.choice(templates)
            prompts.append(fill_template(t, name))
            labels.append(c)
    return prompts, labels


class Scorer:
    def __init__(self, pipe_dir: Path, data_dir: str | None):
        self.model, self.sha = load_eval_classifier(pipe_dir)
        self.xtr, _ = fashion_uint8("train", data_dir)
        self.xte, self.yte = fashion_uint8("test", data_dir)

    def __call__(self, images, labels) -> dict:
        r = score_images(self.model, images, torch.as_tensor(labels), self.xte, self.xtr, real_test_labels=self.yte)
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}


def run(pipe: Pipeline, scorer: Scorer, prompts, labels, **kw) -> dict:
    t = time.perf_counter()
    images = pipe.generate(prompts, steps=20, progress=False, **kw)
    secs = time.perf_counter() - t
    return {**scorer(images, labels), "seconds": round(secs, 1), "img_per_s": round(len(prompts) / secs, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pipeline")
    p.add_argument("--out", default="benchmarks/results/pipeline.json")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--quick", action="store_true", help="only the preset scale and CFG sweep (no variants)")
    args = p.parse_args(argv)
    root = Path(args.pipeline)
    pipe = Pipeline.load(root)
    scorer = Scorer(root, args.data_dir)
    w0 = float(pipe.defaults["guidance"])
    prompts, labels = class_prompts(args.per_class, None)
    result = {"pipeline": str(root), "eval_classifier_sha256": scorer.sha, "sampler": pipe.defaults["sampler"],
              "steps": 20, "preset_guidance": w0, "loadavg_start": os.getloadavg(), **provenance()}

    def log(name, r):
        print(f"{name}: {json.dumps(r)}", file=sys.stderr, flush=True)
        return r

    result["cfg_sweep"] = {str(w): log(f"cfg w={w}", run(pipe, scorer, prompts, labels, guidance=pipe.guidance(w)))
                           for w in sorted({0.0, 1.0, 2.0, 3.0, 5.0, w0})}
    held, held_labels = class_prompts(args.per_class, HELDOUT_TEMPLATES, seed=1)
    result["heldout_templates"] = log("heldout", run(pipe, scorer, held, held_labels, guidance=pipe.guidance(w0)))
    if not args.quick:
        variants = {"negative_prompt": dict(negative_prompt="a blurry photo"), "rescale_0.7": dict(rescale=0.7),
                    "interval": dict(interval=(0.3, 5.0)), "apg": dict(mode="apg")}
        result["variants"] = {k: log(k, run(pipe, scorer, prompts, labels, guidance=pipe.guidance(w0, **v)))
                              for k, v in variants.items()}
        if pipe.classifier is not None:
            unc = [""] * len(prompts)
            result["classifier_guidance_w0"] = {
                str(s): log(f"classifier s={s}", run(pipe, scorer, unc, labels, class_labels=labels,
                                                     guidance=pipe.guidance(0.0, classifier_scale=s)))
                for s in (0.0, 1.0, 2.0, 4.0, 8.0)}
    result["loadavg_end"] = os.getloadavg()
    write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("cfg_sweep", "heldout_templates")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
