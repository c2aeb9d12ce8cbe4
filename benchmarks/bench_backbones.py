"""UNet against DiT as the latent denoiser, trained for the same CPU time on Fashion-MNIST latents.

    .venv/bin/python benchmarks/bench_backbones.py PIPELINE_DIR --minutes 10 [--out benchmarks/results/backbones.json]

PIPELINE_DIR holds trained Fashion-MNIST `autoencoder/`, `clip/` and `eval-classifier/` stages (a pipeline from
`ldmkit train pipeline --preset fashion-mnist`, or the three stages trained alone); they are shared by both arms,
so only the backbone differs. Each arm becomes a pipeline directory of its own (`WORK/unet`, `WORK/dit`). For
each backbone (the `fashion-mnist` and `fashion-mnist-dit` denoiser presets) the script times its training step,
sets the step count so that the run takes `--minutes` of compute, trains it with the preset's objective, schedule
and EMA, and samples 1,000 images (100 per class, "a photo of a {class}") with the pipeline's guidance, sampler
and 20 steps. Both arms are scored by the frozen evaluation classifier: accuracy, Frechet distance in its features,
precision and recall, beside the same-size real floor. A grid with 8 samples per class for each arm is written
next to the JSON (`backbones.png`: UNet rows on the left, DiT on the right).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import Scorer, class_prompts  # noqa: E402

from ldmkit.checkpoint import provenance, read_json, write_json  # noqa: E402
from ldmkit.config import apply_overrides  # noqa: E402
from ldmkit.data import load_dataset  # noqa: E402
from ldmkit.pipeline import Pipeline, PromptEncoder  # noqa: E402
from ldmkit.train import ldm  # noqa: E402
from ldmkit.train.pipeline import PRESETS as PIPELINE_PRESETS  # noqa: E402
from ldmkit.train.pipeline import write_pipeline_json

ARMS = {"unet": "fashion-mnist", "dit": "fashion-mnist-dit"}
SHARED = ("autoencoder", "clip", "eval-classifier")


def step_seconds(cfg: ldm.LDMConfig, ae_dir: Path, clip_dir: Path, ds, reps: int = 8) -> float:
    """Wall seconds of one training step (forward, loss, backward, AdamW, EMA) at the preset's batch size."""
    from ldmkit.diffusion.objectives import training_loss
    from ldmkit.stages import build_backbone
    from ldmkit.train import common
    cfg, _, text = ldm.bind(cfg, str(ae_dir), str(clip_dir))
    c, tc = cfg.conditioning, cfg.train
    model = build_backbone(dataclasses.asdict(cfg), c.context_dim, c.pooled_dim)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = common.make_adamw(model.parameters(), tc)
    x0 = torch.randn(tc.batch_size, *c.latent_shape, generator=torch.Generator().manual_seed(0))
    cond = {k: v for k, v in PromptEncoder(text)(ds.captions(range(tc.batch_size))).items() if k != "drop"}
    gidx = torch.arange(tc.batch_size)

    def one():
        with common.autocast(torch.device("cpu"), tc.precision):
            loss = training_loss(model, x0, cond, gidx, cfg.objective, 0).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        common.ema_update(ema, model, tc.ema_halflife_steps)

    for _ in range(2):
        one()
    t = time.perf_counter()
    for _ in range(reps):
        one()
    return (time.perf_counter() - t) / reps


def warm_latent_cache(ae_dir: Path, ds) -> None:
    """Encode the training set into the autoencoder's latent cache (a no-op when it is already there)."""
    from ldmkit.stages import load_autoencoder, weights_hash
    from ldmkit.train.latent_cache import posterior_cache
    ae, _, _ = load_autoencoder(ae_dir)
    posterior_cache(ae_dir, ae, weights_hash(ae_dir), ds, "fashion-mnist", "train")


