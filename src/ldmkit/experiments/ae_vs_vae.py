"""ae-vs-vae: the KL weight trades reconstruction for a latent space that the prior and a denoiser can use.

Four autoencoders of the fashion-mnist stage preset, each trained for the same 450 steps at batch 16 (no
adversarial term; the bundled LPIPS feature net, so none is trained): the plain autoencoder (the
fashion-mnist-plain preset: no sampling, no KL) and VAEs with kl_weight 1e-6 (the preset's), 1e-4 and 1e-2.
Measured for each on the first 500 test images: reconstruction PSNR; the latents against N(0, I) (mean and std
of all elements; per channel the mean, the std, the KL of a Gaussian fitted to the channel's values and the mean
posterior KL); the evaluation classifier's confidence (mean max softmax probability and mean entropy) on 400
images decoded from N(0, I) latents divided by the autoencoder's scale factor, as the pipeline decodes; the
smoothness of 16-frame linear interpolations between the posterior means of 24 test-image pairs (the mean and the
largest step between consecutive decoded frames in the evaluation classifier's features, over the distance of
the two end frames: 1/15 for a walk at an even pace); and a denoiser trained on each latent space (the
fashion-mnist LDM preset, 350 steps at batch 128 on the first 4,000 training images, identical for all), judged
on 400 samples (40 per class, w = 3) by the evaluation classifier (`Judge.score`).

Figures: the trade-off (PSNR against the prior draws' confidence and against the samples' FD, one point per
kl_weight) and, per kl_weight, decoded prior draws, two interpolations and one denoiser sample per class.

Budget: about 17 minutes on 2 cores: per autoencoder ~1.9 min training it, ~20 s encoding the denoiser's
images, ~1.4 min training the denoiser and ~40 s measuring. The autoencoder helpers here are shared with the
blur experiment.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
import torch

from ldmkit.experiments.common import (
    Context,
    Judge,
    assemble_pipeline,
    class_prompts,
    pyplot,
    result,
    save_figure,
    stage_dir,
)

NAME = "ae-vs-vae"
TITLE = "what the KL term buys, from a plain autoencoder to a strong prior"
CLAIM = ("the KL term pulls the latents toward N(0, I): a larger weight costs reconstruction but makes prior draws "
         "decode to recognisable images, while a plain autoencoder's latent space has no such structure")

KL_WEIGHTS = (0.0, 1e-6, 1e-4, 1e-2)
AE_STEPS, LDM_STEPS, LDM_IMAGES = 450, 350, 4000
TEST_IMAGES, PRIOR_IMAGES, PAIRS, FRAMES, PER_CLASS = 500, 400, 24, 16, 40
GUIDANCE = 3.0
FEATNET = Path("autoencoder") / "lpips_featnet.safetensors"  # the bundled autoencoder's trained LPIPS net


# ---- shared with the blur experiment ------------------------------------------------------------------------------

def fashion(ctx: Context, split: str, num: int | None = None):
    from ldmkit.data import load_dataset
    return load_dataset("fashion-mnist", split=split, data_dir=ctx.data_dir, **({"num": num} if num else {}))


def train_autoencoder(ctx: Context, name: str, preset: str, steps: int, overrides: list[str], ds) -> Path:
    """An autoencoder stage `preset` with `overrides`, trained `steps` steps into work/NAME (resumable). LPIPS
    uses the bundled feature net; the final scale and PSNR are estimated on 1,000 and 200 images, not all."""
    from ldmkit.config import apply_overrides
    from ldmkit.train import autoencoder as ae_train
    budget = ([f"train.steps={steps}", "train.warmup_steps=1", "train.log_every=1", "train.ckpt_every=2",
               "stats_images=32", "eval_images=16", "grid_images=4"] if ctx.quick else
              [f"train.steps={steps}", f"train.warmup_steps={min(50, steps // 10)}", "train.ckpt_every=250",
               "stats_images=1000", "eval_images=200"])
    cfg = apply_overrides(ae_train.PRESETS[preset],
                          [f"loss.featnet_path={ctx.pipeline / FEATNET}", *budget, *overrides])
    return stage_dir(ctx, name, lambda out, resume: ae_train.train(cfg, out, "fashion-mnist", ds, resume=resume,
                                                                    progress=ctx.progress))


def save_arrays(ctx: Context, key: str, **arrays) -> None:
    """Images a figure needs, kept beside the memoised numbers (work/memo/KEY.npz) so a rerun redraws it."""
    from ldmkit.checkpoint import write_bytes
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    write_bytes(ctx.work / "memo" / f"{key}.npz", buf.getvalue())


def load_arrays(ctx: Context, key: str) -> dict[str, np.ndarray]:
    with np.load(ctx.work / "memo" / f"{key}.npz") as f:
        return {k: f[k] for k in f.files}


@torch.no_grad()
def decode_native(ae, z: torch.Tensor, ds, batch_size: int = 128) -> torch.Tensor:
    """Raw latents -> uint8 (N, C, h, w) images at the dataset's native size."""
    from ldmkit.images import to_uint8
    out = [to_uint8(ae.decode(z[i:i + batch_size])) for i in range(0, len(z), batch_size)]
    return ds.crop(torch.cat(out))


