"""Training-step speed of the denoiser backbones against diffusers' UNet2DConditionModel at matched size.

One training step = forward + backward + AdamW step on a batch of 4x8x8 latents with text conditioning
(T tokens with a padding mask). Models are timed in interleaved rounds so a change in machine load hits all of
them alike; the report gives the median (and best) ms per step, images/s, parameter counts, FLOPs per step
(forward + backward, counted with torch.utils.flop_counter; the optimizer is not counted), the achieved FLOP/s and
its fraction of this machine's measured fp32 peak (the faster of torch.mm and F.linear at 2048x2048, measured in
the same run). The load average is recorded: other processes on the machine slow every model.

Reference models: "diffusers" is the layout used in DESIGN.md section 6 (two levels, CrossAttn blocks at both,
block_out_channels (c0, 2 c0), layers_per_block=1); "diffusers-same-layout" mirrors our UNet preset's levels, width
multipliers and attention placement. For both, c0 is chosen to match our UNet preset's parameter count.

    python benchmarks/bench_backbone_speed.py [--batch 128] [--threads 2] [--precision fp32,bf16] [--repeats N]
        [--out PATH]
    python benchmarks/bench_backbone_speed.py --threads 1 --clock cpu --out benchmarks/results/backbone_speed_cpu1.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ldmkit.diffusion.dit import PRESETS as DIT_PRESETS
from ldmkit.diffusion.dit import DiT
from ldmkit.diffusion.unet import PRESETS as UNET_PRESETS
from ldmkit.diffusion.unet import UNet
from ldmkit.nn import count_params


def measure_peak(clock, reps: int = 5) -> dict:
    """fp32 GFLOP/s of a 2048^3 product through torch.mm (MKL) and F.linear (oneDNN where available)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    out = {}
    for name, fn in (("mm", lambda: torch.mm(a, b)), ("linear", lambda: F.linear(a, b))):
        fn()
        best = min(_timed(fn, clock) for _ in range(reps))
        out[name] = 2 * 2048 ** 3 / best / 1e9
    out["peak"] = max(out["mm"], out["linear"])
    return out


def _timed(fn, clock) -> float:
    t0 = clock()
    fn()
    return clock() - t0


def positive_int(text: str) -> int:
    """argparse type for counts such as --rounds and --repeats: an int >= 1."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return n


def write_result(result: dict, path) -> None:
    """The benchmark's JSON at `path` (folders created), and say so."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def repeat_runs(run, report, repeats: int) -> dict:
    """`run()` `repeats` times (the machine's speed drifts between runs), `report` each result -> the single result,
    or {"runs": [...], "speedup_summary": {precision: {model: {key: per_run, min, median, max}}}} over every
    `speedup_vs_*` figure, printed as min / median / max."""
    runs = []
    for i in range(repeats):
        if repeats > 1:
            print(f"run {i + 1} of {repeats}")
        runs.append(run())
        report(runs[-1])
    if repeats == 1:
        return runs[0]
    summary = {}
    for precision, rows in runs[0]["precisions"].items():
        for name, row in rows.items():
            for key in (k for k in row if k.startswith("speedup_vs_")):
                per_run = [r["precisions"][precision][name][key] for r in runs]
                summary.setdefault(precision, {}).setdefault(name, {})[key] = {
                    "per_run": per_run, "min": min(per_run), "median": statistics.median(per_run),
                    "max": max(per_run)}
                print(f"  [{precision}] {name} {key[11:]}: x{min(per_run):.2f} / {statistics.median(per_run):.2f} / "
                      f"{max(per_run):.2f} (min / median / max of {repeats} runs)")
    return {"runs": runs, "speedup_summary": summary}


