"""`ldmkit train shapes-judge`: train the frozen per-attribute judges of generated shapes images.

The judges and how they score are in `ldmkit.eval.shapes_judge`; this module only trains them (each an evaluation
classifier, `ldmkit.train.eval_classifier.train_eval_classifier`, on freshly drawn scenes of every shape-colour
pair, never mirrored).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ldmkit.checkpoint import file_hash, provenance, save_safetensors, write_json
from ldmkit.data.shapes import load_shapes
from ldmkit.eval.shapes_judge import (
    ATTRIBUTES,
    EVAL_SEED,
    JUDGE_SEED,
    judge_accuracy,
    judge_config,
    scenes_nhwc,
    seen_mask,
)
from ldmkit.train.eval_classifier import train_eval_classifier


def train_judge(out: str | Path, steps: int = 1200, images: int = 20000, progress: bool = True) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_shapes("test", num=images, seed=JUDGE_SEED)  # every pair, incl. the held-out ones
    ev = load_shapes("test", num=2000, seed=EVAL_SEED)
    x, xe = scenes_nhwc(ds), scenes_nhwc(ev)
    models, configs = {}, {}
    for a in ATTRIBUTES:
        cfg = judge_config(len(ds.label_names[a]), a)
        if progress:
            print(f"shapes judge: {a} ({cfg.num_classes} classes, {steps} steps)")
        model, _ = train_eval_classifier(x, ds.labels[a].numpy(), xe, ev.labels[a].numpy(), steps=steps,
                                         seed=JUDGE_SEED, progress=progress, config=cfg, flip=False,
                                         label_smoothing=0.0)
        save_safetensors(model.state_dict(), out / f"{a}.safetensors", {"stage": "shapes-judge", "attribute": a})
        models[a], configs[a] = model, dataclasses.asdict(cfg)
    seen = seen_mask(ev.labels["shape"].numpy(), ev.labels["color"].numpy(), ev.meta["heldout"])
    acc = judge_accuracy(models, xe, {a: ev.labels[a].numpy() for a in ATTRIBUTES}, seen)
    write_json(out / "config.json", {"stage": "shapes-judge", "models": configs, "steps": steps, "images": images,
                                     "heldout": [list(p) for p in ds.meta["heldout"]]})
    metrics = {**provenance(data="shapes", stage="shapes-judge"), "accuracy": acc,
               "weights_sha256": {a: file_hash(out / f"{a}.safetensors") for a in ATTRIBUTES}}
    write_json(out / "metrics.json", metrics)
    if progress:
        print("shapes judge accuracy on 2,000 new scenes: " + ", ".join(
            f"{a} {v['all']:.4f} (held-out pairs {v['heldout']:.4f})" for a, v in acc.items()) + f" -> {out}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="ldmkit train shapes-judge",
                                description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("--out", required=True, help="directory for the three judges")
    p.add_argument("--steps", type=int, default=1200, help="optimizer steps per attribute (batch 128)")
    p.add_argument("--images", type=int, default=20000, help="generated training scenes")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.steps < 1 or args.images < 128:
        p.error("--steps must be >= 1 and --images >= 128")
    train_judge(args.out, args.steps, args.images, progress=not args.no_progress)
    return 0
