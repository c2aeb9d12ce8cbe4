"""Autoencoder training-step speed: ldmkit's AutoencoderKL against diffusers' AutoencoderKL, identical config.

One step = encode, sample the posterior, decode, L1 reconstruction + KL, backward, AdamW (fused where torch has
it, as ldmkit trains; the same optimizer for both), on a batch of images; both models are built from the same
configuration (the Fashion-MNIST preset's by default: 1 channel, 32x32, block_out_channels (32, 64, 128), one layer
per block, 4 latent channels, GroupNorm 16), have the same parameter count, and run at the same precision. Timed in
interleaved rounds (median and best), with FLOPs per step counted by torch.utils.flop_counter, the achieved FLOP/s
and its fraction of this machine's measured fp32 peak (the faster of torch.mm and F.linear at 2048x2048, as in
bench_backbone_speed.py). The speedup is given as the ratio of median
step times and as the median (with quartiles) of the per-round ratios, each round timing the two models back to
back, which keeps a drift of the machine's speed out of the ratio. The machine's load average is recorded.

    .venv/bin/python benchmarks/bench_autoencoder_speed.py [--batch 32] [--threads 2] [--precision fp32,bf16]
        [--channels-last] [--repeats N] [--out benchmarks/results/autoencoder_speed.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from bench_backbone_speed import measure_peak, positive_int, repeat_runs, time_interleaved, write_result  # noqa: E402

from ldmkit.autoencoder.vae import PRESETS as AE_PRESETS  # noqa: E402
from ldmkit.autoencoder.vae import AutoencoderKL  # noqa: E402
from ldmkit.nn import count_params  # noqa: E402
from ldmkit.train.autoencoder import PRESETS as STAGE_PRESETS  # noqa: E402
from ldmkit.train.common import adamw  # noqa: E402


def make_diffusers(cfg):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    n = len(cfg.block_out_channels)
    return DiffusersAutoencoderKL(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block, latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_groups,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        mid_block_add_attention=cfg.mid_attention)


def loss_fn(kind: str, model, x: torch.Tensor):
    """L1 (per-image sum) + 1e-6 KL through the model's own encode / sample / decode."""
    def fn():
        if kind == "diffusers":
            post = model.encode(x).latent_dist
            recon = model.decode(post.sample()).sample
        else:
            post = model.encode(x)
            recon = model.decode(post.sample())
        return (recon.float() - x).abs().flatten(1).sum(1).mean() + 1e-6 * post.kl().float().mean()
    return fn


