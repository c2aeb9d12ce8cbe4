"""guidance: classifier-free guidance trades diversity for fidelity, and the null condition must be trained.

Four denoisers are trained here from the bundled autoencoder and CLIP with the fashion-mnist LDM preset at one short
fixed budget (600 steps of batch 128, warmup and EMA half-life scaled down to it), differing only in the
condition-dropout rate p_uncond (0, 0.1, 0.2, 0.5). Each is sampled at guidance scales w = 0, 1, 2, 3, 5, 8 (w = 1 is
the conditional model, w = 0 the unconditional one) with 30 images per class (300 a point, plain CFG, no rescale)
and judged by the frozen evaluation classifier: class accuracy, FD, precision, recall and within-class diversity.
The bundled pipeline is swept on the same axes with plain CFG and with each variant alone: guidance rescale
phi = 0.7, the guidance interval sigma in (0.3, 5], and adaptive projected guidance (APG, the paper's defaults).
Figures: the four measures against w, one line per p_uncond; the same for the variants; sample grids (rows = w).

Full run, estimated from a training step of 0.22 s and ~40 images/s with CFG on 2 idle cores: encoding the 60,000
training images once ~1.5 min, training 4 x 600 steps ~9 min, sampling 42 points ~5 min, scoring ~1 min: ~17 min.
"""

from __future__ import annotations

import functools
import time

import numpy as np

from ldmkit.experiments.common import (
    Context,
    Judge,
    assemble_pipeline,
    bundled_autoencoder,
    class_prompts,
    pyplot,
    result,
    save_grid,
    stage_dir,
)

NAME = "guidance"
TITLE = "guidance trades diversity for fidelity"
CLAIM = ("classifier-free guidance (w > 1) raises fidelity to the prompt at the cost of diversity, and needs a "
         "denoiser trained with condition dropout")

P_UNCOND = (0.0, 0.1, 0.2, 0.5)
SCALES = (0.0, 1.0, 2.0, 3.0, 5.0, 8.0)
TRAIN_STEPS = 600
VARIANTS = {"cfg": {}, "rescale 0.7": {"rescale": 0.7}, "interval (0.3, 5]": {"interval": (0.3, 5.0)},
            "apg": {"mode": "apg"}}
MEASURES = (("accuracy", "class accuracy"), ("fd", "FD (lower is better)"), ("recall", "recall"),
            ("diversity", "within-class diversity (real = 1)"))
METRICS = ("accuracy", "fd", "precision", "recall", "diversity")


def scored_point(ctx: Context, key: str, judge, make, labels, per_class: int) -> dict:
    """One memoised point: `make()` -> (uint8 images, extra numbers), timed and scored; the first image of each class
    is kept in work/samples/KEY.npy for the sample grids."""
    def fn():
        start = time.perf_counter()
        images, extra = make()
        seconds = time.perf_counter() - start
        (ctx.work / "samples").mkdir(exist_ok=True)
        np.save(ctx.work / "samples" / f"{key}.npy", images[::per_class])
        return {**judge().score(images, labels), "seconds_per_image": round(seconds / len(images), 4), **extra}
    point = ctx.memo(key, fn)
    ctx.log(f"{key}: accuracy {point['accuracy']:.3f}, FD {point['fd']:.3f}, recall {point['recall']:.3f}, "
            f"diversity {point['diversity']:.3f}")
    return point


def sample_rows(ctx: Context, keys: list[str]) -> np.ndarray:
    return np.concatenate([np.load(ctx.work / "samples" / f"{k}.npy") for k in keys])


def _train_denoiser(ctx: Context, p: float):
    """fit(out, resume) of a denoiser with condition dropout p: the fashion-mnist preset at the short budget."""
    def fit(out, resume):
        from ldmkit.config import apply_overrides
        from ldmkit.data import load_dataset
        from ldmkit.train import ldm
        ae = bundled_autoencoder(ctx)  # the latent cache is written beside it, not into the bundle
        cfg = apply_overrides(ldm.PRESETS["fashion-mnist"], [  # same budget for every p
            f"objective.p_uncond={p}", f"train.steps={ctx.n(TRAIN_STEPS, 3)}",
            f"train.warmup_steps={ctx.n(20, 1)}", f"train.ema_halflife_steps={ctx.n(30, 1)}",
            f"train.ckpt_every={ctx.n(200, 1000)}", f"train.log_every={ctx.n(100, 10)}",
            f"train.batch_size={ctx.n(128, 16)}", f"sample.steps={ctx.n(20, 1)}"])  # sample.*: its end-of-run grid
        ds = load_dataset("fashion-mnist", split="train", data_dir=ctx.data_dir, **({"num": 256} if ctx.quick else {}))
        ldm.train(cfg, out, "fashion-mnist", ds, str(ae), str(ctx.pipeline / "clip"), resume=resume,
                  progress=ctx.progress)
    return fit


