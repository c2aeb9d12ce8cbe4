"""Sampling speed to an accuracy bar: ldmkit's pipeline against a diffusers pipeline around the same weights.

    .venv/bin/python benchmarks/bench_sampling_speed.py PIPELINE_DIR [--per-class 50] [--bar 0.95]
        [--ldmkit dpmpp-2m:6,dpmpp-2m:4:g0.5-3:bf16,dpmpp-2m:2:fast:distilled,...]
        [--diffusers dpmpp-2m:8,euler:20:bf16,...] [--out benchmarks/results/sampling_speed.json]

A configuration is SAMPLER:STEPS, optionally followed by `:bf16` (the networks under bf16 autocast, on either side)
and, for ldmkit, `:gLO-HI` (guidance interval: the unconditional branch runs only for LO < sigma <= HI), `:fast`
(decode with the pipeline's fast decoder, `ldmkit train fast-decoder`), `:distilled` (the guidance-distilled
denoiser, `ldmkit train distill`: one network row per image and step) and `:onestep` (its one-step student,
`--set one_step_from=N`; use it with 1 step). The JSON gives two ratios: `speedup_at_bar`
(each side's fastest configuration, ldmkit's own fast decoder and distilled denoiser allowed) and
`speedup_at_bar_same_networks` (ldmkit restricted to the very networks the diffusers side runs).

Both sides draw the same images: prompts "a photo of a {class}" (`--per-class` per class), the pipeline's
guidance scale, image i starting from the same noise (seeded by (0, i)), the same frozen text encoder, denoiser
and autoencoder weights. The ldmkit side is `Pipeline.generate` with each (sampler, steps) in `--ldmkit` (network
calls in chunks of `--micro-batch` rows, 64 by default as for bulk sampling). The diffusers side is the loop every
diffusers pipeline runs: its scheduler (FlowMatchEulerDiscreteScheduler for "euler", DPMSolverMultistepScheduler
with flow sigmas for "dpmpp-2m", both for flow-matching models), classifier-free
guidance on one doubled batch, then diffusers' own AutoencoderKL holding the autoencoder's weights for decoding;
the denoiser is ldmkit's module (diffusers has no class for it), called with diffusers' timestep convention
(t = 1000 sigma). Every configuration is timed end to end (text encoding, sampling, decoding) and scored by the
evaluation classifier; per side, the fastest configuration whose accuracy reaches `--bar` gives its images per
second, and the JSON records the ratio. Run on an idle machine (the load average is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_autoencoder_speed import make_diffusers  # noqa: E402
from bench_pipeline import Scorer, class_prompts  # noqa: E402

from ldmkit.checkpoint import provenance, write_json  # noqa: E402
from ldmkit.nn import in_precision  # noqa: E402
from ldmkit.pipeline import Pipeline  # noqa: E402
from ldmkit.seeding import example_generators, randn  # noqa: E402


def diffusers_vae(pipe: Pipeline):
    """diffusers' AutoencoderKL with the pipeline autoencoder's weights (the layouts and names are the same)."""
    vae = make_diffusers(pipe.autoencoder.cfg)
    vae.load_state_dict(pipe.autoencoder.state_dict(), strict=True)
    return vae.eval()


def diffusers_scheduler(name: str):
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
    if name == "euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    if name == "dpmpp-2m":
        return DPMSolverMultistepScheduler(num_train_timesteps=1000, use_flow_sigmas=True, flow_shift=1.0,
                                           prediction_type="flow_prediction", algorithm_type="dpmsolver++",
                                           solver_order=2)
    raise ValueError(f"diffusers sampler {name!r}: use euler or dpmpp-2m")


@torch.no_grad()
def diffusers_generate(pipe: Pipeline, vae, sampler: str, steps: int, prompts: list[str], w: float,
                       batch_size: int = 64, precision: str = "fp32") -> np.ndarray:
    """A diffusers pipeline's loop around the pipeline's weights -> uint8 (N, H, W, C) at the native size."""
    if pipe.objective.kind != "flow":
        raise SystemExit(f"this benchmark drives flow-matching denoisers; {pipe.root} predicts {pipe.objective.kind}")
    out = []
    backbone = in_precision(pipe.backbone, precision)
    decode = in_precision(lambda z: vae.decode(z).sample, precision)
    for b in range(0, len(prompts), batch_size):
        rows = prompts[b:b + batch_size]
        n = len(rows)
        cond = pipe.encode(rows)
        both = {k: torch.cat([v, v]) for k, v in cond.items()}
        both["drop"] = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])
        sched = diffusers_scheduler(sampler)
        sched.set_timesteps(steps)
        lat = randn((n, *pipe.latent_shape), example_generators(0, list(range(b, b + n))))
        lat = lat * getattr(sched, "init_noise_sigma", 1.0)
        for t in sched.timesteps:
            x = torch.cat([lat, lat])
            if hasattr(sched, "scale_model_input"):
                x = sched.scale_model_input(x, t)
            v = backbone(x, t.float().expand(2 * n), **both)
            u, c = v.chunk(2)
            lat = sched.step(u + w * (c - u), t, lat).prev_sample
        img = decode(lat / pipe.scale_factor + pipe.shift_factor)
        top, left, h, wd = pipe.crop_box
        img = img[:, :, top:top + h, left:left + wd]
        out.append(((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def parse_configs(text: str, interval_ok: bool = True) -> list[dict]:
    """SAMPLER:STEPS[:bf16][:gLO-HI],... -> [{sampler, steps, dtype, interval}]."""
    out = []
    for item in text.split(","):
        name, steps, *opts = item.split(":")
        if not steps.isdigit():
            raise SystemExit(f"configuration {item!r}: write SAMPLER:STEPS[:bf16][:gLO-HI], e.g. dpmpp-2m:8")
        cfg = {"sampler": name, "steps": int(steps), "dtype": "fp32", "interval": None}
        if interval_ok:
            cfg.update(decoder="full", distilled=False)
        for opt in opts:
            if opt == "bf16":
                cfg["dtype"] = "bf16"
            elif opt == "fast" and interval_ok:
                cfg["decoder"] = "fast"
            elif opt == "distilled" and interval_ok:
                cfg["distilled"] = True
            elif opt == "onestep" and interval_ok:
                cfg["distilled"] = "onestep"
            elif opt.startswith("g") and interval_ok:
                lo, _, hi = opt[1:].partition("-")
                cfg["interval"] = (float(lo), float(hi))
            else:
                raise SystemExit(f"configuration {item!r}: unknown option {opt!r} (bf16"
                                 f"{', gLO-HI, fast, distilled, onestep' if interval_ok else ''})")
        out.append(cfg)
    return out


def fastest_at_bar(rows: list[dict], bar: float) -> dict | None:
    ok = [r for r in rows if r["accuracy"] is not None and r["accuracy"] >= bar]
    return max(ok, key=lambda r: r["img_per_s"]) if ok else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pipeline")
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--bar", type=float, default=0.95, help="evaluation-classifier accuracy to reach")
    p.add_argument("--ldmkit", default="dpmpp-2m:6,dpmpp-2m:8,dpmpp-2m:12,dpmpp-2m:20")
    p.add_argument("--diffusers", default="dpmpp-2m:6,dpmpp-2m:8,dpmpp-2m:12,dpmpp-2m:20,euler:20,euler:40")
    p.add_argument("--micro-batch", type=int, default=64, help="ldmkit's rows per network call (bulk sampling)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="benchmarks/results/sampling_speed.json")
    args = p.parse_args(argv)
    root = Path(args.pipeline)
    pipe = Pipeline.load(root)
    scorer = Scorer(root, args.data_dir)
    w = float(pipe.defaults["guidance"])
    prompts, labels = class_prompts(args.per_class, None)
    vae = diffusers_vae(pipe)
    result = {"pipeline": str(root), "eval_classifier_sha256": scorer.sha, "guidance": w, "images": len(prompts),
              "bar": args.bar, "micro_batch": args.micro_batch, "threads": torch.get_num_threads(),
              "loadavg_start": os.getloadavg(),
              **provenance(), "ldmkit": [], "diffusers": []}

    def timed(side, cfg, fn):
        pipe.encode.cache.clear()  # each configuration pays for its text encoding
        t = time.perf_counter()
        images = fn()
        secs = time.perf_counter() - t
        s = scorer(images, labels)
        row = {**cfg, "seconds": round(secs, 2), "img_per_s": round(len(prompts) / secs, 2),
               **{k: s[k] for k in ("accuracy", "fd", "fd_floor", "precision", "recall")}}
        print(f"[{side}] {json.dumps(row)}", file=sys.stderr, flush=True)
        result[side].append(row)

    warm = prompts[:8]  # first calls pay one-time costs (allocator, thread pool, lazy imports): not timed
    pipe.generate(warm, guidance=pipe.guidance(w), steps=2, progress=False)
    if pipe.fast_decoder is not None:
        pipe.generate(warm, guidance=pipe.guidance(w), steps=2, progress=False, decoder="fast")
    if pipe.distilled is not None:
        pipe.generate(warm, guidance=pipe.distilled_guidance(), steps=2, progress=False, distilled=True)
    if pipe.onestep is not None:
        pipe.generate(warm, guidance=pipe.distilled_guidance(), steps=1, progress=False, distilled="onestep")
    diffusers_generate(pipe, vae, "euler", 2, warm, w)
    for c in parse_configs(args.ldmkit):
        timed("ldmkit", c, lambda c=c: pipe.generate(prompts, guidance=pipe.guidance(w, interval=c["interval"]),
                                                 steps=c["steps"], sampler=c["sampler"], progress=False,
                                                 micro_batch=args.micro_batch, precision=c["dtype"],
                                                 decoder=c["decoder"], distilled=c["distilled"]))
    for c in parse_configs(args.diffusers, interval_ok=False):
        timed("diffusers", c, lambda c=c: diffusers_generate(pipe, vae, c["sampler"], c["steps"], prompts, w,
                                                         precision=c["dtype"]))
    best = {side: fastest_at_bar(result[side], args.bar) for side in ("ldmkit", "diffusers")}
    best["ldmkit_same_networks"] = fastest_at_bar([r for r in result["ldmkit"] if r["decoder"] == "full"
                                                   and not r["distilled"]], args.bar)
    result["fastest_at_bar"] = best
    for key, side in (("speedup_at_bar", "ldmkit"), ("speedup_at_bar_same_networks", "ldmkit_same_networks")):
        result[key] = (best[side]["img_per_s"] / best["diffusers"]["img_per_s"]
                       if best[side] and best["diffusers"] else None)
    result["loadavg_end"] = os.getloadavg()
    write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("fastest_at_bar", "speedup_at_bar", "speedup_at_bar_same_networks")},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
