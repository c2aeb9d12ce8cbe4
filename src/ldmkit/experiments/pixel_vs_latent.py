"""pixel-vs-latent: the same denoiser on 32x32 pixels and on 8x8x4 latents, at equal CPU time.

The fashion-mnist LDM preset's UNet is trained twice on Fashion-MNIST: on the bundled autoencoder's latents and on
the pixels themselves (the `pixels` autoencoder stage: the identity, with the pixels' scale), with the same CLIP
and nothing else changed. First the cost of one training step of each is measured (batch 128: one warm-up step,
then up to 5 timed steps or 10 s, random inputs: a step's cost does not depend on the data); then both get the same
wall-time budget (6 minutes), turned into a fixed number of steps from those costs so that each runs a whole
learning-rate schedule (warm-up and EMA scaled to it), and 300 images of each (30 per class, the pipeline's sampler,
steps and guidance) are judged by the frozen evaluation classifier. At 64x64 only the cost is measured: the
`shapes` LDM preset's UNet on 64x64x3 pixels against 16x16x8 latents, batch 64. Figures: ms per step at 32 and
64 beside the judged quality, and a sample grid of each.

Budget of the full run on 2 idle cores, from measured per-step costs: a latent step of this UNet at batch 128
takes ~0.23 s (the bundled denoiser's training log); a pixel step ~13x that, ~3 s (0.53 s against 6.7 s timed on
one thread beside another training run); at 64x64 the pixel step costs ~30x the latent one (1.0 s against 34 s,
one thread), and sampling a pixel image ~10x a latent one. Latent cache of the 60,000 training images ~1.3 min,
step timing ~1 min, training 2 x 6 min (and the pixel run's closing sample grid, ~0.5 min), sampling and judging
600 images ~2 min: about 17 minutes.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import torch

from ldmkit.experiments.common import (
    Context,
    Judge,
    assemble_pipeline,
    bundled_autoencoder,
    class_prompts,
    pyplot,
    result,
    save_figure,
    save_grid,
    stage_dir,
)

NAME = "pixel-vs-latent"
TITLE = "latent diffusion is cheaper than pixel diffusion"
CLAIM = ("diffusing in the autoencoder's small latent space instead of pixel space makes each training step far "
         "cheaper, so at equal compute the latent denoiser learns more and makes better images")

SPACES = ("latent", "pixels")
BUDGET_SECONDS = 360  # training wall time given to each denoiser in the full run
QUICK_DATA = 512      # training images in quick mode (the latent cache of all 60,000 takes a minute)


# ------------------------------------------------------------------- helpers (also used by the paradigms experiment)

def fashion_train(ctx: Context):
    """The Fashion-MNIST training split (its first 512 images in quick mode)."""
    from ldmkit.data import load_dataset
    return load_dataset("fashion-mnist", split="train", data_dir=ctx.data_dir,
                        **({"num": QUICK_DATA} if ctx.quick else {}))


def train_denoiser(ctx: Context, name: str, ds, ae_dir: Path, steps: int, overrides: tuple[str, ...] = ()) -> Path:
    """The fashion-mnist LDM preset trained for `steps` steps into work/NAME (resumed if interrupted), its warm-up
    and EMA half-life scaled from the preset's 4,300 steps; batch 128 (8 and a 2-step final grid in quick mode)."""
    from ldmkit.config import apply_overrides
    from ldmkit.train import ldm
    base = ldm.PRESETS["fashion-mnist"]
    ref = base.train
    cfg = apply_overrides(base, [
        f"train.steps={steps}", f"train.batch_size={ctx.n(ref.batch_size, 8)}",
        f"sample.steps={ctx.n(base.sample.steps, 2)}",  # the grid the run ends with
        f"train.warmup_steps={max(1, round(ref.warmup_steps * steps / ref.steps))}",
        f"train.ema_halflife_steps={max(1.0, round(ref.ema_halflife_steps * steps / ref.steps, 1))}",
        f"train.ckpt_every={max(1, steps // 4)}", f"train.log_every={max(1, steps // 10)}", "train.sample_every=0",
        *overrides])
    return stage_dir(ctx, name, lambda out, resume: ldm.train(
        cfg, out, "fashion-mnist", ds, str(ae_dir), str(ctx.pipeline / "clip"), resume=resume,
        progress=ctx.progress))


def pipeline_of(ctx: Context, name: str, ae_dir: Path, denoiser: Path) -> Path:
    return assemble_pipeline(ctx, name, {"autoencoder": ae_dir, "clip": ctx.pipeline / "clip", "denoiser": denoiser,
                                         "eval-classifier": ctx.pipeline / "eval-classifier"})