def _guidance(pipe, w: float, variant: dict):
    return pipe.guidance(w, **{"rescale": 0.0, **variant})  # plain CFG unless the variant sets phi


def run(ctx: Context) -> dict:
    from ldmkit.pipeline import Pipeline
    from ldmkit.stages import stage_config
    per = ctx.n(30, 2)
    scales = SCALES if not ctx.quick else (1.0, 3.0)
    steps = ctx.n(20, 4)
    prompts, labels = class_prompts(per)
    judge = functools.cache(lambda: Judge(ctx))

    def curve(pipe_fn, tag: str, variant: dict, ws) -> list[dict]:
        def point(w):
            # at w <= 1 no variant acts (nothing is guided): those points are plain CFG's, sampled once
            key = f"{tag}-w{w:g}" if w > 1 or not variant else f"{tag.split('-')[0]}-cfg-w{w:g}"

            def make():
                pipe = pipe_fn()
                return pipe.generate(prompts, guidance=_guidance(pipe, w, variant), steps=steps, seed=0,
                                     progress=False, micro_batch=64), {}
            return {"w": w, "key": key, **scored_point(ctx, key, judge, make, labels, per)}
        return [point(w) for w in ws]

    trained = {}
    for p in P_UNCOND:
        name = f"p{p:g}"
        den = stage_dir(ctx, f"denoiser-{name}", _train_denoiser(ctx, p))
        root = assemble_pipeline(ctx, f"pipeline-{name}", {"autoencoder": ctx.pipeline / "autoencoder",
                                                           "clip": ctx.pipeline / "clip", "denoiser": den,
                                                           "eval-classifier": ctx.pipeline / "eval-classifier"})
        trained[f"{p:g}"] = curve(functools.cache(lambda root=root: Pipeline.load(root)), name, {}, scales)
    bundled = functools.cache(lambda: Pipeline.load(ctx.pipeline))
    variants = {v: curve(bundled, f"bundled-{v.split()[0]}", kw, scales if not kw else [w for w in scales if w >= 1])
                for v, kw in VARIANTS.items()}
    floors = {k: trained["0.1"][0][k] for k in ("fd_floor", "recall_floor", "accuracy_floor")}
    base = stage_config(ctx.pipeline / "denoiser", "ldm")
    numbers = {"p_uncond": trained, "variants": variants, "scales": list(scales), "images_per_point": len(prompts),
               "sampling_steps": steps, "train_steps": ctx.n(TRAIN_STEPS, 3), "train_batch": ctx.n(128, 16),
               "bundled": {"p_uncond": base["objective"]["p_uncond"], "train_steps": base["train"]["steps"],
                           "train_batch": base["train"]["batch_size"]},
               "floors": floors, "claim": _claim(trained)}
    figures = [_plot(ctx, trained, "p_uncond", "p_uncond = {}", floors),
               _plot(ctx, variants, "variants", "{}", floors),
               save_grid(sample_rows(ctx, [pt["key"] for pt in trained["0.1"]]), ctx.figure("samples-p0.1")),
               save_grid(sample_rows(ctx, [pt["key"] for pt in variants["cfg"]]), ctx.figure("samples-bundled"))]
    return result(ctx, numbers, _verdict(numbers), figures)


def _claim(trained: dict) -> dict:
    """The test on the p_uncond = 0.1 model: from w = 1 to the w of best accuracy (w >= 1), do diversity and recall
    fall while accuracy rises?"""
    pts = [pt for pt in trained["0.1"] if pt["w"] >= 1]
    w1 = next(pt for pt in pts if pt["w"] == 1)
    best = max(pts, key=lambda pt: (pt["accuracy"], -pt["w"]))
    out = {"model": "p_uncond = 0.1", "best_w": best["w"]}
    for k in METRICS:
        out[f"{k}_w1"], out[f"{k}_best"] = w1[k], best[k]
    out["holds"] = bool(best["w"] > 1 and best["accuracy"] > w1["accuracy"] and best["diversity"] < w1["diversity"]
                        and best["recall"] < w1["recall"])
    return out


def _at(curve: list[dict], w: float) -> dict | None:
    return next((pt for pt in curve if pt["w"] == w), None)


