"""Autoguidance against classifier-free guidance on Fashion-MNIST, scored by the evaluation classifier.

    .venv/bin/python benchmarks/bench_autoguidance.py PIPELINE [--per-class 100] [--curves cfg,blend-0.2,...]
        [--out benchmarks/results/autoguidance.json]

PIPELINE needs a guide/ stage (`ldmkit train pipeline` trains it where the preset has one). Curves, each point
1,000 samples ("a photo of a {class}", 100 per class, seed 1, the pipeline's sampler, 20 steps): CFG with the
pipeline's default rescale, alone and inside the guidance interval (0.3, 5]; autoguidance (no rescale, as Karras
et al. 2024), alone and inside the interval; and the two guiding branches blended (`guide_mix` lambda, with the
pipeline's rescale). Then, at the accuracy CFG reaches at the pipeline's default scale, each curve's FD, precision
and recall, interpolated linearly in accuracy between the two neighbouring scales (None where a curve never
reaches it). `--curves` reruns some curves and keeps the others from --out (same stages, same sample count).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import Scorer, class_prompts, run  # noqa: E402

from ldmkit.checkpoint import provenance, read_json, write_json  # noqa: E402
from ldmkit.pipeline import Pipeline  # noqa: E402

CURVES = {  # name -> (Guidance keywords, scales)
    "cfg": ({}, (1.5, 2.0, 3.0, 4.0, 5.0)),
    "cfg-interval": ({"interval": (0.3, 5.0)}, (4.0, 5.0)),
    "autoguidance": ({"mode": "autoguidance", "rescale": 0.0}, (1.5, 2.0, 3.0, 4.0, 6.0)),
    "autoguidance-interval": ({"mode": "autoguidance", "rescale": 0.0, "interval": (0.3, 5.0)},
                              (2.0, 3.0, 4.0, 6.0)),
    # the guiding branch blended: G = lambda D_guide(c) + (1 - lambda) D(u), the pipeline's rescale
    "blend-0.33": ({"mode": "autoguidance", "guide_mix": 1 / 3}, (3.0, 4.0, 5.0)),
    "blend-0.2": ({"mode": "autoguidance", "guide_mix": 0.2}, (3.0, 3.5, 4.5)),
    "blend-0.25": ({"mode": "autoguidance", "guide_mix": 0.25}, (3.2,)),
    "blend-0.2-interval": ({"mode": "autoguidance", "guide_mix": 0.2, "interval": (0.3, 5.0)}, (4.0, 5.0)),
}


def at_accuracy(rows: list[dict], accuracy: float) -> dict | None:
    """FD / precision / recall where the curve crosses `accuracy` (linear in accuracy between two scales)."""
    rows = sorted(rows, key=lambda r: r["accuracy"])
    for lo, hi in zip(rows, rows[1:]):
        if lo["accuracy"] <= accuracy <= hi["accuracy"] and hi["accuracy"] > lo["accuracy"]:
            f = (accuracy - lo["accuracy"]) / (hi["accuracy"] - lo["accuracy"])
            return {k: round(lo[k] + f * (hi[k] - lo[k]), 4) for k in ("fd", "precision", "recall", "scale")}
    exact = [r for r in rows if r["accuracy"] == accuracy]
    return {k: exact[0][k] for k in ("fd", "precision", "recall", "scale")} if exact else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pipeline")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="benchmarks/results/autoguidance.json")
    p.add_argument("--curves", default=",".join(CURVES), help="which curves to run; the others are kept from --out "
                   "when it was made with the same stages")
    args = p.parse_args(argv)
    wanted = args.curves.split(",")
    if not set(wanted) <= set(CURVES):
        p.error(f"--curves: choose from {', '.join(CURVES)}")
    torch.manual_seed(0)
    pipe, score = Pipeline.load(args.pipeline), Scorer(Path(args.pipeline), args.data_dir)
    if pipe.guide is None:
        raise SystemExit(f"{args.pipeline} has no guide/ stage; train one with `ldmkit train pipeline`")
    prompts, labels = class_prompts(args.per_class, None)
    result = {"pipeline": Path(args.pipeline).name, "eval_classifier_sha256": score.sha,
              "stages": {k: v["sha256"] for k, v in pipe.spec["stages"].items()}, "per_class": args.per_class,
              "sampler": pipe.defaults["sampler"], "steps": 20, "default_guidance": pipe.defaults["guidance"],
              "default_rescale": pipe.defaults.get("guidance_rescale", 0.0),
              "load_average_at_start": os.getloadavg()[0], "curves": {}}
    old = read_json(args.out) if Path(args.out).exists() else {}
    if old.get("stages") == result["stages"] and old.get("per_class") == args.per_class:
        result["curves"] = {k: v for k, v in old["curves"].items() if k in CURVES and k not in wanted}
    for name in wanted:
        kw, scales = CURVES[name]
        rows = []
        for w in scales:
            g = pipe.guidance(w, **kw)
            row = {"scale": w, "rescale": g.rescale, "interval": g.interval, "guide_mix": g.guide_mix,
                   **run(pipe, score, prompts, labels, guidance=g, seed=1)}
            print(f"{name} w={w}: {row}", file=sys.stderr, flush=True)
            rows.append(row)
        result["curves"][name] = rows
    preset = next(r for r in result["curves"]["cfg"] if r["scale"] == pipe.defaults["guidance"])
    target = preset["accuracy"]
    result["curves"] = {name: result["curves"][name] for name in CURVES if name in result["curves"]}
    result["matched"] = {"accuracy": target, "cfg_at_default": {k: preset[k] for k in ("fd", "precision", "recall")},
                         **{name: at_accuracy(rows, target) for name, rows in result["curves"].items()}}
    for name in result["curves"]:
        m = result["matched"][name]
        if m is not None:
            m["fd_change_vs_cfg"] = round(m["fd"] / preset["fd"] - 1, 4)
    result["best_fd"] = {name: min(rows, key=lambda r: r["fd"]) for name, rows in result["curves"].items()}
    result["provenance"] = provenance()
    write_json(args.out, result)
    print(f"matched at accuracy {target}: {result['matched']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