def sampled(ctx: Context, key: str) -> np.ndarray | None:
    path = ctx.work / "samples" / f"{key}.npz"
    if not path.exists():
        return None
    with np.load(path) as z:
        return z["images"]


def sample_and_score(ctx: Context, judge, pipe, key: str, prompts: list[str], labels: list[int], **kw) -> dict:
    """Judge's scores of one image per prompt (seed 0), with the sampling time; memoised by `key`, the images kept
    in work/samples/KEY.npz. `pipe` is a callable returning the loaded Pipeline (loaded only when needed), `judge`
    one returning the Judge; `kw` go to Pipeline.generate (steps, sampler)."""
    def compute():
        p = pipe()
        t = time.perf_counter()
        images = p.generate(prompts, guidance=p.guidance(), seed=0, progress=ctx.progress, micro_batch=64, **kw)
        seconds = time.perf_counter() - t
        path = ctx.work / "samples" / f"{key}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, images=images)
        ctx.log(f"{key}: {len(images)} images in {seconds:.0f} s")
        return {**judge().score(images, labels), "sample_seconds": round(seconds, 1)}
    return ctx.memo(key, compute)


def class_columns(images: np.ndarray, per_class: int, rows: int = 8) -> np.ndarray:
    """Images ordered class by class (per_class each) -> `rows` rows of one image per class."""
    rows = min(rows, per_class)
    return np.stack([images[c * per_class + j] for j in range(rows) for c in range(10)])