def time_interleaved(steps: dict, clock, warmup: int, rounds: int) -> dict[str, list[float]]:
    """Each step function `warmup` times, then `rounds` rounds of one call each, interleaved so that a change in
    machine load hits every model alike, in reversed order every other round so that no model always runs right
    after the same one -> {name: [seconds per call]}."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in steps}
    order = list(steps.items())
    for r in range(rounds):
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            times[name].append(_timed(fn, clock))
    return times


def make_diffusers(widths, attention, layers: int, context_dim: int, groups: int):
    from diffusers import UNet2DConditionModel

    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=layers, block_out_channels=tuple(widths),
        down_block_types=down, up_block_types=up, cross_attention_dim=context_dim,
        attention_head_dim=tuple(max(1, w // 64) for w in widths), norm_num_groups=groups,
        mid_block_type="UNetMidBlock2DCrossAttn")


def match_diffusers(target: int, mults, attention, context_dim: int):
    """Widths c0 * mults (c0 a multiple of 4, GroupNorm 4) whose diffusers model is closest to `target` params."""
    best = None
    for c0 in range(16, 257, 4):
        widths = tuple(c0 * m for m in mults)
        with torch.device("meta"):
            n = count_params(make_diffusers(widths, attention, 1, context_dim, 4))
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (widths, n)
        if n > target:
            break
    return best


def make_batch(batch: int, tokens: int, context_dim: int, pooled_dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, tokens + 1, (batch,), generator=g)
    return {
        "x": torch.randn(batch, 4, 8, 8, generator=g),
        "t": torch.rand(batch, generator=g) * 1000,
        "context": torch.randn(batch, tokens, context_dim, generator=g),
        "mask": torch.arange(tokens)[None] < lengths[:, None],  # (B, T) True = real token
        "pooled": torch.randn(batch, pooled_dim, generator=g),
        "target": torch.randn(batch, 4, 8, 8, generator=g),
    }


def forward_fn(kind: str, model, b):
    if kind == "diffusers":
        bias = b["mask"]  # diffusers turns a bool/0-1 mask into an additive bias itself
        return lambda: model(b["x"], b["t"], encoder_hidden_states=b["context"], encoder_attention_mask=bias).sample
    return lambda: model(b["x"], b["t"], b["context"], b["mask"], b["pooled"])


def make_step(model, fwd, target, precision: str):
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    except (RuntimeError, TypeError):  # fused AdamW unavailable on this build
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            y = fwd()
        F.mse_loss(y.float(), target).backward()
        opt.step()

    return step


def count_step_flops(fwd, target) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        F.mse_loss(fwd().float(), target).backward()
    return counter.get_total_flops()


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    ucfg, dcfg = UNET_PRESETS[args.unet], DIT_PRESETS[args.dit]
    b = make_batch(args.batch, args.tokens, ucfg.context_dim, ucfg.pooled_dim)
    models = {"ldmkit-unet": ("ours", UNet(ucfg)), "ldmkit-dit": ("ours", DiT(dcfg))}
    target = count_params(models["ldmkit-unet"][1])
    dw, _ = match_diffusers(target, (1, 2), (True, True), ucfg.context_dim)
    models["diffusers"] = ("diffusers", make_diffusers(dw, (True, True), 1, ucfg.context_dim, 4))
    sw, _ = match_diffusers(target, ucfg.channel_mults, ucfg.attention_levels, ucfg.context_dim)
    models["diffusers-same-layout"] = ("diffusers", make_diffusers(sw, ucfg.attention_levels, 1, ucfg.context_dim, 4))
    configs = {"diffusers": {"block_out_channels": dw, "cross_attention_levels": [True, True]},
               "diffusers-same-layout": {"block_out_channels": sw,
                                         "cross_attention_levels": list(ucfg.attention_levels)}}

    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "batch": args.batch,
              "tokens": args.tokens, "latent": [4, 8, 8], "machine": platform.processor() or platform.machine(),
              "clock": args.clock, "loadavg_start": os.getloadavg(), "peak_gflops": measure_peak(clock),
              "precisions": {}}
    for precision in args.precision.split(","):
        steps = {name: make_step(m, forward_fn(kind, m, b), b["target"], precision) for name, (kind, m) in
                 models.items()}
        times = time_interleaved(steps, clock, args.warmup, args.rounds)
        rows = {}
        for name, (kind, m) in models.items():
            flops = count_step_flops(forward_fn(kind, m, b), b["target"])
            med = statistics.median(times[name])
            rows[name] = {"params": count_params(m), "ms_per_step": 1000 * med, "best_ms": 1000 * min(times[name]),
                          "img_per_s": args.batch / med, "gflop_per_step": flops / 1e9,
                          "achieved_gflops": flops / med / 1e9,
                          "peak_fraction": flops / med / 1e9 / result["peak_gflops"]["peak"],
                          **configs.get(name, {})}
        for ref in ("diffusers", "diffusers-same-layout"):
            rows["ldmkit-unet"][f"speedup_vs_{ref}"] = rows[ref]["ms_per_step"] / rows["ldmkit-unet"]["ms_per_step"]
        result["precisions"][precision] = rows
    result["loadavg_end"] = os.getloadavg()
    result["presets"] = {"unet": args.unet, "dit": args.dit}
    return result


def print_report(result: dict) -> None:
    pk = result["peak_gflops"]
    print(f"torch {result['torch']}, {result['threads']} threads, {result['clock']} clock, batch {result['batch']}, "
          f"{result['tokens']} tokens; "
          f"peak fp32 {pk['peak']:.0f} GFLOP/s (mm {pk['mm']:.0f}, linear {pk['linear']:.0f}); "
          f"load {result['loadavg_start'][0]:.1f} -> {result['loadavg_end'][0]:.1f}")
    for precision, rows in result["precisions"].items():
        print(f"[{precision}]")
        for name, r in rows.items():
            extra = "".join(f"  {k[11:]} x{v:.2f}" for k, v in r.items() if k.startswith("speedup_vs_"))
            print(f"  {name:22s} {r['params'] / 1e6:5.2f}M params  {r['ms_per_step']:7.1f} ms/step "
                  f"(best {r['best_ms']:.1f})  {r['img_per_s']:6.0f} img/s  {r['gflop_per_step']:5.1f} GFLOP/step  "
                  f"{r['achieved_gflops']:5.0f} GFLOP/s ({100 * r['peak_fraction']:.0f}% of peak){extra}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_backbone_speed", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--tokens", type=int, default=32, help="text tokens per example (CLIP text max_length)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="fp32", help="comma list of fp32, bf16 (bf16 = autocast)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu = this process's CPU time; use with --threads 1 on a machine shared with other jobs, "
                        "where wall time mostly measures the other jobs (and 2-thread barriers wait for them)")
    p.add_argument("--rounds", type=positive_int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--unet", default="fashion-mnist", choices=sorted(UNET_PRESETS))
    p.add_argument("--dit", default="fashion-mnist", choices=sorted(DIT_PRESETS))
    p.add_argument("--repeats", type=positive_int, default=1,
                   help="run the whole measurement this many times; the JSON then holds every run and the min / "
                        "median / max of each speedup")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "backbone_speed.json"))
    args = p.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu counts every thread's time (spin-waits included); use it with --threads 1")
    for prec in args.precision.split(","):
        if prec not in ("fp32", "bf16"):
            p.error(f"--precision {prec!r}: use fp32 or bf16 (fp16 runs at ~1 GFLOP/s on CPU)")
    write_result(repeat_runs(lambda: run(args), print_report, args.repeats), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
