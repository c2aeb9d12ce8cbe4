"""classifier-vs-free: classifier-free guidance against classifier guidance, at the same accuracy and by their cost.

On the bundled pipeline, classifier guidance (the noise-aware latent classifier's gradient, scales s = 0.5 .. 16, on
the unconditional model) and classifier-free guidance (w = 0.5 .. 5, plain, no rescale) each sample 64 images per
class (640 a point, 20 DPM++ 2M steps); both curves start from the unconditional model (w = 0, s = 0). The frozen
evaluation classifier gives accuracy, FD, precision, recall and within-class diversity; forward hooks count the rows
each network evaluates per image (denoiser; classifier forward, and backward for its gradient) and each point is
timed. The unconditional model is sampled with the empty prompt at w = 1, which gives the same images as w = 0 with
the class prompts while evaluating the denoiser once a step instead of twice, so classifier guidance is not charged
for a conditional branch it does not use. FD and diversity are interpolated along each curve at common accuracy
levels (linear in accuracy, within the range both reach). Beside them: the implicit classifier of CFG (which class
prompt denoises a test latent best) against the noise-aware classifier on the same noised latents of 500 test
images, at a low (sigma 0.25) and a mid (sigma 1) noise level, 4 noise draws each.

Full run, estimated from ~40 images/s with CFG on 2 idle cores (classifier guidance costs about as much): 13 points of
640 images ~4 min, scoring ~0.5 min, the implicit classifier (40,000 denoiser rows) ~0.5 min: ~5 min.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ldmkit.experiments.common import Context, Judge, class_prompts, pyplot, result, save_grid
from ldmkit.experiments.guidance import sample_rows, scored_point

NAME = "classifier-vs-free"
TITLE = "guidance without a classifier"
CLAIM = ("classifier-free guidance reaches the accuracy of classifier guidance with as good FD and diversity, "
         "without training or running a separate noise-aware classifier")

CFG_SCALES = (0.5, 1.0, 1.5, 2.0, 3.0, 5.0)
CLASSIFIER_SCALES = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
LEVELS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
SIGMAS = (0.25, 1.0)


class Counter:
    """Rows each network evaluates while active (forward hooks): the denoiser, the classifier forward, and the
    classifier forwards made for a gradient (each followed by one backward through it)."""

    def __init__(self, pipe):
        self.pipe, self.rows = pipe, {"denoiser": 0, "classifier_forward": 0, "classifier_backward": 0}

    def _denoiser(self, module, args, out):
        self.rows["denoiser"] += args[0].shape[0]

    def _classifier(self, module, args, out):
        self.rows["classifier_forward"] += args[0].shape[0]
        if torch.is_grad_enabled() and args[0].requires_grad:
            self.rows["classifier_backward"] += args[0].shape[0]

    def __enter__(self):
        self.handles = [self.pipe.backbone.register_forward_hook(self._denoiser),
                        self.pipe.classifier.register_forward_hook(self._classifier)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def per_image(self, n: int) -> dict:
        return {f"{k}_per_image": round(v / n, 2) for k, v in self.rows.items()}


def run(ctx: Context) -> dict:
    from ldmkit.pipeline import Pipeline
    pipe = Pipeline.load(ctx.pipeline)
    if pipe.classifier is None:
        raise ValueError(f"{ctx.pipeline} has no noise-aware classifier (classifier/), which classifier guidance needs")
    per = ctx.n(64, 2)  # 64 per class: every batch of 64 fills whole network calls, so the row counts are exact
    steps = ctx.n(20, 4)
    prompts, labels = class_prompts(per)
    judge = functools.cache(lambda: Judge(ctx))

    def point(key: str, rows: list[str], g) -> dict:
        def make():
            with Counter(pipe) as count:
                images = pipe.generate(rows, guidance=g, class_labels=labels, steps=steps, seed=0, progress=False,
                                       micro_batch=64)
            return images, count.per_image(len(rows))
        return scored_point(ctx, key, judge, make, labels, per)

    uncond = point("uncond", [""] * len(prompts), pipe.guidance(1.0))
    cfg_scales = CFG_SCALES if not ctx.quick else (1.0, 3.0)
    clf_scales = CLASSIFIER_SCALES if not ctx.quick else (1.0, 8.0)
    cfg = [{"scale": 0.0, **uncond}] + [
        {"scale": w, **point(f"cfg-w{w:g}", prompts, pipe.guidance(w, rescale=0.0))} for w in cfg_scales]
    clf = [{"scale": 0.0, **uncond}] + [
        {"scale": s, **point(f"classifier-s{s:g}", [""] * len(prompts), pipe.guidance(1.0, classifier_scale=s))}
        for s in clf_scales]
    implicit = ctx.memo("implicit", lambda: _implicit(ctx, pipe))
    numbers = {"cfg": cfg, "classifier": clf, "matched": matched(cfg, clf), "implicit": implicit,
               "images_per_point": len(prompts), "sampling_steps": steps,
               "params": {"denoiser": sum(p.numel() for p in pipe.backbone.parameters()),
                          "classifier": sum(p.numel() for p in pipe.classifier.parameters())},
               "floors": {k: uncond[k] for k in ("fd_floor", "recall_floor", "accuracy_floor")}}
    keys = ["uncond", "cfg-w1", f"cfg-w{cfg_scales[-1]:g}", f"classifier-s{clf_scales[-1]:g}"]
    figures = [_plot(ctx, numbers), save_grid(sample_rows(ctx, keys), ctx.figure("samples"))]
    return result(ctx, numbers, _verdict(numbers), figures)


def _implicit(ctx: Context, pipe) -> dict:
    from ldmkit.data import load_split
    from ldmkit.eval.implicit_classifier import evaluate
    ds = load_split("fashion-mnist", "test", None, ctx.data_dir)
    return evaluate(pipe, ds, num=ctx.n(500, 20), sigmas=SIGMAS, draws=ctx.n(4, 1), progress=False)


def _interp(curve: list[dict], key: str, acc: float) -> float:
    pts = sorted(curve, key=lambda pt: (pt["accuracy"], pt["scale"]))
    return float(np.interp(acc, [pt["accuracy"] for pt in pts], [pt[key] for pt in pts]))


def matched(cfg: list[dict], clf: list[dict]) -> list[dict]:
    """FD, diversity, recall, scale and cost of each method interpolated at accuracy levels both curves reach."""
    lo = max(min(pt["accuracy"] for pt in c) for c in (cfg, clf))
    hi = min(max(pt["accuracy"] for pt in c) for c in (cfg, clf))
    levels = [a for a in LEVELS if lo <= a <= hi]
    if len(levels) < 2 and hi > lo:
        levels = list(np.linspace(lo, hi, 4)[1:])
    out = []
    for a in levels:
        row = {"accuracy": round(float(a), 4)}
        for name, c in (("cfg", cfg), ("classifier", clf)):
            for k in ("fd", "diversity", "recall", "scale", "seconds_per_image"):
                row[f"{name}_{k}"] = round(_interp(c, k, a), 4)
        out.append(row)
    return out


def _verdict(n: dict) -> str:
    m = n["matched"]
    if not m:
        return ("not testable here: the two curves reach no common accuracy (CFG "
                f"{min(p['accuracy'] for p in n['cfg']):.1%}..{max(p['accuracy'] for p in n['cfg']):.1%}, classifier "
                f"guidance {min(p['accuracy'] for p in n['classifier']):.1%}.."
                f"{max(p['accuracy'] for p in n['classifier']):.1%})")
    fd_wins = sum(r["cfg_fd"] <= r["classifier_fd"] for r in m)
    div_wins = sum(r["cfg_diversity"] >= r["classifier_diversity"] for r in m)
    holds = 2 * fd_wins >= len(m) and 2 * div_wins >= len(m)
    top = m[-1]
    c, k = _guided(n["cfg"]), _guided(n["classifier"])
    return (f"{'holds' if holds else 'does not hold here'}: at {len(m)} matched accuracy levels CFG's FD is as good "
            f"or better at {fd_wins} and its within-class diversity at {div_wins}; at {top['accuracy']:.1%} accuracy "
            f"FD {top['cfg_fd']:.2f} (CFG) vs {top['classifier_fd']:.2f} (classifier), diversity "
            f"{top['cfg_diversity']:.3f} vs {top['classifier_diversity']:.3f}; best accuracy "
            f"{max(p['accuracy'] for p in n['cfg']):.1%} vs {max(p['accuracy'] for p in n['classifier']):.1%}. "
            f"Cost per image: CFG {c['denoiser_per_image']:g} denoiser rows, {c['seconds_per_image']:.3f} s; "
            f"classifier guidance {k['denoiser_per_image']:g} denoiser rows + {k['classifier_backward_per_image']:g} "
            f"classifier forward+backward, {k['seconds_per_image']:.3f} s, and a {n['params']['classifier'] / 1e6:.1f}M"
            f"-parameter classifier trained on noised latents")


def _guided(curve: list[dict]) -> dict:
    return next(pt for pt in curve if pt["scale"] > 1) if any(pt["scale"] > 1 for pt in curve) else curve[-1]


def _plot(ctx: Context, n: dict):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (key, title, ref) in zip(axes, (("fd", "FD (lower is better)", n["floors"]["fd_floor"]),
                                            ("diversity", "within-class diversity (real = 1)", 1.0))):
        for name, label, marker in (("cfg", "classifier-free (w)", "o"), ("classifier", "classifier (s)", "s")):
            pts = n[name]
            ax.plot([p["accuracy"] for p in pts], [p[key] for p in pts], marker=marker, label=label)
            for p in pts[1:]:
                ax.annotate(f"{p['scale']:g}", (p["accuracy"], p[key]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        for r in n["matched"]:
            ax.axvline(r["accuracy"], color="grey", linewidth=0.5, linestyle=":")
        ax.axhline(ref, color="grey", linestyle="--", linewidth=0.8, label="real images")
        ax.set_xlabel("class accuracy (evaluation classifier)")
        ax.set_title(f"{title} against accuracy", fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = ctx.figure("fd-diversity")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def section(res: dict, rel) -> str:
    n, f = res["numbers"], res["figures"]
    pts = "| guidance | scale | accuracy | FD | recall | diversity | denoiser rows / image | classifier fwd (+bwd) " \
          "/ image | s / image |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    for name, label in (("cfg", "classifier-free, w"), ("classifier", "classifier, s")):
        pts += "\n".join(f"| {label} | {p['scale']:g} | {p['accuracy']:.1%} | {p['fd']:.3f} | {p['recall']:.3f} | "
                         f"{p['diversity']:.3f} | {p['denoiser_per_image']:g} | {p['classifier_forward_per_image']:g} "
                         f"({p['classifier_backward_per_image']:g}) | {p['seconds_per_image']:.3f} |"
                         for p in n[name]) + "\n"
    mt = "| accuracy | FD, CFG | FD, classifier | diversity, CFG | diversity, classifier | w | s |\n" \
         "| --- | --- | --- | --- | --- | --- | --- |\n" + \
         "\n".join(f"| {r['accuracy']:.1%} | {r['cfg_fd']:.3f} | {r['classifier_fd']:.3f} | {r['cfg_diversity']:.3f} "
                   f"| {r['classifier_diversity']:.3f} | {r['cfg_scale']:.2f} | {r['classifier_scale']:.2f} |"
                   for r in n["matched"])
    imp = n["implicit"]
    it = "| sigma | implicit classifier (CFG's) | noise-aware classifier |\n| --- | --- | --- |\n" + \
         "\n".join(f"| {s} | {v['implicit_classifier']:.1%} | {v.get('noise_aware_classifier', float('nan')):.1%} |"
                   for s, v in imp["levels"].items())
    return (f"The bundled pipeline, {n['images_per_point']} images a point ({n['images_per_point'] // 10} per class, "
            f"{n['sampling_steps']} DPM++ 2M steps); scale 0 is the unconditional model for both. The denoiser has "
            f"{n['params']['denoiser'] / 1e6:.1f}M parameters, the noise-aware classifier "
            f"{n['params']['classifier'] / 1e6:.1f}M. Real training images of the same count score FD "
            f"{n['floors']['fd_floor']:.3f}; real test images accuracy {n['floors']['accuracy_floor']:.1%}. "
            f"Within-class diversity counts each image under the class it was asked for, so images of another "
            f"class raise it: compare it at matched accuracy.\n\n{pts}\n"
            f"At matched accuracy (each curve interpolated linearly in accuracy; w and s are the interpolated "
            f"scales):\n\n{mt}\n\n![FD and diversity against accuracy]({rel}/{f[0]})\n\n"
            f"Rows: the unconditional model, CFG at w = 1 and {n['cfg'][-1]['scale']:g}, "
            f"classifier guidance at s = {n['classifier'][-1]['scale']:g}:\n\n![samples]({rel}/{f[1]})\n\n"
            f"The classifier CFG follows implicitly (the class prompt that denoises a noised test latent best, "
            f"Bayes' rule on the conditional model) against the explicit one, on the same {imp['images']} test "
            f"latents and {imp['draws']} noise draws; CLIP zero-shot on the clean images: "
            f"{imp['clip_zero_shot']:.1%}.\n\n{it}")