def make_step(fn, model, precision: str):
    opt = adamw(model.parameters(), 1e-4, (0.9, 0.999), 0.01)  # fused where torch has it, the same for both

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext():
            loss = fn()
        loss.backward()
        opt.step()
    return step


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = STAGE_PRESETS[args.preset].model if args.preset in STAGE_PRESETS else AE_PRESETS[args.preset]
    x = torch.rand(args.batch, cfg.in_channels, 32, 32) * 2 - 1
    ours = AutoencoderKL(cfg)
    ref = make_diffusers(cfg)
    if count_params(ours) != count_params(ref):
        raise SystemExit(f"parameter counts differ: ldmkit {count_params(ours)}, diffusers {count_params(ref)}")
    models = {"ldmkit": ("ours", ours), "diffusers": ("diffusers", ref)}
    if args.channels_last:
        cl = copy.deepcopy(ours).to(memory_format=torch.channels_last)
        models["ldmkit-channels-last"] = ("ours", cl)
    if args.compile:  # torch.compile (inductor) of the whole loss function; compiling happens in the warm-up
        models["ldmkit-compiled"] = ("ours", copy.deepcopy(ours))
    clock = time.perf_counter
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "batch": args.batch,
              "preset": args.preset, "config": {k: (list(v) if isinstance(v, tuple) else v)
                                                for k, v in vars(cfg).items()},
              "machine": platform.processor() or platform.machine(), "loadavg_start": os.getloadavg(),
              "peak_gflops": measure_peak(clock), "precisions": {}}
    for precision in args.precision.split(","):
        raw = {name: loss_fn(kind, m, x) for name, (kind, m) in models.items()}  # FLOPs are counted on these
        fns = {name: torch.compile(f) if name == "ldmkit-compiled" else f for name, f in raw.items()}
        steps = {name: make_step(fns[name], models[name][1], precision) for name in models}
        times = time_interleaved(steps, clock, args.warmup, args.rounds)
        rows = {}
        for name, (_, m) in models.items():
            counter = FlopCounterMode(display=False)
            with counter:
                raw[name]().backward()
            flops = counter.get_total_flops()
            med = statistics.median(times[name])
            rows[name] = {"params": count_params(m), "ms_per_step": 1000 * med, "best_ms": 1000 * min(times[name]),
                          "img_per_s": args.batch / med, "gflop_per_step": flops / 1e9,
                          "achieved_gflops": flops / med / 1e9,
                          "peak_fraction": flops / med / 1e9 / result["peak_gflops"]["peak"]}
        for name in rows:
            if name != "diffusers":
                rows[name]["speedup_vs_diffusers"] = rows["diffusers"]["ms_per_step"] / rows[name]["ms_per_step"]
                # per round (the two steps run back to back, under the same machine state): median and quartiles
                paired = sorted(d / t for d, t in zip(times["diffusers"], times[name]))
                rows[name]["paired_speedup"] = {"median": statistics.median(paired),
                                                "q25": paired[len(paired) // 4], "q75": paired[3 * len(paired) // 4]}
        result["precisions"][precision] = rows
    result["loadavg_end"] = os.getloadavg()
    return result


def report(result: dict) -> None:
    pk = result["peak_gflops"]
    print(f"torch {result['torch']}, {result['threads']} threads, batch {result['batch']}, peak fp32 "
          f"{pk['peak']:.0f} GFLOP/s; load {result['loadavg_start'][0]:.1f} -> {result['loadavg_end'][0]:.1f}")
    for precision, rows in result["precisions"].items():
        for name, r in rows.items():
            extra = (f"  x{r['speedup_vs_diffusers']:.2f} vs diffusers (per round: median "
                     f"{r['paired_speedup']['median']:.2f}, quartiles {r['paired_speedup']['q25']:.2f}-"
                     f"{r['paired_speedup']['q75']:.2f})" if "speedup_vs_diffusers" in r else "")
            print(f"  [{precision}] {name:22s} {r['params'] / 1e6:.2f}M  {r['ms_per_step']:7.1f} ms/step "
                  f"(best {r['best_ms']:.1f})  {r['img_per_s']:5.0f} img/s  {r['gflop_per_step']:5.1f} GFLOP/step  "
                  f"{100 * r['peak_fraction']:.0f}% of peak{extra}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_autoencoder_speed", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="fashion-mnist", help="autoencoder stage or model preset")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="fp32,bf16", help="comma list of fp32, bf16 (bf16 = autocast)")
    p.add_argument("--channels-last", action="store_true", help="also time ldmkit's model in channels-last layout")
    p.add_argument("--compile", action="store_true", help="also time ldmkit's model under torch.compile")
    p.add_argument("--rounds", type=positive_int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=positive_int, default=1,
                   help="run the whole measurement this many times (the machine's speed drifts between runs); the "
                        "JSON then holds every run and the min / median / max speedup")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "autoencoder_speed.json"))
    args = p.parse_args(argv)
    if args.preset not in STAGE_PRESETS and args.preset not in AE_PRESETS:
        p.error(f"--preset {args.preset!r}: choose one of {sorted(set(STAGE_PRESETS) | set(AE_PRESETS))}")
    result = repeat_runs(lambda: run(args), report, args.repeats)
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