def _verdict(n: dict) -> str:
    c, tr = n["claim"], n["p_uncond"]
    head = (f"{'holds' if c['holds'] else 'does not hold here'}: with p_uncond = 0.1, accuracy goes "
            f"{c['accuracy_w1']:.1%} at w = 1 -> {c['accuracy_best']:.1%} at its best w = {c['best_w']:g}, "
            f"within-class diversity {c['diversity_w1']:.3f} -> {c['diversity_best']:.3f}, recall "
            f"{c['recall_w1']:.3f} -> {c['recall_best']:.3f}")
    w_hi = max(n["scales"])
    z0, z1 = _at(tr["0"], 0.0), _at(tr["0.1"], 0.0)
    hi0, hi1 = _at(tr["0"], w_hi), _at(tr["0.1"], w_hi)
    tail = ("; p_uncond = 0 (its null condition never trained): "
            + (f"its 'unconditional' model (w = 0) reaches accuracy {z0['accuracy']:.1%} and FD {z0['fd']:.2f} "
               f"(p_uncond = 0.1: {z1['accuracy']:.1%}, {z1['fd']:.2f}), and " if z0 and z1 else "")
            + f"at w = {w_hi:g} accuracy {hi0['accuracy']:.1%} and FD {hi0['fd']:.2f} against p_uncond = 0.1's "
              f"{hi1['accuracy']:.1%} and {hi1['fd']:.2f}")
    return head + tail


def _plot(ctx: Context, curves: dict, suffix: str, label: str, floors: dict):
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    ref = {"accuracy": floors["accuracy_floor"], "fd": floors["fd_floor"], "recall": floors["recall_floor"],
           "diversity": 1.0}
    for ax, (key, title) in zip(axes, MEASURES):
        for name, pts in curves.items():
            ax.plot([pt["w"] for pt in pts], [pt[key] for pt in pts], marker="o", label=label.format(name))
        ax.axhline(ref[key], color="grey", linestyle=":", linewidth=1, label="real images")
        ax.axvline(1.0, color="grey", linestyle="--", linewidth=0.6)
        ax.set_xlabel("guidance scale w (1 = conditional)")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = ctx.figure(suffix)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _table(curves: dict, label: str, scales) -> str:
    head = f"| {label} | " + " | ".join(f"w = {w:g}" for w in scales) + " |\n| --- |" + " --- |" * len(scales) + "\n"
    rows = [f"| {name} | " + " | ".join(_cell(_at(pts, w)) for w in scales) + " |" for name, pts in curves.items()]
    return head + "\n".join(rows)


def _cell(pt: dict | None) -> str:
    return f"{pt['accuracy']:.2f} / {pt['fd']:.2f} / {pt['recall']:.2f} / {pt['diversity']:.2f}" if pt else ""


def section(res: dict, rel) -> str:
    n, f = res["numbers"], res["figures"]
    fl, b = n["floors"], n["bundled"]
    models = _table({f"p_uncond = {k}": v for k, v in n["p_uncond"].items()}, "model", n["scales"])
    variants = _table(n["variants"], "guidance", n["scales"])
    return (f"{n['images_per_point']} images a point ({n['images_per_point'] // 10} per class, {n['sampling_steps']} "
            f"DPM++ 2M steps), scored by the frozen evaluation classifier; real training images of the same count "
            f"score FD {fl['fd_floor']:.3f} and recall {fl['recall_floor']:.3f}, and real test images accuracy "
            f"{fl['accuracy_floor']:.1%}. Each cell: accuracy / FD / recall / within-class diversity.\n\n"
            f"Denoisers trained here for {n['train_steps']} steps (batch {n['train_batch']}) with condition dropout "
            f"p_uncond, plain CFG:\n\n{models}\n\n"
            f"![measures against w, one line per p_uncond]({rel}/{f[0]})\n\n"
            f"The bundled pipeline (its denoiser trained with p_uncond = {b['p_uncond']:g} for {b['train_steps']} "
            f"steps of batch {b['train_batch']}), plain CFG and each variant alone:\n\n{variants}\n\n"
            f"![measures against w, one line per variant]({rel}/{f[1]})\n\n"
            f"Samples of the p_uncond = 0.1 model (rows: w = {', '.join(f'{w:g}' for w in n['scales'])}; columns: "
            f"the ten classes):\n\n![samples p_uncond 0.1]({rel}/{f[2]})\n\n"
            f"The same rows from the bundled pipeline:\n\n![samples bundled]({rel}/{f[3]})")
