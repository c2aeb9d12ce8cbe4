"""paradigms: eps-prediction, v-prediction and flow matching, sampled as an ODE, a reverse SDE and with a
predictor-corrector, at equal training compute.

Three denoisers are trained from scratch on the bundled autoencoder's latents and CLIP: the fashion-mnist LDM
preset with objective.kind eps (DDPM), v and flow, each for the same 800 steps at batch 128 (warm-up and EMA
half-life scaled from the preset's 4,300 steps), so each costs the same compute. Every one of them is wrapped by
the same contract (`make_denoiser`: x0_hat in sigma space) and sampled by the same three samplers: the
probability-flow ODE (dpmpp-2m), the reverse-time VE SDE (Euler-Maruyama, `sde`) and predictor-corrector (`pc`: one
Langevin corrector step per level, so twice the network evaluations), at 5, 10, 20 and 40 steps and the pipeline's
guidance. Each point is 300 images (30 per class, seed 0) judged by the frozen evaluation classifier (accuracy,
FD, precision, recall). Figures: FD and accuracy against steps, one panel per objective; samples of each objective
and sampler at 40 steps.

Budget of the full run on 2 idle cores, from measured costs (a training step ~0.23 s at batch 128, the bundled
denoiser's training log; sampling ~40 images/s at 20 steps with guidance; judging ~1.5 s a point once the test
set's features are computed): latent cache of the 60,000 training images ~1.3 min; training 3 x 800 steps ~9.5 min;
sampling 36 points of 300 images (900 denoiser evaluations per image over all points, pc's counted twice) ~5.6 min;
judging ~1 min: about 18 minutes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ldmkit.checkpoint import read_json
from ldmkit.experiments.common import (
    Context,
    Judge,
    bundled_autoencoder,
    class_prompts,
    pyplot,
    result,
    save_figure,
    save_grid,
)
from ldmkit.experiments.pixel_vs_latent import (
    class_columns,
    fashion_train,
    lazy,
    log_axis,
    pipeline_of,
    sample_and_score,
    sampled,
    stage_metric,
    train_denoiser,
)

NAME = "paradigms"
TITLE = "DDPM, v-prediction, flow matching and the score SDE: one family"
CLAIM = ("eps-prediction (DDPM), v-prediction, flow matching and score-SDE sampling are one family: one denoiser "
         "contract, so each objective samples with every sampler (ODE, SDE, predictor-corrector) and reaches "
         "comparable quality given enough steps")

KINDS = ("eps", "v", "flow")
SAMPLERS = ("dpmpp-2m", "sde", "pc")
SAMPLER_NAMES = {"dpmpp-2m": "probability-flow ODE (dpmpp-2m)", "sde": "reverse SDE (Euler-Maruyama)",
                 "pc": "predictor-corrector (Langevin)"}
TRAIN_STEPS = 800
CONVERGED = 1.25   # a curve has converged at the first step count within this factor of its objective's best FD
COMPARABLE = 1.5   # objectives are comparable when each one's best FD at the most steps is within this of the best
ACCURACY_GAP = 0.1  # ... and its accuracy within this of the best


def evaluations(kind: str, sampler: str, steps: int) -> int:
    """Denoiser evaluations per image (each is two network rows under guidance): pc adds a corrector evaluation
    at every level with a finite sigma (flow starts at sigma = inf, where it has none)."""
    from ldmkit.diffusion.objectives import Objective
    sigmas = Objective(kind=kind).get_schedule().sample_sigmas(steps)
    return steps + (sum(1 for s in sigmas[:-1].tolist() if math.isfinite(s) and s > 0) if sampler == "pc" else 0)


def run(ctx: Context) -> dict:
    from ldmkit.pipeline import Pipeline
    ds = fashion_train(ctx)
    ae = bundled_autoencoder(ctx)
    train_steps = ctx.n(TRAIN_STEPS, 3)
    pipes = {}
    for kind in KINDS:
        den = train_denoiser(ctx, f"denoiser-{kind}", ds, ae, train_steps, (f"objective.kind={kind}",))
        pipes[kind] = pipeline_of(ctx, f"pipeline-{kind}", ae, den)
    step_counts = ctx.n((5, 10, 20, 40), (2, 4))
    per_class = ctx.n(30, 2)
    prompts, labels = class_prompts(per_class)
    judge = lazy(lambda: Judge(ctx))
    points: dict = {k: {s: {} for s in SAMPLERS} for k in KINDS}
    guidance = None
    for kind in KINDS:
        pipe = lazy(lambda kind=kind: Pipeline.load(pipes[kind]))
        for sampler in SAMPLERS:
            for steps in step_counts:
                key = f"{kind}-{sampler}-{steps}"
                score = sample_and_score(ctx, judge, pipe, key, prompts, labels, steps=steps, sampler=sampler)
                points[kind][sampler][str(steps)] = {**score, "evaluations": evaluations(kind, sampler, steps)}
        guidance = guidance or ctx.memo("guidance", lambda pipe=pipe: _guidance(pipe()))
    batch = read_json(ctx.work / f"denoiser-{KINDS[0]}" / "config.json")["train"]["batch_size"]
    numbers = {"train_steps": train_steps, "batch_size": batch, "steps": list(step_counts),
               "samplers": list(SAMPLERS), "objectives": list(KINDS), "images_per_point": len(prompts),
               "guidance": guidance, "points": points,
               "trained": {k: {m: stage_metric(ctx.work / f"denoiser-{k}", m) for m in ("train_seconds", "final_loss")}
                           for k in KINDS}}
    numbers.update(_summary(points, step_counts))
    figures = [_curves(ctx, numbers), _samples(ctx, step_counts[-1], per_class)]
    return result(ctx, numbers, _verdict(numbers), [f for f in figures if f is not None])


def _guidance(pipe) -> dict:
    g = pipe.guidance()
    return {"scale": g.scale, "rescale": g.rescale}


def _summary(points: dict, step_counts) -> dict:
    """Per objective and sampler: the steps at which FD first comes within CONVERGED of the objective's best FD
    (None: not within the step counts tried); per objective: its best FD and accuracy at the most steps."""
    last = str(step_counts[-1])
    best = {k: min(p["fd"] for s in SAMPLERS for p in points[k][s].values()) for k in KINDS}
    converge = {k: {s: next((n for n in step_counts if points[k][s][str(n)]["fd"] <= CONVERGED * best[k]), None)
                    for s in SAMPLERS} for k in KINDS}
    at_max = {k: {"fd": min(points[k][s][last]["fd"] for s in SAMPLERS),
                  "accuracy": max(points[k][s][last]["accuracy"] for s in SAMPLERS),
                  "worst_accuracy": min(points[k][s][last]["accuracy"] for s in SAMPLERS)} for k in KINDS}
    fd0 = min(v["fd"] for v in at_max.values())
    acc0 = max(v["accuracy"] for v in at_max.values())
    every_sampler = all(v["worst_accuracy"] >= 0.5 and math.isfinite(v["fd"]) for v in at_max.values())
    comparable = all(v["fd"] <= COMPARABLE * fd0 and v["accuracy"] >= acc0 - ACCURACY_GAP for v in at_max.values())
    return {"best_fd": best, "converge_steps": converge, "at_max_steps": at_max,
            "every_sampler_works": every_sampler, "comparable": comparable}


def _steps_text(v) -> str:
    return f"{v} steps" if v is not None else "more steps than tried"


def _verdict(n: dict) -> str:
    conv, at_max, last = n["converge_steps"], n["at_max_steps"], n["steps"][-1]
    quality = ", ".join(f"{k} FD {at_max[k]['fd']:.2f} / accuracy {at_max[k]['accuracy']:.1%}" for k in KINDS)
    order = sorted(KINDS, key=lambda k: conv[k]["dpmpp-2m"] if conv[k]["dpmpp-2m"] is not None else math.inf)
    ode = "; ".join(f"{k} {_steps_text(conv[k]['dpmpp-2m'])}" for k in order)
    sde = "; ".join(f"{s}: " + ", ".join(f"{k} {_steps_text(conv[k][s])}" for k in KINDS) for s in ("sde", "pc"))
    facts = (f"best of the three samplers at {last} steps: {quality}. Steps to come within {CONVERGED}x of each "
             f"objective's best FD with the ODE sampler: {ode}; with the stochastic samplers: {sde}")
    if n["every_sampler_works"] and n["comparable"]:
        return f"holds: every objective samples with every sampler through one denoiser contract; {facts}"
    failed = [w for ok, w in ((n["every_sampler_works"], f"some objective and sampler pair stays below 50% accuracy "
                                                         f"at {last} steps"),
                              (n["comparable"], f"the objectives' quality at {last} steps differs by more than "
                                                f"{COMPARABLE}x in FD or {ACCURACY_GAP:.0%} in accuracy")) if not ok]
    return f"does not hold here ({'; '.join(failed)}): {facts}"


def _curves(ctx: Context, n: dict) -> Path:
    """FD (top) and accuracy (bottom) against sampling steps, one column per objective, one line per sampler."""
    plt = pyplot()
    from matplotlib.ticker import NullLocator
    fig, axes = plt.subplots(2, len(KINDS), figsize=(4 * len(KINDS), 6.4), sharex=True, sharey="row")
    steps = n["steps"]
    for j, kind in enumerate(KINDS):
        for sampler, marker in zip(SAMPLERS, "os^"):
            pts = n["points"][kind][sampler]
            axes[0, j].plot(steps, [pts[str(s)]["fd"] for s in steps], marker=marker, label=SAMPLER_NAMES[sampler])
            axes[1, j].plot(steps, [pts[str(s)]["accuracy"] for s in steps], marker=marker)
        axes[0, j].set_title(f"{kind} ({n['train_steps']} training steps)", fontsize=10)
        axes[1, j].set_xscale("log")
        axes[1, j].set_xticks(steps, [str(s) for s in steps])
        axes[1, j].xaxis.set_minor_locator(NullLocator())
        axes[1, j].set_xlabel("sampling steps")
    fds = [p["fd"] for k in KINDS for s in SAMPLERS for p in n["points"][k][s].values()]
    log = [log_axis(ax, fds) for ax in axes[0]][0]
    axes[0, 0].set_ylabel(f"FD ({'log, ' if log else ''}lower is better)")
    axes[1, 0].set_ylabel("accuracy")
    axes[0, 0].legend(fontsize=7)
    g = n["guidance"]
    fig.suptitle(f"{n['images_per_point']} images per point, guidance w = {g['scale']:g} (rescale {g['rescale']:g})",
                 fontsize=10)
    return save_figure(ctx, fig, "fd-vs-steps")


def _samples(ctx: Context, steps: int, per_class: int) -> Path | None:
    """One row per objective and sampler at the most steps, one image per class (the first of each)."""
    rows = [sampled(ctx, f"{k}-{s}-{steps}") for k in KINDS for s in SAMPLERS]
    if any(r is None for r in rows):
        return None
    return save_grid(np.concatenate([class_columns(r, per_class, rows=1) for r in rows]), ctx.figure("samples"))


def section(res: dict, rel) -> str:
    n = res["numbers"]
    steps = n["steps"]
    head = "| objective | sampler | " + " | ".join(f"{s} steps" for s in steps) + f" | within {CONVERGED}x of best at |"
    lines = [head, "| --- | --- | " + " | ".join("---" for _ in steps) + " | --- |"]
    for k in KINDS:
        for s in SAMPLERS:
            pts = n["points"][k][s]
            cells = " | ".join(f"{pts[str(m)]['fd']:.2f} / {pts[str(m)]['accuracy']:.0%}" for m in steps)
            lines.append(f"| {k} | {SAMPLER_NAMES[s]} | {cells} | {_steps_text(n['converge_steps'][k][s])} |")
    trained = ", ".join(f"{k} {n['trained'][k]['train_seconds']} s" for k in KINDS)
    g = n["guidance"]
    text = (f"Three denoisers (the fashion-mnist preset with objective eps, v and flow), each trained for "
            f"{n['train_steps']} steps at batch {n['batch_size']} on the bundled autoencoder and CLIP (training "
            f"time: {trained}), sampled by the same three samplers at guidance w = {g['scale']:g} (rescale "
            f"{g['rescale']:g}); {n['images_per_point']} images per point. Cells: FD / accuracy. pc evaluates the "
            f"denoiser about twice per step.\n\n" + "\n".join(lines)
            + f"\n\n![FD and accuracy against steps]({rel}/{res['figures'][0]})")
    if len(res["figures"]) > 1:
        text += (f"\n\nAt {steps[-1]} steps, one row per objective and sampler (eps, v, flow; each with "
                 f"{', '.join(SAMPLERS)}), one column per class:\n\n![samples]({rel}/{res['figures'][1]})")
    return text
