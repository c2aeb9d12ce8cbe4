"""`ldmkit train pipeline --preset fashion-mnist --out DIR`: every stage of a text-to-image pipeline, in order.

Own images: `ldmkit train pipeline --data folder:PATH --image-size 64 --out DIR` picks the folder preset of that
resolution (32 or 64 on CPUs) and trains the same way; see `ldmkit.data.folder` for the layouts it reads.

Order: evaluation classifier (Fashion-MNIST only, frozen before any generator), autoencoder, CLIP, denoiser,
autoguidance guide, noise-aware classifier, fast decoder, guidance-distilled students; then `pipeline.json` with
each stage's weight hash, the latent scale factor and the sampling defaults. A stage that already finished (its
metrics.json exists) is kept; one that was interrupted resumes from its last checkpoint, so rerunning the command
continues where it stopped.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from ldmkit.checkpoint import provenance, write_json
from ldmkit.config import apply_overrides, preset
from ldmkit.data import load_dataset
from ldmkit.stages import PIPELINE_FORMAT, load_autoencoder, stage_config, stage_entry
from ldmkit.train import autoencoder, classifier, clip, distill, eval_classifier, fast_decoder, ldm


@dataclass(frozen=True)
class StagePlan:
    preset: str                      # the stage's own preset name (a fixed number of steps)
    overrides: tuple[str, ...] = ()  # extra --set overrides for the stage
    minutes: float = 0.0             # its wall time on 2 AVX512-BF16 cores (printed before it starts; 0 = seconds)


@dataclass(frozen=True)
class PipelinePreset:
    data: str                                  # dataset spec ("folder": the --data folder:PATH given)
    autoencoder: StagePlan
    clip: StagePlan
    denoiser: StagePlan
    guide: StagePlan | None = None             # weaker denoiser for autoguidance (`--guidance-mode autoguidance`)
    classifier: StagePlan | None = None        # noise-aware classifier for classifier guidance
    eval_classifier: StagePlan | None = None   # frozen evaluation classifier (Fashion-MNIST)
    fast_decoder: StagePlan | None = None      # small decoder of the same latents (`--decoder fast`)
    distilled: StagePlan | None = None         # guidance-distilled student (`--distilled`: one row per step)
    onestep: StagePlan | None = None           # one-step student of the distilled one (`--one-step`)
    guidance: float = 3.0                      # default CFG scale of the pipeline
    guidance_rescale: float = 0.0              # default guidance rescale phi (applied at scales above 1)
    sampler: str = "dpmpp-2m"                  # default sampler
    steps: int = 20                            # default sampling steps
    image_size: int = 32                       # training resolution (image folders are resized and cropped to it)


PRESETS = {
    "tiny": PipelinePreset(data="shapes", autoencoder=StagePlan("tiny"), clip=StagePlan("tiny"),
                           denoiser=StagePlan("tiny"), guide=StagePlan("tiny", ("train.steps=10",)),
                           classifier=StagePlan("tiny"),
                           fast_decoder=StagePlan("tiny"), steps=4),
    "tiny-fashion": PipelinePreset(data="fashion-mnist", autoencoder=StagePlan("tiny"), clip=StagePlan("tiny"),
                                   denoiser=StagePlan("tiny"), classifier=StagePlan("tiny"),
                                   eval_classifier=StagePlan("tiny"), distilled=StagePlan("tiny"),
                                   onestep=StagePlan("tiny", ("one_step_from=2",)), steps=4),
    "fashion-mnist": PipelinePreset(
        data="fashion-mnist", eval_classifier=StagePlan("fashion-mnist", minutes=6),
        autoencoder=StagePlan("fashion-mnist", minutes=12), clip=StagePlan("fashion-mnist", minutes=8),
        denoiser=StagePlan("fashion-mnist", minutes=20), guide=StagePlan("fashion-mnist-guide", minutes=3),
        classifier=StagePlan("fashion-mnist", minutes=6), fast_decoder=StagePlan("fashion-mnist", minutes=6),
        distilled=StagePlan("fashion-mnist", minutes=6), onestep=StagePlan("fashion-mnist", ("one_step_from=2",),
                                                                           minutes=6),
        guidance_rescale=0.7),  # rescale keeps accuracy within half a point and buys recall (docs/benchmarks.md)
    # the text-to-image stages within 20 minutes (evaluation classifier aside): the denoiser holds quality back, so
    # it keeps most of the time; the autoencoder and CLIP run short schedules (docs/benchmarks.md: the budget split)
    "fashion-mnist-20min": PipelinePreset(
        data="fashion-mnist", eval_classifier=StagePlan("fashion-mnist", minutes=6),
        autoencoder=StagePlan("fashion-mnist", ("train.steps=900", "train.warmup_steps=30", "loss.disc_start=765",
                                                "disc_warmup_steps=180", "train.ema_halflife_steps=25"), minutes=3.5),
        clip=StagePlan("fashion-mnist", ("train.steps=650", "train.warmup_steps=55", "train.ema_halflife_steps=30"),
                       minutes=2.5),
        denoiser=StagePlan("fashion-mnist", ("train.steps=3000", "train.warmup_steps=100",
                                             "train.ema_halflife_steps=150", "train.sample_every=0"), minutes=12.5),
        guidance_rescale=0.7),
    # pixel-space diffusion: the identity autoencoder, everything else as in the latent presets
    "tiny-pixels": PipelinePreset(data="shapes", autoencoder=StagePlan("pixels", ("stats_images=256",)),
                                  clip=StagePlan("tiny"), denoiser=StagePlan("tiny"), classifier=StagePlan("tiny"),
                                  steps=4),
    "fashion-mnist-pixels": PipelinePreset(
        data="fashion-mnist", eval_classifier=StagePlan("fashion-mnist", minutes=6), autoencoder=StagePlan("pixels"),
        clip=StagePlan("fashion-mnist", minutes=8), denoiser=StagePlan("fashion-mnist", minutes=300),
        classifier=StagePlan("fashion-mnist", minutes=40), guidance_rescale=0.7),
    # the same pipeline whose denoiser also reads image prompts (`ldmkit sample --image-prompt`): same stages and
    # budgets, the denoiser conditioned on CLIP image embeddings too (docs/benchmarks.md: what it costs text prompts)
    "fashion-mnist-image": PipelinePreset(
        data="fashion-mnist", eval_classifier=StagePlan("fashion-mnist", minutes=6),
        autoencoder=StagePlan("fashion-mnist", minutes=12), clip=StagePlan("fashion-mnist", minutes=8),
        denoiser=StagePlan("fashion-mnist-image", minutes=20), classifier=StagePlan("fashion-mnist", minutes=6),
        fast_decoder=StagePlan("fashion-mnist", minutes=6), distilled=StagePlan("fashion-mnist", minutes=6),
        onestep=StagePlan("fashion-mnist", ("one_step_from=2",), minutes=6), guidance_rescale=0.7),
    "shapes": PipelinePreset(data="shapes", autoencoder=StagePlan("shapes", minutes=12),
                             clip=StagePlan("shapes", minutes=11), denoiser=StagePlan("shapes", minutes=20)),
    # image folders, by resolution: 16x16x8 latents at 32 and at 64 pixels; a noise-aware classifier when the
    # folder has class subfolders
    "folder-32": PipelinePreset(data="folder", autoencoder=StagePlan("folder", minutes=12),
                                clip=StagePlan("folder", minutes=11), denoiser=StagePlan("shapes", minutes=20),
                                classifier=StagePlan("fashion-mnist", minutes=6)),
    "folder-64": PipelinePreset(data="folder", autoencoder=StagePlan("folder-64"),
                                clip=StagePlan("folder-64"), denoiser=StagePlan("shapes", minutes=20),
                                classifier=StagePlan("fashion-mnist", minutes=6), image_size=64),
}
FOLDER_PRESETS = {32: "folder-32", 64: "folder-64"}  # --preset auto with --data folder:PATH, by --image-size


STAGES = ("autoencoder", "clip", "denoiser", "guide", "classifier", "eval-classifier", "fast-decoder", "distilled",
          "onestep")  # trained here, in order; each is named in pipeline.json when present


def _stage_cfg(presets, plan: StagePlan, extra: list[str]):
    return apply_overrides(preset(presets, plan.preset, "stage preset"), [*plan.overrides, *extra])


def _run_stage(name: str, out: Path, fn, minutes: float = 0.0) -> None:
    """Skip a finished stage, resume an interrupted one, else start it (saying how long it takes)."""
    if (out / "metrics.json").exists() and (out / "model.safetensors").exists():
        print(f"[pipeline] {name}: already trained in {out}, kept", file=sys.stderr)
        return
    resume = (out / "state.pt").exists()
    took = f" (about {minutes:g} min on 2 AVX512-BF16 cores)" if minutes else ""
    print(f"[pipeline] {name}: {'resuming' if resume else 'training'} -> {out}{took}", file=sys.stderr)
    fn(resume)


def train_pipeline(pp: PipelinePreset, out: str | Path, data_dir: str | None = None, progress: bool = True,
                   overrides: dict[str, list[str]] | None = None, data_kw: dict | None = None) -> dict:
    """Train every stage of `pp` into `out` (finished stages kept, interrupted ones resumed). `data_kw`: options
    of an image folder (skip_bad, template, channels)."""
    out, ov = Path(out), overrides or {}
    kw = {"data_dir": data_dir} if pp.data == "fashion-mnist" else dict(data_kw or {})
    ds = load_dataset(pp.data, split="train", image_size=pp.image_size, **kw)
    ae, text, kw = str(out / "autoencoder"), str(out / "clip"), {"progress": progress}

    def fit_denoiser(c, d, r):  # the denoiser and the autoguidance guide: the same stage, other presets
        return ldm.train(c, d, pp.data, ds, ae, text, resume=r, **kw)

    stages = [  # (name, plan, stage module, how it trains: (config, stage dir, resume) -> metrics), in order
        ("eval-classifier", pp.eval_classifier, eval_classifier,
         lambda c, d, r: eval_classifier.train(c, d, data_dir, progress)),
        ("autoencoder", pp.autoencoder, autoencoder,
         lambda c, d, r: autoencoder.train(c, d, pp.data, ds, resume=r, **kw)),
        ("clip", pp.clip, clip, lambda c, d, r: clip.train(c, d, pp.data, ds, resume=r, **kw)),
        ("denoiser", pp.denoiser, ldm, fit_denoiser),
        ("guide", pp.guide, ldm, fit_denoiser),
        ("classifier", pp.classifier if "class" in ds.labels else None, classifier,
         lambda c, d, r: classifier.train(c, d, pp.data, ds, ae, resume=r, **kw)),
        ("fast-decoder", pp.fast_decoder, fast_decoder,
         lambda c, d, r: fast_decoder.train(c, d, pp.data, ds, ae, resume=r, **kw)),
        # the students read the pipeline written so far (their teacher is its denoiser)
        ("distilled", pp.distilled, distill, lambda c, d, r: distill.train(c, d, str(out), data_dir, resume=r, **kw)),
        ("onestep", pp.onestep, distill,
         lambda c, d, r: distill.train_one_step(c, d, str(out), data_dir, resume=r, **kw)),
    ]
    spec = {}
    for name, plan, module, fit in stages:
        if plan is None:
            continue
        cfg = _stage_cfg(module.PRESETS, plan, ov.get(name, []))
        _run_stage(name, out / name, lambda r, fit=fit, cfg=cfg, name=name: fit(cfg, out / name, r), plan.minutes)
        if (out / "denoiser" / "model.safetensors").exists():
            spec = write_pipeline_json(out, pp, ds)
    return spec


def write_pipeline_json(out: Path, pp: PipelinePreset, ds) -> dict:
    """pipeline.json naming the stage directories with their weight hashes, latent scale and defaults."""
    _, scale, shift = load_autoencoder(out / "autoencoder")
    dcfg = stage_config(out / "denoiser", "ldm")
    stages = {name: stage_entry(out, name)
              for name in STAGES
              if (out / name / "model.safetensors").exists()}
    spec = {
        "format": PIPELINE_FORMAT,
        "data": pp.data,
        "stages": stages,
        "latent": {"scale_factor": scale, "shift_factor": shift, "shape": dcfg["conditioning"]["latent_shape"]},
        "image": {"size": list(ds.image_size), "crop": list(ds.crop_box), "channels": ds.channels},
        "data_options": {k: v for k, v in ds.meta["source"].items() if k not in ("spec", "data_dir")},
        **({"classes": ds.label_names["class"]} if pp.data.startswith("folder:") and "class" in ds.labels else {}),
        "defaults": {"guidance": pp.guidance, "guidance_rescale": pp.guidance_rescale, "sampler": pp.sampler,
                     "steps": pp.steps},
        "provenance": provenance(data=pp.data),
    }
    write_json(out / "pipeline.json", spec)
    return spec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="ldmkit train pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="auto", choices=["auto", *sorted(PRESETS)],
                   help="auto: fashion-mnist, or the folder preset of --image-size with --data folder:PATH")
    p.add_argument("--data", default=None, help="folder:PATH of your own images (default: the preset's dataset)")
    p.add_argument("--image-size", type=int, default=None, help="training resolution of --data folder:PATH (32, 64)")
    p.add_argument("--template", default=None, help='prompt of class subfolders (default "a photo of a {}")')
    p.add_argument("--skip-bad", action="store_true", help="folder data: warn and skip unreadable files")
    p.add_argument("--out", required=True, help="pipeline directory")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST idx files")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE:KEY=VALUE",
                   help="override a stage's config, e.g. --set denoiser:train.lr=5e-4 (repeatable)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    ov: dict[str, list[str]] = {}
    for item in args.overrides:
        stage, _, kv = item.partition(":")
        if not kv or stage not in STAGES:
            p.error(f"--set {item!r} must be STAGE:KEY=VALUE with STAGE one of {', '.join(STAGES)}")
        ov.setdefault(stage, []).append(kv)
    pp, data_kw = plan_for(args)
    spec = train_pipeline(pp, args.out, args.data_dir, not args.no_progress, ov, data_kw)
    print(f"pipeline written to {args.out} (stages: {', '.join(spec['stages'])})", file=sys.stderr)
    return 0


def plan_for(args) -> tuple[PipelinePreset, dict]:
    """The pipeline preset and folder options that --preset, --data, --image-size and --template ask for."""
    folder = args.data is not None and args.data.startswith("folder:")
    if args.data is not None and not folder and args.data not in ("fashion-mnist", "shapes"):
        raise ValueError(f"--data {args.data!r}: use folder:PATH for your own images (or fashion-mnist, shapes)")
    name = args.preset
    if name == "auto":
        size = args.image_size or 32
        if folder and size not in FOLDER_PRESETS:
            raise ValueError(f"--image-size {size}: the folder presets are {sorted(FOLDER_PRESETS)} pixels on CPUs; "
                             "pick one of them, or pass --preset tiny for a quick check at any size")
        name = FOLDER_PRESETS[size] if folder else (args.data or "fashion-mnist")
    pp = PRESETS[name]
    if pp.data == "folder" and not folder:
        raise ValueError(f"--preset {name} trains on your images: pass --data folder:PATH")
    if folder:
        pp = replace(pp, data=args.data, image_size=args.image_size or pp.image_size)
    elif args.image_size is not None and args.image_size != pp.image_size:
        raise ValueError(f"--image-size applies to --data folder:PATH; {pp.data} trains at {pp.image_size} pixels")
    data_kw = {"skip_bad": True} if args.skip_bad else {}
    if args.template is not None:
        data_kw["template"] = args.template
    if (args.skip_bad or args.template) and not folder:
        raise ValueError("--skip-bad and --template apply to --data folder:PATH only")
    return pp, data_kw