def link_pipeline(base: Path, arm_dir: Path) -> None:
    """arm_dir/{autoencoder,clip,eval-classifier} -> the base pipeline's stages (shared, not copied)."""
    arm_dir.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        link = arm_dir / name
        if not link.exists():
            link.symlink_to((base / name).resolve(), target_is_directory=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pipeline", help="trained Fashion-MNIST pipeline directory (shared autoencoder/CLIP/eval)")
    p.add_argument("--minutes", type=float, default=10.0, help="training compute per backbone")
    p.add_argument("--work", default=None, help="where the two arms are trained (default PIPELINE/bench-backbones)")
    p.add_argument("--out", default="benchmarks/results/backbones.json")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST idx files")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--arms", default="unet,dit", help="comma-separated subset of unet,dit")
    args = p.parse_args(argv)
    base = Path(args.pipeline)
    work = Path(args.work or base / "bench-backbones")
    preset = PIPELINE_PRESETS["fashion-mnist"]
    ds = load_dataset("fashion-mnist", split="train", data_dir=args.data_dir)
    scorer = Scorer(base, args.data_dir)
    prompts, labels = class_prompts(args.per_class, None)
    result = {"pipeline": str(base), "minutes_per_arm": args.minutes, "eval_classifier_sha256": scorer.sha,
              "guidance": preset.guidance, "sampler": preset.sampler, "steps": 20,
              "threads": torch.get_num_threads(), "loadavg_start": os.getloadavg(), **provenance(), "arms": {}}
    grids = []
    warm_latent_cache(base / "autoencoder", ds)  # encoded once, before any arm's clock starts
    for arm in args.arms.split(","):
        cfg = ldm.PRESETS[ARMS[arm]]
        secs = step_seconds(cfg, base / "autoencoder", base / "clip", ds)
        steps = max(1, int(args.minutes * 60 / secs))
        warm = min(cfg.train.warmup_steps, steps // 10)
        cfg = apply_overrides(cfg, [f"train.steps={steps}", f"train.warmup_steps={warm}",
                                    f"train.max_minutes={args.minutes * 1.5}", "train.sample_every=0",
                                    f"train.ckpt_every={max(1, steps // 4)}"])
        arm_dir = work / arm
        link_pipeline(base, arm_dir)
        print(f"[{arm}] {secs * 1000:.0f} ms/step -> {steps} steps", file=sys.stderr, flush=True)
        t, c = time.perf_counter(), time.process_time()
        resume = (arm_dir / "denoiser" / "state.pt").exists() and not (arm_dir / "denoiser" / "metrics.json").exists()
        if not (arm_dir / "denoiser" / "metrics.json").exists():
            ldm.train(cfg, arm_dir / "denoiser", "fashion-mnist", ds, str(base / "autoencoder"), str(base / "clip"),
                      resume=resume)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        write_pipeline_json(arm_dir, preset, ds)
        pipe = Pipeline.load(arm_dir)
        t0 = time.perf_counter()
        images = pipe.generate(prompts, guidance=pipe.guidance(), steps=20, progress=False)
        sample_secs = time.perf_counter() - t0
        metrics = read_json(arm_dir / "denoiser" / "metrics.json")
        r = {"preset": ARMS[arm], "params": metrics.get("params"), "ms_per_step_timed": round(secs * 1000, 1),
             "steps_planned": steps, "steps_done": metrics["steps_done"],
             "train_wall_s": round(wall, 1), "train_cpu_s": round(cpu, 1),
             "sample_img_per_s": round(len(prompts) / sample_secs, 2),
             **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in scorer(images, labels).items()}}
        result["arms"][arm] = r
        print(f"[{arm}] {json.dumps(r)}", file=sys.stderr, flush=True)
        per = [images[[i for i, y in enumerate(labels) if y == k][:8]] for k in range(10)]
        grids.append(per)
    result["loadavg_end"] = os.getloadavg()
    write_json(args.out, result)
    if grids:
        save_side_by_side(grids, Path(args.out).with_suffix(".png"))
    print(json.dumps(result["arms"], indent=1))
    return 0


def save_side_by_side(grids, path: Path) -> None:
    """One row per class; each arm's 8 samples side by side, a blank column between arms."""
    import numpy as np
    from PIL import Image
    rows = []
    for k in range(10):
        parts = []
        for g in grids:
            parts += [im for im in g[k]] + [np.zeros_like(g[k][0])]
        rows.append(np.concatenate(parts[:-1], axis=1))
    img = np.concatenate(rows, axis=0)[..., 0]
    Image.fromarray(img).resize((img.shape[1] * 2, img.shape[0] * 2), Image.NEAREST).save(path)


if __name__ == "__main__":
    sys.exit(main())
