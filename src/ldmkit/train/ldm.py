"""`ldmkit train ldm`: the latent denoiser (UNet or DiT), trained on cached autoencoder latents.

Prompts reach the denoiser only through the frozen text encoder (a CLIP stage's text tower, or MiniLM); captions
are drawn per example from the dataset's training templates, seeded by the global sample index, and the condition
is replaced by the learned null embedding with probability `objective.p_uncond` (classifier-free guidance).
"""

from __future__ import annotations

import copy
import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ldmkit.checkpoint import atomic_path
from ldmkit.diffusion.dit import PRESETS as DIT_PRESETS
from ldmkit.diffusion.dit import DiTConfig
from ldmkit.diffusion.objectives import Objective, training_loss
from ldmkit.diffusion.unet import PRESETS as UNET_PRESETS
from ldmkit.diffusion.unet import UNetConfig
from ldmkit.eval.clip_cli import image_features
from ldmkit.guidance.cfg import Guidance
from ldmkit.pipeline import PromptEncoder, sample_latents
from ldmkit.seeding import example_generators, example_seed
from ldmkit.stages import build_backbone, load_autoencoder, load_clip, load_text_encoder, weights_hash
from ldmkit.train import common
from ldmkit.train.args import load_data, resolve_config, train_parser
from ldmkit.train.common import TrainConfig
from ldmkit.train.latent_cache import draw_latents, posterior_cache

IMAGE_DROP_STREAM = 4  # example_seed stream of the image-condition dropout (1: noise, 2: captions, 3: latents)


@dataclass(frozen=True)
class Conditioning:
    autoencoder: str = ""             # autoencoder stage directory the latents come from
    autoencoder_sha256: str = ""      # its weight hash (the denoiser is bound to this latent space)
    text_encoder: str = ""            # CLIP stage directory (its frozen text tower) or "minilm"
    text_encoder_sha256: str = ""     # its weight hash
    context_dim: int = 0              # width of the text tokens
    pooled_dim: int = 0               # width of the pooled text vector
    scale_factor: float = 1.0         # latent scale (1 / std of the training latents)
    shift_factor: float = 0.0         # latent shift subtracted before scaling
    latent_shape: tuple[int, ...] = ()  # (c, h, w) of one latent
    image_dim: int = 0                # width of the CLIP image embedding condition (0: text only)
    image_tokens: int = 0             # > 0: the image condition is this many tokens of the CLIP image tower


@dataclass(frozen=True)
class SampleDefaults:
    sampler: str = "dpmpp-2m"         # sampler id for grids and the pipeline default
    steps: int = 20                   # sampling steps
    guidance: float = 3.0             # CFG scale w (1 = conditional, 0 = unconditional)


@dataclass(frozen=True)
class LDMConfig:
    backbone: Literal["unet", "dit"] = "unet"       # which denoiser backbone
    unet: UNetConfig = field(default_factory=UNetConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    objective: Objective = field(default_factory=lambda: Objective(kind="flow"))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=4300, batch_size=128, lr=1e-3, warmup_steps=140, ema_halflife_steps=210, ckpt_every=1000,
        log_every=100, sample_every=1000))  # the Fashion-MNIST UNet: about 20 minutes on 2 AVX512-BF16 cores
    sample: SampleDefaults = field(default_factory=SampleDefaults)
    latent_sample: bool = True        # draw z from the posterior each step (False: use its mean)
    text_tokens: bool = True          # cross-attend to the text tokens; False: the pooled text vector only
    image_condition: bool = False     # also condition on the CLIP image embedding of the training image
    p_image_uncond: float = 0.5       # probability of dropping the image (independent of the text's p_uncond)
    image_tokens: bool = False        # the image tower's last-layer tokens (cross-attended), not its embedding
    conditioning: Conditioning = field(default_factory=Conditioning)


