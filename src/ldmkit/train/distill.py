"""`ldmkit train distill --pipeline DIR`: guidance distillation, one network call per sampling step.

Classifier-free guidance costs two denoiser rows per image and step (conditional and unconditional). A student
initialised from the pipeline's denoiser learns to predict the *guided* output at one fixed guidance setting (the
pipeline's default w and rescale phi; stage one of Meng et al. 2023, "On Distillation of Guided Diffusion Models"),
so sampling with it (`ldmkit sample --distilled`) evaluates one row per step instead of two.

With `--set one_step_from=N` the teacher is that guidance-distilled student run for N steps of
`one_step_sampler`, and a copy of it learns to predict the N-step sample from the starting noise in one call
(its prediction at sigma = inf; knowledge distillation of a sampler, Luhman & Luhman 2021). It goes to
PIPELINE/onestep and serves `ldmkit sample --one-step` (one network call per image, prompted sampling only).

Each step draws latents from the autoencoder's cache, captions from the training templates, a time and noise as
the denoiser's own training does, and regresses the student's velocity on the teacher's guided velocity
(D_u + w (D_c - D_u), rescaled by phi, turned back into a velocity). A fraction `p_uncond` of the captions is
dropped to the null condition with the teacher's unguided unconditional prediction as the target, so the empty
prompt keeps its meaning. Flow-matching denoisers only (the pipelines' objective).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldmkit.checkpoint import read_json, write_json
from ldmkit.config import apply_overrides, from_dict, preset
from ldmkit.data import load_dataset
from ldmkit.diffusion.objectives import draw_training_noise, logit_normal_time, make_denoiser
from ldmkit.diffusion.schedules import NUM_TRAIN_STEPS
from ldmkit.guidance.cfg import Guidance, guided_denoiser
from ldmkit.nn import per_example
from ldmkit.pipeline import Pipeline, PromptEncoder, sample_latents
from ldmkit.seeding import example_generators, example_seed, randn
from ldmkit.stages import stage_entry
from ldmkit.train import common
from ldmkit.train.common import TrainConfig
from ldmkit.train.latent_cache import draw_latents, posterior_cache
from ldmkit.train.ldm import LDMConfig, grid_prompts

NOISE_SEED_OFFSET = 7919  # the student's draws differ from the ones the teacher was trained on


@dataclass(frozen=True)
class DistillStage:
    guidance: float = 0.0             # w the student reproduces; 0 = the pipeline's default
    guidance_rescale: float = -1.0    # phi; -1 = the pipeline's default
    p_uncond: float = 0.1             # captions dropped to the null condition (target: the unguided D_u)
    one_step_from: int = 0            # > 0: distil this many steps of the guidance-distilled student into one
    one_step_sampler: str = "dpmpp-2m"  # the sampler of those steps
    teacher_sha256: str = ""          # the denoiser distilled (filled in)
    denoiser: LDMConfig = field(default_factory=LDMConfig)  # the teacher's config (filled in): same architecture
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=1500, batch_size=64, lr=2e-4, warmup_steps=50, ema_halflife_steps=100, min_lr_ratio=0.1,
        log_every=50, ckpt_every=250))  # about 6 minutes on 2 AVX512-BF16 cores


PRESETS = {
    "tiny": DistillStage(train=TrainConfig(steps=20, batch_size=16, lr=2e-4, warmup_steps=2, log_every=5,
                                           ckpt_every=10, ema_halflife_steps=5)),
    "fashion-mnist": DistillStage(),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="ldmkit train distill", description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", required=True, help="pipeline directory (its denoiser is the teacher)")
    p.add_argument("--preset", default="fashion-mnist", choices=sorted(PRESETS))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set guidance=4 (repeatable)")
    p.add_argument("--out", default=None, help="stage directory (default: PIPELINE/distilled)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST idx files")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    cfg = apply_overrides(preset(PRESETS, args.preset), args.overrides)
    name = "onestep" if cfg.one_step_from > 0 else "distilled"
    out = Path(args.out) if args.out else Path(args.pipeline) / name
    fn = train_one_step if cfg.one_step_from > 0 else train
    fn(cfg, out, args.pipeline, args.data_dir, resume=args.resume, progress=not args.no_progress)
    if args.out is None:
        register(Path(args.pipeline), name)
    return 0


def training_data(pipe: Pipeline, data_dir: str | None):
    """(spec, train split) of the data the pipeline was trained on, loaded as it was (size, folder options)."""
    spec = pipe.spec["data"]
    kw = dict(pipe.spec.get("data_options", {}))
    if spec == "fashion-mnist":
        kw["data_dir"] = data_dir
    return spec, load_dataset(spec, split="train", **kw)


@torch.no_grad()
def student_grid(run, pipe: Pipeline, student, encode, ds, sampler: str, steps: int, per_prompt: int = 8) -> None:
    """The student's samples (guidance is inside it: scale 1), one grid row per prompt, into the run folder."""
    if not run.is_main:
        return
    rows = [p for p in grid_prompts(ds)[:4] for _ in range(per_prompt)]
    was = student.training
    z = sample_latents(student.eval(), pipe.objective, encode, rows, range(len(rows)), tuple(pipe.latent_shape),
                       seed=0, guidance=Guidance(scale=1.0), sampler=sampler, steps=steps)
    student.train(was)
    run.image(pipe.decode(z), "samples", nrow=per_prompt)


