"""Reconstruction quality of the Fashion-MNIST autoencoder preset, scored on all 10,000 test images.

    .venv/bin/python benchmarks/bench_autoencoder.py --eval-classifier pretrained/fashion-mnist/eval-classifier
        [--run STAGE_DIR]
        [--train-dir DIR] [--set KEY=VALUE ...] [--out benchmarks/results/autoencoder.json]

Without --run it trains the `fashion-mnist` preset into --train-dir first (about 12 minutes on an idle 2-core CPU;
the wall time depends on the machine's load, so the JSON records the steps, the CPU time and os.getloadavg() at
start and end). Reported, on the 28x28 native crop with posterior-mode reconstructions: PSNR, SSIM, LPIPS (the
stage's own featnet backbone), the mean KL per latent channel with its floor, the active-unit fraction per
channel, and the evaluation classifier's accuracy on originals and reconstructions with its weight hash.

KL floor, per channel, in nats per image: 1.0. Averaged over the data, KL(q(z_c|x) || N(0, I)) equals the mutual
information I(x; z_c) plus KL(q(z_c) || N(0, I)) (Hoffman & Johnson 2016, "ELBO surgery"), so it bounds from above
what channel c carries about the image. Below 1 nat (1.44 bits for a whole 28x28 image, spread over 64 latent
positions) the channel tells the decoder next to nothing: it has collapsed to the prior. A KL above the floor is
necessary, not sufficient (a shifted marginal also costs KL), so the active-unit test of Burda et al. 2016 is
checked too: a channel counts as alive when at least half of its positions have Var_x(E[z|x]) > 0.01.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from ldmkit.checkpoint import provenance, read_json, write_json

KL_FLOOR_NATS = 1.0  # per channel, per image; see the module docstring
ACTIVE_FLOOR = 0.5  # fraction of a channel's positions that must be active units
TARGETS = {"psnr_db": 29.0, "max_acc_drop": 0.01}


def train_preset(out: Path, overrides: list[str], data_dir: str | None) -> dict:
    """Train the fashion-mnist preset in-process; returns wall and CPU seconds."""
    from ldmkit.config import apply_overrides, preset
    from ldmkit.data import load_dataset
    from ldmkit.train.autoencoder import PRESETS, train
    cfg = apply_overrides(preset(PRESETS, "fashion-mnist"), overrides)
    ds = load_dataset("fashion-mnist", split="train", data_dir=data_dir)
    t, cpu = time.perf_counter(), time.process_time()
    train(cfg, out, "fashion-mnist", ds, progress=False)
    return {"bench_wall_seconds": round(time.perf_counter() - t, 1),
            "bench_cpu_seconds": round(time.process_time() - cpu, 1)}


def training_facts(stage: Path) -> dict:
    """Steps, wall time and speed of the run from its metrics files."""
    m = read_json(stage / "metrics.json")
    cfg = read_json(stage / "config.json")
    rows = [json.loads(r) for r in (stage / "metrics.jsonl").read_text().splitlines() if r.strip()]
    ms = [r["ms_per_step"] for r in rows if "ms_per_step" in r]
    return {"train_seconds": m.get("train_seconds"), "train_wall_seconds": m.get("wall_seconds"),
            "steps_done": m.get("steps_done"),
            "steps_planned": cfg["train"]["steps"], "stopped_early": m.get("stopped_early"),
            "max_minutes": cfg["train"]["max_minutes"], "precision": cfg["train"]["precision"],
            "threads": cfg["train"]["threads"], "median_ms_per_step": sorted(ms)[len(ms) // 2] if ms else None,
            "params": m.get("params"), "scale_factor": m.get("scale_factor"), "shift_factor": m.get("shift_factor"),
            "disc_start": cfg["loss"]["disc_start"], "batch_size": cfg["train"]["batch_size"]}


def checks(res: dict) -> dict:
    kl_ok = all(k > KL_FLOOR_NATS for k in res["kl_per_channel"])
    active_ok = all(a >= ACTIVE_FLOOR for a in res["active_per_channel"])
    out = {"psnr_ge_29": res["psnr"] >= TARGETS["psnr_db"], "kl_above_floor": kl_ok, "channels_active": active_ok}
    if "eval_classifier_acc_diff" in res:
        out["acc_drop_le_1pt"] = res["eval_classifier_acc_diff"] <= TARGETS["max_acc_drop"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None, help="evaluate this existing stage (or pipeline) directory; no training")
    p.add_argument("--train-dir", default="runs/bench-autoencoder", help="where to train (without --run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="preset override (training)")
    p.add_argument("--eval-classifier", default=None, help="evaluation classifier stage directory")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST idx files")
    p.add_argument("--out", default="benchmarks/results/autoencoder.json")
    p.add_argument("--threads", type=int, default=0, help="torch threads for evaluation (0 = torch's default)")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from ldmkit.eval.autoencoder_eval import evaluate, find_autoencoder_dir
    load_start, t0 = os.getloadavg(), time.perf_counter()
    bench = {}
    if args.run is None:
        if Path(args.train_dir).exists():
            p.error(f"--train-dir {args.train_dir} exists; remove it or evaluate it with --run {args.train_dir}")
        bench = train_preset(Path(args.train_dir), args.overrides, args.data_dir)
    elif args.overrides:
        p.error("--set applies to training; it cannot change an existing --run")
    stage = find_autoencoder_dir(args.run or args.train_dir)
    load_after_train = os.getloadavg()
    res = evaluate(stage, args.data_dir, 500, args.eval_classifier, png=stage / "eval_recon.png")
    result = {"stage_dir": str(stage), "preset": "fashion-mnist", "overrides": args.overrides,
              **training_facts(stage), **bench,
              "test_psnr_crop28": res["psnr"], "ssim": res["ssim"], "lpips": res["lpips"],
              "lpips_backbone": res["lpips_backbone"], "kl_per_channel": res["kl_per_channel"],
              "kl_floor_nats": KL_FLOOR_NATS, "active_per_channel": res["active_per_channel"],
              "active_floor": ACTIVE_FLOOR, "latent_mean": res["latent_mean"], "latent_std": res["latent_std"],
              **{k: v for k, v in res.items() if k.startswith("eval_classifier")},
              "targets": TARGETS, "checks": checks(res), "eval_seconds": None,
              "loadavg_start": load_start, "loadavg_after_train": load_after_train, "loadavg_end": os.getloadavg(),
              "torch": torch.__version__, "torch_threads": torch.get_num_threads(), **provenance()}
    result["eval_seconds"] = round(time.perf_counter() - t0 - bench.get("bench_wall_seconds", 0.0), 1)
    write_json(args.out, result)
    print(json.dumps(result, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