PRESETS = {
    "tiny": LDMConfig(unet=UNET_PRESETS["tiny"], dit=DIT_PRESETS["tiny"],
                      train=TrainConfig(steps=30, batch_size=16, lr=1e-3, warmup_steps=5, ema_halflife_steps=5,
                                        log_every=10, ckpt_every=15), sample=SampleDefaults(steps=4)),
    # pooled CLIP vector only: with cross-attention to the tokens, held-out prompt wordings were read right 91.5% of
    # the time (w = 3, 1,000 images); pooled-only 99.6% (training wordings 99.2% -> 99.5%, recall 0.59 -> 0.56)
    "fashion-mnist": LDMConfig(unet=UNET_PRESETS["fashion-mnist"], dit=DIT_PRESETS["fashion-mnist"],
                               text_tokens=False),
    # also prompted by images (CLIP image embeddings, `ldmkit sample --image-prompt`); `--set image_tokens=true`
    # cross-attends to the image tower's tokens instead: closer variations, but a text prompt can no longer steer
    # them (docs/benchmarks.md: image prompts)
    "fashion-mnist-image": LDMConfig(unet=UNET_PRESETS["fashion-mnist"], dit=DIT_PRESETS["fashion-mnist"],
                                     text_tokens=False, image_condition=True),
    # the weaker model autoguidance guides with: a quarter of the width and of the steps (~0.3M parameters)
    "fashion-mnist-guide": LDMConfig(unet=dataclasses.replace(UNET_PRESETS["fashion-mnist"], channels=16,
                                                              head_dim=32),
                                     dit=DIT_PRESETS["fashion-mnist"], text_tokens=False,
                                     train=TrainConfig(steps=1100, batch_size=128, lr=1e-3, warmup_steps=140,
                                                       ema_halflife_steps=55, ckpt_every=500, log_every=100,
                                                       sample_every=0)),
    "fashion-mnist-dit": LDMConfig(backbone="dit", unet=UNET_PRESETS["fashion-mnist"],
                                   dit=DIT_PRESETS["fashion-mnist"]),
    # 16x16 latents make a step ~4x the Fashion-MNIST one: batch 64; about 20 minutes on 2 AVX512-BF16 cores
    "shapes": LDMConfig(unet=UNET_PRESETS["shapes"], dit=DIT_PRESETS["fashion-mnist"],
                        train=dataclasses.replace(LDMConfig().train, batch_size=64, steps=3150, warmup_steps=105,
                                                  ema_halflife_steps=160)),
}


def grid_prompts(ds, n: int = 8) -> list[str]:
    """Canonical captions of one example per class where there are classes, else of the first examples."""
    if "class" in ds.labels:
        y = ds.labels["class"]
        return [ds.caption(int((y == c).nonzero()[0])) for c in range(len(ds.label_names["class"]))]
    return ds.captions(range(min(n, len(ds))))