def step_ms(unet_cfg, shape: tuple[int, int, int], batch: int, max_steps: int = 5, max_seconds: float = 10.0) -> float:
    """Milliseconds per training step (flow loss, backward, clipping, AdamW, EMA) of a UNet on inputs of `shape`:
    one warm-up step, then timed steps until `max_steps` or `max_seconds` (at least one). Random inputs and
    conditions: the cost does not depend on the data."""
    from ldmkit.diffusion.objectives import training_loss
    from ldmkit.diffusion.unet import UNet
    from ldmkit.train import common
    from ldmkit.train.ldm import PRESETS
    torch.manual_seed(0)
    tc, objective = PRESETS["fashion-mnist"].train, PRESETS["fashion-mnist"].objective
    model = UNet(dataclasses.replace(unet_cfg, in_channels=shape[0], out_channels=shape[0]))
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = common.make_adamw(model.parameters(), tc)
    x, idx = torch.randn(batch, *shape), torch.arange(batch)
    cond = {"context": torch.zeros(batch, 1, unet_cfg.context_dim), "pooled": torch.randn(batch, unet_cfg.pooled_dim)}

    def one() -> float:
        t = time.perf_counter()
        training_loss(model, x, cond, idx, objective, 0).mean().backward()
        common.clip_grad(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        common.ema_update(ema, model, tc.ema_halflife_steps)
        return time.perf_counter() - t

    one()
    times: list[float] = []
    while not times or (len(times) < max_steps and sum(times) < max_seconds):
        times.append(one())
    return round(1000 * sum(times) / len(times), 1)


def stage_metric(stage: Path, key: str):
    from ldmkit.checkpoint import read_json
    v = read_json(stage / "metrics.json").get(key)
    return round(v, 4) if isinstance(v, float) else v


def lazy(fn):
    """fn() computed on the first call only."""
    box = []

    def get():
        if not box:
            box.append(fn())
        return box[0]
    return get


def log_axis(ax, values) -> bool:
    """A log y axis with plain tick labels when `values` span more than a decade (else it stays linear)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter
    if max(values) <= 10 * min(values):
        return False
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    return True


# ------------------------------------------------------------------------------------------------- the run

def _costs(ctx: Context, unet_cfg, shapes: dict[str, tuple[int, int, int]], batch: int) -> dict:
    out = {s: step_ms(unet_cfg, shp, batch, max_steps=ctx.n(5, 1)) for s, shp in shapes.items()}
    return {"ms_per_step": out, "batch": batch, "shapes": {s: list(v) for s, v in shapes.items()},
            "input_values": {s: int(np.prod(v)) for s, v in shapes.items()}, "threads": torch.get_num_threads(),
            "load_average": round(os.getloadavg()[0], 2)}


def run(ctx: Context) -> dict:
    from ldmkit.diffusion.unet import PRESETS as UNET_PRESETS
    from ldmkit.pipeline import Pipeline
    from ldmkit.stages import stage_config
    from ldmkit.train import autoencoder
    from ldmkit.train.ldm import PRESETS
    ds = fashion_train(ctx)
    ae = {"latent": bundled_autoencoder(ctx),
          "pixels": stage_dir(ctx, "autoencoder-pixels", lambda out, resume: autoencoder.train(
              autoencoder.PRESETS["pixels"], out, "fashion-mnist", ds, resume=resume, progress=ctx.progress))}
    cond = stage_config(ctx.pipeline / "denoiser", "ldm")["conditioning"]
    widths = {"context_dim": cond["context_dim"], "pooled_dim": cond["pooled_dim"]}
    unet32 = dataclasses.replace(PRESETS["fashion-mnist"].unet, **widths)
    unet64 = dataclasses.replace(UNET_PRESETS["shapes"], **widths)
    ctx.log("timing training steps at 32x32")
    shapes32 = {"latent": tuple(cond["latent_shape"]), "pixels": (1, 32, 32)}
    c32 = ctx.memo("cost-32", lambda: _costs(ctx, unet32, shapes32, ctx.n(128, 4)))
    ctx.log("timing training steps at 64x64")
    shapes64 = {"latent": (8, 16, 16), "pixels": (3, 64, 64)}
    c64 = ctx.memo("cost-64", lambda: _costs(ctx, unet64, shapes64, ctx.n(64, 2)))
    budget = ctx.n(BUDGET_SECONDS, 0)
    steps = {s: ctx.n(max(1, int(budget * 1000 / c32["ms_per_step"][s])), 3) for s in SPACES}
    ctx.log(f"equal budget of {budget} s: {steps['latent']} latent steps, {steps['pixels']} pixel steps")
    pipes = {s: pipeline_of(ctx, f"pipeline-{s}", ae[s], train_denoiser(ctx, f"denoiser-{s}", ds, ae[s], steps[s]))
             for s in SPACES}
    trained = {s: {k: stage_metric(ctx.work / f"denoiser-{s}", k) for k in ("train_seconds", "final_loss")}
               for s in SPACES}

    per_class = ctx.n(30, 2)
    prompts, labels = class_prompts(per_class)
    judge = lazy(lambda: Judge(ctx))
    quality = {}
    for s in SPACES:
        quality[s] = sample_and_score(ctx, judge, lazy(lambda s=s: Pipeline.load(pipes[s])), f"samples-{s}",
                                      prompts, labels, **({"steps": 2} if ctx.quick else {}))

    numbers = {"cost_32": c32, "cost_64": c64, "budget_seconds": budget, "train_steps": steps, "trained": trained,
               "quality": quality, "images_per_space": len(prompts),
               "ratio_32": round(c32["ms_per_step"]["pixels"] / c32["ms_per_step"]["latent"], 1),
               "ratio_64": round(c64["ms_per_step"]["pixels"] / c64["ms_per_step"]["latent"], 1)}
    figures = [_cost_figure(ctx, numbers)]
    for s in SPACES:
        images = sampled(ctx, f"samples-{s}")
        if images is not None:
            figures.append(save_grid(class_columns(images, per_class), ctx.figure(f"samples-{s}")))
    return result(ctx, numbers, _verdict(numbers), figures)


def _verdict(n: dict) -> str:
    q, c32, c64 = n["quality"], n["cost_32"]["ms_per_step"], n["cost_64"]["ms_per_step"]
    cheaper = c32["latent"] < c32["pixels"] and c64["latent"] < c64["pixels"]
    better_fd = q["latent"]["fd"] < q["pixels"]["fd"]
    better_acc = q["latent"]["accuracy"] >= q["pixels"]["accuracy"]
    wider = "a wider" if n["ratio_64"] > n["ratio_32"] else "no wider"
    facts = (f"a training step costs {c32['latent']:.0f} ms on the latents against {c32['pixels']:.0f} ms on the "
             f"pixels ({n['ratio_32']}x; at 64x64 {c64['latent']:.0f} against {c64['pixels']:.0f} ms, "
             f"{n['ratio_64']}x, {wider} gap); in the same {n['budget_seconds'] / 60:g} minutes the latent denoiser "
             f"took {n['train_steps']['latent']} steps and the pixel one {n['train_steps']['pixels']}, and their "
             f"samples score FD {q['latent']['fd']:.2f} against {q['pixels']['fd']:.2f}, accuracy "
             f"{q['latent']['accuracy']:.1%} against {q['pixels']['accuracy']:.1%}")
    if cheaper and better_fd and better_acc:
        return f"holds: {facts}"
    failed = [w for ok, w in ((cheaper, "the latent step is not cheaper at both sizes"),
                              (better_fd, "the pixel samples have the lower FD"),
                              (better_acc, "the pixel samples are recognised more often")) if not ok]
    return f"does not hold here ({'; '.join(failed)}): {facts}"


def _cost_figure(ctx: Context, n: dict) -> Path:
    """ms per training step at 32 and 64 pixels (log scale), and the judged quality at equal CPU time."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1.6, 1, 1]})
    colors = {"latent": "tab:blue", "pixels": "tab:orange"}
    x = np.arange(2)
    for i, s in enumerate(SPACES):
        vals = [n["cost_32"]["ms_per_step"][s], n["cost_64"]["ms_per_step"][s]]
        bars = axes[0].bar(x + (i - 0.5) * 0.38, vals, 0.38, color=colors[s], label=s)
        axes[0].bar_label(bars, [f"{v:.0f}" for v in vals], fontsize=8)
    ms = [v for c in ("cost_32", "cost_64") for v in n[c]["ms_per_step"].values()]
    if log_axis(axes[0], ms):
        axes[0].set_ylim(bottom=min(ms) / 2)
    axes[0].set_xticks(x, [f"32x32 (batch {n['cost_32']['batch']})\nlatent 4x8x8 vs pixels 1x32x32",
                           f"64x64 (batch {n['cost_64']['batch']})\nlatent 8x16x16 vs pixels 3x64x64"], fontsize=8)
    axes[0].set_ylabel("ms per training step" + (" (log)" if axes[0].get_yscale() == "log" else ""))
    axes[0].legend(fontsize=8)
    axes[0].set_title("cost of one training step", fontsize=10)
    for ax, key, label in ((axes[1], "accuracy", "accuracy (higher is better)"),
                           (axes[2], "fd", "FD (lower is better)")):
        vals = [n["quality"][s][key] for s in SPACES]
        bars = ax.bar(SPACES, vals, color=[colors[s] for s in SPACES])
        ax.bar_label(bars, [f"{v:.3g}" for v in vals], fontsize=8)
        ax.set_title(label, fontsize=10)
    axes[1].set_ylim(0, 1)
    fig.suptitle(f"equal training time ({n['budget_seconds'] / 60:g} min): {n['train_steps']['latent']} latent "
                 f"steps, {n['train_steps']['pixels']} pixel steps; {n['images_per_space']} images each", fontsize=10)
    return save_figure(ctx, fig, "cost")


def section(res: dict, rel) -> str:
    n = res["numbers"]
    c32, c64, q, t = n["cost_32"], n["cost_64"], n["quality"], n["trained"]
    rows = [("input values per image", *(f"{c32['input_values'][s]:,}" for s in SPACES)),
            (f"ms per training step (batch {c32['batch']})", *(f"{c32['ms_per_step'][s]:.0f}" for s in SPACES)),
            ("training steps in the budget", *(f"{n['train_steps'][s]:,}" for s in SPACES)),
            ("training seconds, measured", *(f"{t[s]['train_seconds']}" for s in SPACES)),
            ("accuracy (evaluation classifier)", *(f"{q[s]['accuracy']:.1%}" for s in SPACES)),
            ("FD (lower is better)", *(f"{q[s]['fd']:.2f}" for s in SPACES)),
            ("precision / recall", *(f"{q[s]['precision']:.2f} / {q[s]['recall']:.2f}" for s in SPACES)),
            ("within-class diversity (real = 1)", *(f"{q[s]['diversity']:.2f}" for s in SPACES)),
            ("seconds to sample them", *(f"{q[s]['sample_seconds']}" for s in SPACES))]
    table = ("| at 32x32 | latent (4x8x8) | pixels (1x32x32) |\n| --- | --- | --- |\n"
             + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows))
    rows64 = [("input values per image", *(f"{c64['input_values'][s]:,}" for s in SPACES)),
              (f"ms per training step (batch {c64['batch']})", *(f"{c64['ms_per_step'][s]:.0f}" for s in SPACES))]
    table64 = ("| at 64x64, `shapes` UNet | latent (8x16x16) | pixels (3x64x64) |\n| --- | --- | --- |\n"
               + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows64))
    grids = "".join(f"\n\n{s} samples (one column per class):\n\n![{s} samples]({rel}/{f})"
                    for s, f in zip(SPACES, res["figures"][1:]))
    return (f"The fashion-mnist UNet trained for the same {n['budget_seconds'] / 60:g} minutes of CPU time on the "
            f"bundled autoencoder's latents and on the pixels (the step counts come from the measured cost of a "
            f"step, {_timing_note(res)}), then {n['images_per_space']} images of each judged at the pipeline's "
            f"sampler and guidance. A pixel step costs {n['ratio_32']}x a latent one at 32x32 and {n['ratio_64']}x "
            f"at 64x64.\n\n{table}\n\n{table64}\n\n![cost and quality]({rel}/{res['figures'][0]}){grids}")


def _timing_note(res: dict) -> str:
    c = res["numbers"]["cost_32"]
    return f"{c['threads']} torch threads, load average {c['load_average']} while timing"
