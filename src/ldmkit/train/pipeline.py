"""`ldmkit train pipeline --preset fashion-mnist --out DIR`: every stage of a text-to-image pipeline, in order.

Order: evaluation classifier (Fashion-MNIST only, frozen before any generator), autoencoder, CLIP, denoiser,
noise-aware classifier, fast decoder; then `pipeline.json` with each stage's weight hash, the latent scale factor and
the sampling defaults. A stage that already finished (its metrics.json exists) is kept; one that was interrupted
resumes from its last checkpoint, so rerunning the command continues where it stopped.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from ldmkit.checkpoint import provenance, write_json
from ldmkit.config import apply_overrides, preset
from ldmkit.data import load_dataset
from ldmkit.stages import load_autoencoder, stage_config, weights_hash
from ldmkit.train import autoencoder, classifier, clip, distill, eval_classifier, fast_decoder, ldm


@dataclass(frozen=True)
class StagePlan:
    preset: str                      # the stage's own preset name (a fixed number of steps)
    overrides: tuple[str, ...] = ()  # extra --set overrides for the stage


@dataclass(frozen=True)
class PipelinePreset:
    data: str                                  # dataset spec
    autoencoder: StagePlan
    clip: StagePlan
    denoiser: StagePlan
    classifier: StagePlan | None = None        # noise-aware classifier for classifier guidance
    eval_classifier: StagePlan | None = None   # frozen evaluation classifier (Fashion-MNIST)
    fast_decoder: StagePlan | None = None      # small decoder of the same latents (`--decoder fast`)
    distilled: StagePlan | None = None         # guidance-distilled student (`--distilled`: one row per step)
    onestep: StagePlan | None = None           # one-step student of the distilled one (`--one-step`)
    guidance: float = 3.0                      # default CFG scale of the pipeline
    guidance_rescale: float = 0.0              # default guidance rescale phi (applied at scales above 1)
    sampler: str = "dpmpp-2m"                  # default sampler
    steps: int = 20                            # default sampling steps


PRESETS = {
    "tiny": PipelinePreset(data="shapes", autoencoder=StagePlan("tiny"), clip=StagePlan("tiny"),
                           denoiser=StagePlan("tiny"), classifier=StagePlan("tiny"),
                           fast_decoder=StagePlan("tiny"), steps=4),
    "tiny-fashion": PipelinePreset(data="fashion-mnist", autoencoder=StagePlan("tiny"), clip=StagePlan("tiny"),
                                   denoiser=StagePlan("tiny"), classifier=StagePlan("tiny"),
                                   eval_classifier=StagePlan("tiny"), distilled=StagePlan("tiny"),
                                   onestep=StagePlan("tiny", ("one_step_from=2",)), steps=4),
    # guidance rescale 0.7 at w = 3 against plain CFG, on the two earlier Fashion-MNIST pipelines (1,000 images):
    # accuracy 98.7 vs 99.2% and recall 0.64 vs 0.59 (token-conditioned, 28.6 dB autoencoder); 98.9 vs 99.0% and
    # 0.51 vs 0.44 (pooled-only, 26.1 dB). It keeps accuracy within half a point and buys recall, so it is the default.
    "fashion-mnist": PipelinePreset(data="fashion-mnist", autoencoder=StagePlan("fashion-mnist"),
                                    clip=StagePlan("fashion-mnist"), denoiser=StagePlan("fashion-mnist"),
                                    classifier=StagePlan("fashion-mnist"),
                                    eval_classifier=StagePlan("fashion-mnist"),
                                    fast_decoder=StagePlan("fashion-mnist"), distilled=StagePlan("fashion-mnist"),
                                    onestep=StagePlan("fashion-mnist", ("one_step_from=2",)), guidance_rescale=0.7),
    "shapes": PipelinePreset(data="shapes", autoencoder=StagePlan("shapes"), clip=StagePlan("shapes"),
                             denoiser=StagePlan("shapes")),
}


STAGES = ("autoencoder", "clip", "denoiser", "classifier", "eval-classifier", "fast-decoder", "distilled",
          "onestep")  # trained here, in order; each is named in pipeline.json when present


def _stage_cfg(presets, plan: StagePlan, extra: list[str]):
    return apply_overrides(preset(presets, plan.preset, "stage preset"), [*plan.overrides, *extra])


def _run_stage(name: str, out: Path, fn) -> None:
    """Skip a finished stage, resume an interrupted one, else start it."""
    if (out / "metrics.json").exists() and (out / "model.safetensors").exists():
        print(f"[pipeline] {name}: already trained in {out}, kept", file=sys.stderr)
        return
    resume = (out / "state.pt").exists()
    print(f"[pipeline] {name}: {'resuming' if resume else 'training'} -> {out}", file=sys.stderr)
    fn(resume)


def train_pipeline(pp: PipelinePreset, out: str | Path, data_dir: str | None = None, progress: bool = True,
                   overrides: dict[str, list[str]] | None = None) -> dict:
    out, ov = Path(out), overrides or {}
    kw = {"data_dir": data_dir} if pp.data == "fashion-mnist" else {}
    ds = load_dataset(pp.data, split="train", **kw)
    if pp.eval_classifier is not None:
        ecfg = apply_overrides(preset(eval_classifier.PRESETS, pp.eval_classifier.preset),
                               ov.get("eval-classifier", []))
        _run_stage("eval-classifier", out / "eval-classifier",
                   lambda r: eval_classifier.train(ecfg, out / "eval-classifier", data_dir, progress))
    acfg = _stage_cfg(autoencoder.PRESETS, pp.autoencoder, ov.get("autoencoder", []))
    _run_stage("autoencoder", out / "autoencoder",
               lambda r: autoencoder.train(acfg, out / "autoencoder", pp.data, ds, resume=r, progress=progress))
    ccfg = _stage_cfg(clip.PRESETS, pp.clip, ov.get("clip", []))
    _run_stage("clip", out / "clip", lambda r: clip.train(ccfg, out / "clip", pp.data, ds, resume=r,
                                                          progress=progress))
    dcfg = _stage_cfg(ldm.PRESETS, pp.denoiser, ov.get("denoiser", []))
    _run_stage("denoiser", out / "denoiser",
               lambda r: ldm.train(dcfg, out / "denoiser", pp.data, ds, str(out / "autoencoder"), str(out / "clip"),
                                   resume=r, progress=progress))
    if pp.classifier is not None and "class" in ds.labels:
        kcfg = _stage_cfg(classifier.PRESETS, pp.classifier, ov.get("classifier", []))
        _run_stage("classifier", out / "classifier",
                   lambda r: classifier.train(kcfg, out / "classifier", pp.data, ds, str(out / "autoencoder"),
                                              resume=r, progress=progress))
    if pp.fast_decoder is not None:
        fcfg = _stage_cfg(fast_decoder.PRESETS, pp.fast_decoder, ov.get("fast-decoder", []))
        _run_stage("fast-decoder", out / "fast-decoder",
                   lambda r: fast_decoder.train(fcfg, out / "fast-decoder", pp.data, ds, str(out / "autoencoder"),
                                                resume=r, progress=progress))
    spec = write_pipeline_json(out, pp, ds)
    for name, plan in (("distilled", pp.distilled), ("onestep", pp.onestep)):  # students of the written pipeline
        if plan is not None:
            cfg = _stage_cfg(distill.PRESETS, plan, ov.get(name, []))
            fn = distill.train_one_step if cfg.one_step_from > 0 else distill.train
            _run_stage(name, out / name, lambda r, fn=fn, cfg=cfg, name=name: fn(
                cfg, out / name, str(out), data_dir, resume=r, progress=progress))
            spec = write_pipeline_json(out, pp, ds)
    return spec


def write_pipeline_json(out: Path, pp: PipelinePreset, ds) -> dict:
    """pipeline.json naming the stage directories with their weight hashes, latent scale and defaults."""
    _, scale, shift = load_autoencoder(out / "autoencoder")
    dcfg = stage_config(out / "denoiser", "ldm")
    stages = {name: {"path": name, "sha256": weights_hash(out / name)}
              for name in STAGES
              if (out / name / "model.safetensors").exists()}
    spec = {
        "format": "ldmkit-pipeline/1",
        "data": pp.data,
        "stages": stages,
        "latent": {"scale_factor": scale, "shift_factor": shift, "shape": dcfg["conditioning"]["latent_shape"]},
        "image": {"size": list(ds.image_size), "crop": list(ds.crop_box), "channels": ds.channels},
        "defaults": {"guidance": pp.guidance, "guidance_rescale": pp.guidance_rescale, "sampler": pp.sampler,
                     "steps": pp.steps},
        "provenance": provenance(data=pp.data),
    }
    write_json(out / "pipeline.json", spec)
    return spec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="ldmkit train pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="fashion-mnist", choices=sorted(PRESETS))
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
    spec = train_pipeline(PRESETS[args.preset], args.out, args.data_dir, not args.no_progress, ov)
    print(f"pipeline written to {args.out} (stages: {', '.join(spec['stages'])})", file=sys.stderr)
    return 0