def bind(cfg: LDMConfig, ae_dir: str, text_spec: str):
    """Load the autoencoder and text encoder and record them in the config (the denoiser is bound to them)."""
    ae, scale, shift = load_autoencoder(ae_dir)
    text, tinfo = load_text_encoder(text_spec)
    f = ae.cfg.downsample_factor
    if cfg.image_condition and tinfo["kind"] != "clip":
        raise ValueError(f"image_condition=true reads CLIP image embeddings: --text-encoder {text_spec} must be a "
                         "CLIP stage directory (its image tower embeds the images)")
    image_dim, image_tokens = (text.pooled_dim, 0) if cfg.image_condition else (0, 0)
    if cfg.image_condition and cfg.image_tokens:
        vision = load_clip(text_spec).vision
        image_dim, image_tokens = vision.config.width, vision.position_embedding.shape[1]
    cond = Conditioning(autoencoder=str(ae_dir), autoencoder_sha256=weights_hash(ae_dir),
                        text_encoder=str(text_spec), text_encoder_sha256=tinfo["sha256"],
                        context_dim=text.context_dim, pooled_dim=text.pooled_dim, scale_factor=scale,
                        shift_factor=shift, latent_shape=(ae.cfg.latent_channels, 32 // f, 32 // f),
                        image_dim=image_dim, image_tokens=image_tokens)
    return dataclasses.replace(cfg, conditioning=cond), ae, text


def main(argv: list[str] | None = None) -> int:
    p = train_parser("ldmkit train ldm", __doc__.splitlines()[0], PRESETS, "fashion-mnist")
    p.add_argument("--autoencoder", required=True, help="autoencoder stage directory")
    p.add_argument("--text-encoder", required=True, help="CLIP stage directory, or 'minilm'")
    args = p.parse_args(argv)
    cfg = resolve_config(args, PRESETS)
    spec, ds = load_data(args)
    train(cfg, args.out, spec, ds, args.autoencoder, args.text_encoder, resume=args.resume,
          init_from=args.init_from, progress=not args.no_progress)
    return 0


def train(cfg: LDMConfig, out, spec: str, ds, ae_dir: str, text_spec: str, resume: bool = False,
          init_from: str | None = None, progress: bool = True) -> dict:
    cfg, ae, text = bind(cfg, ae_dir, text_spec)
    c = cfg.conditioning
    lc = ae.cfg.latent_channels  # the backbone reads and predicts the autoencoder's latent channels
    cfg = dataclasses.replace(
        cfg, conditioning=dataclasses.replace(
            c, latent_shape=(c.latent_shape[0], ds.image_size[0] // ae.cfg.downsample_factor,
                             ds.image_size[1] // ae.cfg.downsample_factor)),
        unet=dataclasses.replace(cfg.unet, in_channels=lc, out_channels=lc),
        dit=dataclasses.replace(cfg.dit, in_channels=lc, out_channels=lc,
                                input_size=ds.image_size[0] // ae.cfg.downsample_factor))
    tc, c = cfg.train, cfg.conditioning
    run = common.start_run(out, cfg, tc, "ldm", data=spec, dataset=ds, resume=resume, init_from=init_from,
                           progress=progress)
    cache = posterior_cache(ae_dir, ae, c.autoencoder_sha256, ds, spec, "train", fallback_dir=out, progress=progress)
    model = build_backbone(dataclasses.asdict(cfg), c.context_dim, c.pooled_dim).to(run.device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    net = common.wrap_ddp(model, run.device)
    opt = common.make_adamw(model.parameters(), tc)
    start = run.restore({"model": model, "ema": ema}, {"opt": opt})
    encode = PromptEncoder(text, tokens=cfg.text_tokens)
    embeds = image_embeddings(text_spec, c.text_encoder_sha256, ds, spec, out, tokens=cfg.image_tokens) \
        if cfg.image_condition else None
    prompts_grid = grid_prompts(ds)
    step, loss = start, torch.zeros(())
    for step in run.steps(start, tc.steps):
        idx, gidx = common.batch_indices(len(ds), tc.batch_size, step, tc.seed, run.rank, run.world)
        x0 = draw_latents(cache, idx, gidx, tc.seed, c.scale_factor, c.shift_factor, cfg.latent_sample)
        captions = [ds.caption(int(i), random.Random(example_seed(tc.seed, int(g), 2))) for i, g in zip(idx, gidx)]
        cond = {k: v.to(run.device) for k, v in encode(captions).items() if k != "drop"}
        if embeds is not None:  # the training image's own CLIP embedding, dropped independently of the text
            cond["image"] = embeds[idx].float().to(run.device)
            cond["drop_image"] = draw_image_drop(tc.seed, gidx, cfg.p_image_uncond).to(run.device)
        common.set_lr(opt, common.lr_at(step, tc))
        with common.autocast(run.device, tc.precision):
            loss = training_loss(net, x0.to(run.device), cond, gidx, cfg.objective, tc.seed).mean()
        loss.backward()
        gnorm = common.clip_grad(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        common.ema_update(ema, model, tc.ema_halflife_steps)
        run.log(step, loss=loss.item(), grad_norm=gnorm, lr=opt.param_groups[0]["lr"])
        if run.is_main and run.should(tc.sample_every, step):
            run.image(sample_grid(ema, cfg, encode, prompts_grid, ae), "samples", step + 1, nrow=8)
        if run.should(tc.ckpt_every, step):
            run.save(step + 1, {"model": model, "ema": ema}, {"opt": opt}, ema.state_dict())
        step += 1
    metrics = {"final_loss": loss.item(), "params": sum(p.numel() for p in model.parameters())}
    if run.is_main:
        run.image(sample_grid(ema, cfg, encode, prompts_grid, ae), "samples", nrow=8)
    return run.finish(ema.state_dict(), metrics, step)


def draw_image_drop(seed: int, gidx: torch.Tensor, p: float) -> torch.Tensor:
    """(B,) bool: drop sample g's image condition with probability p, seeded by (seed, g) alone."""
    return torch.tensor([torch.rand((), generator=g).item() < p
                         for g in example_generators(seed, gidx, IMAGE_DROP_STREAM)], dtype=torch.bool)


def image_embeddings(clip_dir: str, clip_hash: str, ds, spec: str, out, tokens: bool = False) -> torch.Tensor:
    """(N, E) unit CLIP image embeddings of the training images, or with `tokens` the image tower's tokens
    (N, T, Dv) in float16, computed once and kept in the stage directory (`image-embeddings.safetensors`, bound to
    the CLIP weights' hash)."""
    path = Path(out) / "image-embeddings.safetensors"
    meta = {"clip_sha256": clip_hash, "data": spec, "n": str(len(ds)), "tokens": str(bool(tokens))}
    if path.exists():
        with safe_open(str(path), "pt") as f:
            if f.metadata() == meta:
                return f.get_tensor("embeddings")
    feats = image_features(load_clip(clip_dir), ds.images, tokens=tokens)
    feats = feats.half() if tokens else feats
    with atomic_path(path) as tmp:
        save_file({"embeddings": feats.contiguous()}, str(tmp), metadata=meta)
    return feats


@torch.no_grad()
def sample_grid(backbone, cfg: LDMConfig, encode, prompts: list[str], ae, per_prompt: int = 8) -> torch.Tensor:
    """`per_prompt` images per prompt (one grid row each), sampled with the preset's sampler and guidance."""
    c, s = cfg.conditioning, cfg.sample
    rows = [p for p in prompts for _ in range(per_prompt)]
    was = backbone.training
    backbone.eval()
    z = sample_latents(backbone, cfg.objective, encode, rows, range(len(rows)), tuple(c.latent_shape), seed=0,
                       guidance=Guidance(scale=s.guidance), sampler=s.sampler, steps=s.steps)
    backbone.train(was)
    return ae.decode(z / c.scale_factor + c.shift_factor).clamp(-1, 1)