def rounded(d: dict, digits: int = 4) -> dict:
    def r(v):
        if isinstance(v, float):
            return round(v, digits)
        if isinstance(v, list):
            return [r(x) for x in v]
        return v
    return {k: r(v) for k, v in d.items()}


# ---- the measurements ---------------------------------------------------------------------------------------------

def tag(kl: float) -> str:
    return "plain" if kl == 0 else f"kl{kl:.0e}".replace("e-0", "e-")  # kl1e-6


def label(kl: float) -> str:
    return "0 (plain)" if kl == 0 else f"{kl:.0e}".replace("e-0", "e-")


def confidence(logits: torch.Tensor) -> dict:
    """Mean max softmax probability and mean entropy (nats; ln 10 = 2.30 is no opinion at all)."""
    p = logits.double().softmax(1)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(1)
    return {"confidence": float(p.max(1).values.mean()), "entropy": float(entropy.mean())}


@torch.no_grad()
def measure_latent_space(ctx: Context, ae_dir: Path, test, judge, key: str) -> dict:
    """PSNR, latent statistics, prior draws' confidence and interpolation smoothness of one autoencoder."""
    from ldmkit.autoencoder.latents import interpolate, sample_prior
    from ldmkit.data import to_float
    from ldmkit.eval.autoencoder_eval import latent_statistics, reconstruct
    from ldmkit.eval.metrics import psnr
    from ldmkit.stages import load_autoencoder
    ae, scale, shift = load_autoencoder(ae_dir)
    images = test.images[:ctx.n(TEST_IMAGES, 20)]
    recon, acc = reconstruct(ae, images)
    stats = latent_statistics(acc)
    cells = acc["n"] * acc["hw"]
    mean_c = acc["mu"] / cells
    var_c = (acc["second"] / cells - mean_c.square()).clamp_min(1e-12)
    fitted_kl = 0.5 * (var_c + mean_c.square() - 1 - var_c.log())  # KL(N(m_c, s_c^2) || N(0, 1)) per element
    out = {"psnr": float(psnr(test.crop(images), test.crop(recon)).mean()), "scale_factor": scale,
           "latent_mean": stats["latent_mean"], "latent_std": stats["latent_std"],
           "mean_per_channel": mean_c.tolist(), "std_per_channel": var_c.sqrt().tolist(),
           "fitted_kl_per_channel": fitted_kl.tolist(),
           # a point posterior's KL to N(0, I) is infinite: none is recorded for the plain autoencoder
           "posterior_kl_per_channel": stats["kl_per_channel"] if ae.cfg.variational else None,
           "active_per_channel": stats["active_per_channel"]}
    f = ae.cfg.downsample_factor
    shape = (ae.cfg.latent_channels, images.shape[2] // f, images.shape[3] // f)
    prior = decode_native(ae, sample_prior(ctx.n(PRIOR_IMAGES, 20), shape, seed=0) / scale + shift, test)
    logits, _ = judge().features(prior)
    out.update({f"prior_{k}": v for k, v in confidence(logits).items()})
    pairs = ctx.n(PAIRS, 2)
    z = ae.encode(to_float(images[:2 * pairs])).mode().float()
    path = torch.cat([interpolate(z[i], z[pairs + i], FRAMES) for i in range(pairs)])  # (pairs * FRAMES, c, h, w)
    frames = decode_native(ae, path, test)
    _, feats = judge().features(frames)
    feats = feats.double().reshape(pairs, FRAMES, -1)
    steps = (feats[:, 1:] - feats[:, :-1]).norm(dim=-1)  # (pairs, FRAMES - 1)
    ends = (feats[:, -1] - feats[:, 0]).norm(dim=-1).clamp_min(1e-8)
    out["interp_mean_step"] = float((steps.mean(1) / ends).mean())
    out["interp_max_step"] = float((steps.max(1).values / ends).mean())
    save_arrays(ctx, key, prior=prior[:FRAMES].numpy(), interpolation=frames[:2 * FRAMES].numpy())
    return rounded(out)


def judge_samples(ctx: Context, key: str, ae_dir: Path, denoiser_dir: Path, judge) -> dict:
    """The denoiser trained on this latent space, in a pipeline with the bundled CLIP: its samples, judged."""
    from ldmkit.pipeline import Pipeline
    root = assemble_pipeline(ctx, f"pipeline-{key}", {
        "autoencoder": ae_dir, "clip": ctx.pipeline / "clip", "denoiser": denoiser_dir,
        "eval-classifier": ctx.pipeline / "eval-classifier"})
    pipe = Pipeline.load(root)
    per_class = ctx.n(PER_CLASS, 2)
    prompts, labels = class_prompts(per_class)
    images = pipe.generate(prompts, guidance=pipe.guidance(GUIDANCE), progress=False, micro_batch=64)
    save_arrays(ctx, f"samples-{key}", images=images[::per_class].transpose(0, 3, 1, 2))  # one per class
    return judge().score(images, labels)


def train_denoiser(ctx: Context, key: str, ae_dir: Path, ds) -> Path:
    from ldmkit.config import apply_overrides
    from ldmkit.train import ldm
    steps = ctx.n(LDM_STEPS, 3)
    budget = ([f"train.steps={steps}", "train.warmup_steps=1", "train.log_every=1", "train.ckpt_every=2",
               "sample.steps=2"] if ctx.quick else
              [f"train.steps={steps}", "train.warmup_steps=35", "train.ema_halflife_steps=35",
               "train.ckpt_every=100", "train.log_every=50"])
    cfg = apply_overrides(ldm.PRESETS["fashion-mnist"], budget)
    return stage_dir(ctx, f"denoiser-{key}", lambda out, resume: ldm.train(
        cfg, out, "fashion-mnist", ds, str(ae_dir), str(ctx.pipeline / "clip"), resume=resume,
        progress=ctx.progress))


def run(ctx: Context) -> dict:
    judge = functools.cache(lambda: Judge(ctx))  # built only when something is left to measure
    train = fashion(ctx, "train", ctx.n(0, 256))
    ldm_data = fashion(ctx, "train", ctx.n(LDM_IMAGES, 256))
    test = fashion(ctx, "test")
    points, arrays = [], {}
    for kl in KL_WEIGHTS:
        key = tag(kl)
        preset, overrides = ("fashion-mnist-plain", []) if kl == 0 else ("fashion-mnist", [f"loss.kl_weight={kl}"])
        ae_dir = train_autoencoder(ctx, f"autoencoder-{key}", preset, ctx.n(AE_STEPS, 3),
                                   ["loss.disc_weight=0", *overrides], train)
        latent = ctx.memo(f"latent-{key}", functools.partial(measure_latent_space, ctx, ae_dir, test, judge,
                                                             f"latent-{key}"))
        ctx.log(f"kl_weight {label(kl)}: PSNR {latent['psnr']:.2f} dB, confidence on prior draws "
                f"{latent['prior_confidence']:.3f}")
        den_dir = train_denoiser(ctx, key, ae_dir, ldm_data)
        samples = ctx.memo(f"samples-{key}", functools.partial(judge_samples, ctx, key, ae_dir, den_dir, judge))
        points.append({"kl_weight": kl, "autoencoder": key, **latent, "samples": samples})
        arrays[key] = {**load_arrays(ctx, f"latent-{key}"), **load_arrays(ctx, f"samples-{key}")}
    real = ctx.memo("real", lambda: confidence(judge().features(test.crop(test.images[:ctx.n(TEST_IMAGES, 20)]))[0]))
    numbers = {"points": points, "real_confidence": real["confidence"], "real_entropy": real["entropy"],
               "ae_steps": ctx.n(AE_STEPS, 3), "ldm_steps": ctx.n(LDM_STEPS, 3), "ldm_images": len(ldm_data),
               "test_images": ctx.n(TEST_IMAGES, 20), "prior_images": ctx.n(PRIOR_IMAGES, 20),
               "pairs": ctx.n(PAIRS, 2), "frames": FRAMES, "samples": 10 * ctx.n(PER_CLASS, 2), "guidance": GUIDANCE}
    figures = [_tradeoff(ctx, points), _latents(ctx, points, arrays)]
    return result(ctx, rounded(numbers), verdict(numbers), figures)


def verdict(n: dict) -> str:
    pts = {p["kl_weight"]: p for p in n["points"]}
    plain, strong = pts[0.0], pts[max(KL_WEIGHTS)]
    best = min(n["points"], key=lambda p: p["samples"]["fd"])
    costs = strong["psnr"] < plain["psnr"]
    gains = strong["prior_confidence"] > plain["prior_confidence"]
    facts = (f"PSNR {plain['psnr']:.1f} dB for the plain autoencoder against {strong['psnr']:.1f} dB at kl_weight "
             f"{label(strong['kl_weight'])}; the evaluation classifier's confidence on decoded N(0, I) draws "
             f"{plain['prior_confidence']:.0%} against {strong['prior_confidence']:.0%} (real images "
             f"{n['real_confidence']:.0%}); the denoiser did best on kl_weight {label(best['kl_weight'])} "
             f"(sample FD {best['samples']['fd']:.2f})")
    if costs and gains:
        return f"holds: {facts}"
    missing = [w for w, ok in (("the KL term did not cost reconstruction", costs),
                               ("prior draws did not decode to more recognisable images", gains)) if not ok]
    return f"does not hold here ({'; '.join(missing)}): {facts}"


# ---- figures and the page -----------------------------------------------------------------------------------------

def _tradeoff(ctx: Context, points: list[dict]) -> Path:
    """PSNR against the prior draws' confidence and against the denoiser samples' FD, one point per kl_weight."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = [p["psnr"] for p in points]
    for ax, ys, name in ((axes[0], [p["prior_confidence"] for p in points],
                          "classifier confidence on decoded N(0, I) draws"),
                         (axes[1], [p["samples"]["fd"] for p in points], "denoiser samples: FD (lower is better)")):
        ax.plot(x, ys, "o-", color="tab:blue")
        for p, xi, yi in zip(points, x, ys):
            ax.annotate(label(p["kl_weight"]), (xi, yi), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel("reconstruction PSNR (dB, test images)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    fig.suptitle("the KL weight's trade-off: reconstruction against a usable latent space", fontsize=10)
    return save_figure(ctx, fig, "tradeoff")


def _latents(ctx: Context, points: list[dict], arrays: dict) -> Path:
    """Per kl_weight: 16 decoded N(0, I) draws, two 16-frame interpolations and one denoiser sample per class."""
    from ldmkit.images import grid
    plt = pyplot()
    fig, axes = plt.subplots(len(points), 1, figsize=(8, 2.3 * len(points)))
    for ax, p in zip(np.atleast_1d(axes), points):
        a = arrays[p["autoencoder"]]
        rows = [a["prior"], a["interpolation"], a["images"]]
        tiles = np.concatenate([np.pad(r, ((0, -len(r) % FRAMES), (0, 0), (0, 0), (0, 0)), constant_values=255)
                                for r in rows])
        ax.imshow(grid(tiles.transpose(0, 2, 3, 1), nrow=FRAMES)[..., 0], cmap="gray", vmin=0, vmax=255,
                  interpolation="nearest")
        ax.set_title(f"kl_weight {label(p['kl_weight'])}: prior draws (row 1), interpolations (rows 2-3), "
                     "denoiser samples (last row)", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    path = ctx.figure("latents")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _per_channel(values) -> str:
    return "n/a (a point posterior)" if values is None else " / ".join(f"{v:.2f}" for v in values)


def section(res: dict, rel) -> str:
    n = res["numbers"]
    pts = n["points"]
    rows = [("reconstruction PSNR (dB)", lambda p: f"{p['psnr']:.2f}"),
            ("latent mean / std (all elements)", lambda p: f"{p['latent_mean']:.2f} / {p['latent_std']:.2f}"),
            ("per channel: mean", lambda p: _per_channel(p["mean_per_channel"])),
            ("per channel: std", lambda p: _per_channel(p["std_per_channel"])),
            ("per channel: KL of the fitted Gaussian to N(0, 1) (nats per element)",
             lambda p: _per_channel(p["fitted_kl_per_channel"])),
            ("per channel: mean posterior KL (nats per image)", lambda p: _per_channel(p["posterior_kl_per_channel"])),
            ("scale factor", lambda p: f"{p['scale_factor']:.3f}"),
            ("N(0, I) draws: classifier confidence", lambda p: f"{p['prior_confidence']:.1%}"),
            ("N(0, I) draws: classifier entropy (nats)", lambda p: f"{p['prior_entropy']:.2f}"),
            ("interpolation: mean step / end distance", lambda p: f"{p['interp_mean_step']:.3f}"),
            ("interpolation: largest step / end distance", lambda p: f"{p['interp_max_step']:.3f}"),
            ("denoiser samples: accuracy", lambda p: f"{p['samples']['accuracy']:.1%}"),
            ("denoiser samples: FD", lambda p: f"{p['samples']['fd']:.2f}"),
            ("denoiser samples: precision / recall",
             lambda p: f"{p['samples']['precision']:.2f} / {p['samples']['recall']:.2f}"),
            ("denoiser samples: within-class diversity", lambda p: f"{p['samples']['diversity']:.2f}")]
    head = "| measure | " + " | ".join(f"kl_weight {label(p['kl_weight'])}" for p in pts) + " |\n"
    table = head + "| --- |" + " --- |" * len(pts) + "\n" + "\n".join(
        f"| {name} | " + " | ".join(fn(p) for p in pts) + " |" for name, fn in rows)
    return (f"Four autoencoders of the fashion-mnist preset, {n['ae_steps']} steps each (batch 16, no GAN), differing "
            f"only in the KL weight (0: the plain autoencoder, no sampling). Measured on {n['test_images']} test "
            f"images; {n['prior_images']} N(0, I) draws decoded as the pipeline decodes (divided by the scale "
            f"factor); {n['pairs']} interpolations of {n['frames']} frames between test images, steps measured in "
            f"the evaluation classifier's features (an even walk: 1/{n['frames'] - 1} = {1 / (n['frames'] - 1):.3f}); "
            f"on real test images the classifier's confidence is {n['real_confidence']:.1%} (entropy "
            f"{n['real_entropy']:.2f} nats). One denoiser per latent space ({n['ldm_steps']} steps at batch 128 on "
            f"{n['ldm_images']} training images), {n['samples']} samples at w = {n['guidance']:g}.\n\n{table}\n\n"
            f"![the trade-off]({rel}/{res['figures'][0]})\n\n"
            f"Per kl_weight: decoded N(0, I) draws, two interpolations, one denoiser sample per class:\n\n"
            f"![prior draws and interpolations]({rel}/{res['figures'][1]})")