def student_of(teacher: torch.nn.Module, run):
    """A trainable copy of the teacher, its EMA and optimizer, restored when resuming: (model, ema, net, opt, start)."""
    model = copy.deepcopy(teacher).to(run.device).train().requires_grad_(True)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = common.make_adamw(model.parameters(), run.tc)
    start = run.restore({"model": model, "ema": ema}, {"opt": opt})
    return model, ema, common.wrap_ddp(model, run.device), opt, start


def update(run, step: int, loss: torch.Tensor, model, ema, opt) -> None:
    """Backward, clip, optimizer step, EMA, log and checkpoint: the end of both distillation loops' steps."""
    tc = run.tc
    loss.backward()
    gnorm = common.clip_grad(model.parameters(), tc.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    common.ema_update(ema, model, tc.ema_halflife_steps)
    run.log(step, loss=loss.item(), grad_norm=gnorm, lr=opt.param_groups[0]["lr"])
    if run.should(tc.ckpt_every, step):
        run.save(step + 1, {"model": model, "ema": ema}, {"opt": opt}, ema.state_dict())


def register(root: Path, name: str = "distilled") -> None:
    """Name the distilled stage in pipeline.json with its weight hash (the other entries stay as they are)."""
    spec = read_json(root / "pipeline.json")
    spec["stages"][name] = stage_entry(root, name)
    write_json(root / "pipeline.json", spec)


def train(cfg: DistillStage, out, pipeline_dir, data_dir: str | None = None, resume: bool = False,
          progress: bool = True) -> dict:
    root, out = Path(pipeline_dir), Path(out)
    pipe = Pipeline.load(root)
    if pipe.objective.kind != "flow":
        raise ValueError(f"{root}: guidance distillation is implemented for flow-matching denoisers; this one "
                         f"predicts {pipe.objective.kind!r}")
    st = pipe.spec["stages"]
    teacher_cfg = {k: v for k, v in read_json(root / st["denoiser"]["path"] / "config.json").items()
                   if k not in ("stage", "data", "data_options")}
    w = cfg.guidance or float(pipe.defaults["guidance"])
    phi = cfg.guidance_rescale if cfg.guidance_rescale >= 0 else float(pipe.defaults.get("guidance_rescale", 0.0))
    cfg = dataclasses.replace(cfg, guidance=w, guidance_rescale=phi, teacher_sha256=st["denoiser"]["sha256"],
                              denoiser=from_dict(LDMConfig, teacher_cfg))
    tc, c = cfg.train, cfg.denoiser.conditioning
    spec, ds = training_data(pipe, data_dir)
    run = common.start_run(out, cfg, tc, "distill", data=spec, dataset=ds, resume=resume, progress=progress)
    cache = posterior_cache(root / st["autoencoder"]["path"], pipe.autoencoder, st["autoencoder"]["sha256"], ds,
                            spec, "train", fallback_dir=out, progress=progress)
    teacher = make_denoiser(pipe.backbone.to(run.device), pipe.objective)
    model, ema, net, opt, start = student_of(pipe.backbone, run)
    encode = PromptEncoder(pipe.encode.text_encoder, tokens=pipe.encode.tokens)
    seed = tc.seed + NOISE_SEED_OFFSET
    step, loss = start, torch.zeros(())
    for step in run.steps(start, tc.steps):
        idx, gidx = common.batch_indices(len(ds), tc.batch_size, step, tc.seed, run.rank, run.world)
        x0 = draw_latents(cache, idx, gidx, seed, c.scale_factor, c.shift_factor).to(run.device)
        captions = [ds.caption(int(i), random.Random(example_seed(seed, int(g), 2))) for i, g in zip(idx, gidx)]
        noise, u, drop = draw_training_noise(seed, gidx, tuple(x0.shape[1:]), cfg.p_uncond, device=run.device)
        cond = {k: v.to(run.device) for k, v in encode(captions).items()}
        drop = drop | cond["drop"]
        cond["drop"] = drop
        t = logit_normal_time(u, pipe.objective.logit_mean, pipe.objective.logit_std).clamp(1e-4, 1 - 1e-4)
        tb = per_example(t, x0)
        x_t = (1 - tb) * x0 + tb * noise
        sigma = t / (1 - t)
        with torch.no_grad():  # the teacher's guided x0 (dropped rows: scale 1 on the null condition = D_u)
            scale = torch.where(drop, torch.ones_like(t), torch.full_like(t, w))
            guided = guided_denoiser(teacher, cond, {**cond, "drop": torch.ones_like(drop)}, scale, rescale=phi,
                                     rescale_space="flow")
            target = (x_t - guided(x_t * per_example(1 + sigma, x_t), sigma)) / tb  # velocity of D_guided
        common.set_lr(opt, common.lr_at(step, tc))
        with common.autocast(run.device, tc.precision):
            pred = net(x_t, t * NUM_TRAIN_STEPS, **cond)
        loss = (pred.float() - target.float()).square().mean()
        update(run, step, loss, model, ema, opt)
        step += 1
    student_grid(run, pipe, ema, encode, ds, pipe.defaults["sampler"], int(pipe.defaults["steps"]))
    return run.finish(ema.state_dict(), {"final_loss": loss.item(), "guidance": w, "guidance_rescale": phi}, step)


def train_one_step(cfg: DistillStage, out, pipeline_dir, data_dir: str | None = None, resume: bool = False,
                   progress: bool = True) -> dict:
    """A one-call student of the guidance-distilled denoiser's `one_step_from`-step sampler (see the docstring)."""
    root, out = Path(pipeline_dir), Path(out)
    pipe = Pipeline.load(root)
    st = pipe.spec["stages"]
    if pipe.distilled is None:
        raise ValueError(f"{root} has no distilled denoiser to distil into one step; run `ldmkit train distill "
                         f"--pipeline {root}` first")
    teacher, tcfg = pipe.distilled
    cfg = dataclasses.replace(cfg, guidance=float(tcfg["guidance"]), guidance_rescale=float(tcfg["guidance_rescale"]),
                              teacher_sha256=st["distilled"]["sha256"], denoiser=from_dict(LDMConfig, tcfg["denoiser"]))
    tc, shape = cfg.train, tuple(pipe.latent_shape)
    spec, ds = training_data(pipe, data_dir)
    run = common.start_run(out, cfg, tc, "distill", data=spec, dataset=ds, resume=resume, progress=progress)
    teacher = teacher.to(run.device)
    model, ema, net, opt, start = student_of(teacher, run)
    student = make_denoiser(net, pipe.objective)
    encode = PromptEncoder(pipe.encode.text_encoder, tokens=pipe.encode.tokens)
    seed = tc.seed + NOISE_SEED_OFFSET
    step, loss = start, torch.zeros(())
    for step in run.steps(start, tc.steps):
        idx, gidx = common.batch_indices(len(ds), tc.batch_size, step, tc.seed, run.rank, run.world)
        captions = [ds.caption(int(i), random.Random(example_seed(seed, int(g), 2))) for i, g in zip(idx, gidx)]
        with torch.no_grad():  # the teacher's N-step samples from the noise of (seed, global index)
            target = sample_latents(teacher, pipe.objective, encode, captions, gidx.tolist(), shape, seed=seed,
                                    guidance=Guidance(scale=1.0), sampler=cfg.one_step_sampler,
                                    steps=cfg.one_step_from, micro_batch=tc.batch_size)
        z = randn((len(captions), *shape), example_generators(seed, gidx.tolist())).to(run.device)
        cond = {k: v.to(run.device) for k, v in encode(captions).items()}
        common.set_lr(opt, common.lr_at(step, tc))
        with common.autocast(run.device, tc.precision):
            pred = student(z, torch.full((len(z),), float("inf"), device=run.device), cond)
        loss = (pred.float() - target.to(run.device).float()).square().mean()
        update(run, step, loss, model, ema, opt)
        step += 1
    student_grid(run, pipe, ema, encode, ds, cfg.one_step_sampler, 1)
    return run.finish(ema.state_dict(), {"final_loss": loss.item(), "one_step_from": cfg.one_step_from,
                                         "guidance": cfg.guidance, "guidance_rescale": cfg.guidance_rescale}, step)
