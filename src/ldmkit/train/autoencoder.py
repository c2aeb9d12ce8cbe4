"""`ldmkit train autoencoder`: the KL autoencoder with pixel, KL, perceptual and adversarial losses.

Rombach et al. 2022 (appendix G) and Esser et al. 2021: each step is a generator step (reconstruction L1/L2 +
kl_weight * KL + LPIPS, plus the adaptively weighted PatchGAN term once `loss.disc_start` is reached) followed,
from `disc_warmup_steps` before that, by a discriminator step with its own optimizer (so the adversarial term starts
from a discriminator that already tells reconstructions apart). The perceptual distance uses a small feature
network trained on the training images at the start of the run (`lpips_featnet.safetensors` in the stage
directory, reused on resume; see ldmkit.autoencoder.featnet) unless `loss.featnet_path` or VGG16 weights are given.

At the end the EMA autoencoder encodes the training images (the first `stats_images` in file order) and the latent
scale factor is set to 1 / std of posterior samples z ~ q(z|x) (Rombach et al. 2022, sec. 4.3.2), computed exactly
from the posterior moments. Like Stable Diffusion we subtract no shift by default (`latent_shift=False`,
shift_factor 0), so the denoiser sees z * scale; the fashion-mnist preset's latents have a mean of about 0.4 std,
which `latent_shift=true` removes (one scalar, the mean over all latent elements, recorded as shift_factor).
metrics.json gets scale_factor, shift_factor, the latent mean, and the test PSNR of the exported (EMA) weights.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ldmkit.autoencoder import (
    LPIPS,
    AutoencoderConfig,
    AutoencoderKL,
    PixelSpace,
    build_perceptual,
    load_featnet,
    make_autoencoder,
    save_featnet,
)
from ldmkit.autoencoder import PRESETS as AE_PRESETS
from ldmkit.autoencoder.loss import PRESETS as LOSS_PRESETS
from ldmkit.autoencoder.loss import (
    LossConfig,
    build_discriminator,
    disc_factor,
    discriminator_loss,
    generator_loss,
    init_output_logvar,
)
from ldmkit.checkpoint import write_bytes
from ldmkit.data import other_split
from ldmkit.eval.autoencoder_eval import latent_statistics, reconstruct
from ldmkit.eval.metrics import psnr
from ldmkit.seeding import example_generators, randn
from ldmkit.train import common
from ldmkit.train.args import stage_main
from ldmkit.train.common import TrainConfig

FEATNET_FILE = "lpips_featnet.safetensors"
NOISE_STREAM = 5  # example_seed stream of the posterior draws (other stages use 0-3)


@dataclass(frozen=True)
class AutoencoderStage:
    model: AutoencoderConfig = field(default_factory=lambda: AE_PRESETS["fashion-mnist"])
    loss: LossConfig = field(default_factory=lambda: LOSS_PRESETS["fashion-mnist"])
    train: TrainConfig = field(default_factory=TrainConfig)
    disc_lr: float = 2e-4                      # discriminator AdamW learning rate (constant)
    disc_betas: tuple[float, float] = (0.5, 0.9)  # discriminator AdamW betas (taming-transformers)
    disc_warmup_steps: int = 0                 # the discriminator trains alone this many steps before disc_start
    channels_from_data: bool = True            # set model/discriminator channels from the dataset (False: must match)
    latent_shift: bool = False                 # also subtract the latent mean (shift_factor); SD uses none
    stats_images: int = 20000                  # training images for the scale factor; 0 = all
    eval_images: int = 0                       # test images for the final PSNR; 0 = all (Fashion-MNIST: 10,000)
    grid_images: int = 16                      # originals (beside their reconstructions) in the sample grid


def _train(**kw) -> TrainConfig:
    # grad_clip 0: the losses are per-image sums over ~1000 pixels, so gradient norms are O(1e3); clipping at 1
    # would rescale every step. Adam's updates are bounded by the learning rate anyway.
    return TrainConfig(**{"log_every": 100, "ckpt_every": 500, "sample_every": 500, "grad_clip": 0.0,
                          "precision": "bf16", **kw})


# The evidence behind each choice (races, ablations, per-batch-size speeds) is in docs/benchmarks.md.
PRESETS = {
    # seconds: tests and the tiny pipelines (shapes and Fashion-MNIST; channels come from the data)
    "tiny": AutoencoderStage(model=AE_PRESETS["tiny"], loss=LOSS_PRESETS["tiny"], stats_images=256,
                             eval_images=256, grid_images=8,
                             train=TrainConfig(steps=20, batch_size=16, lr=1e-3, warmup_steps=2, log_every=5,
                                               ckpt_every=10, ema_halflife_steps=5, grad_clip=0.0)),
    # 32x32 -> 8x8x4 (factor 4, 2.7M params); about 12 minutes on 2 AVX512-BF16 cores
    "fashion-mnist": AutoencoderStage(
        model=dataclasses.replace(AE_PRESETS["fashion-mnist"], block_out_channels=(32, 64, 128)),
        # L1 + 1e-6 KL + 0.1 LPIPS (featnet); the adaptive GAN term (weight 0.1) for the last 15% of the steps
        loss=dataclasses.replace(LOSS_PRESETS["fashion-mnist"], disc_weight=0.1, disc_start=2800),
        train=_train(steps=3300, batch_size=16,  # small batches learn the most PSNR per second here
                     lr=2e-3, warmup_steps=110, min_lr_ratio=0.02,
                     optimizer="muon", betas=(0.9, 0.99),  # Muon on weight matrices: ~2x the progress per step
                     ema_halflife_steps=80),  # short: the EMA must carry the GAN phase's sharpening
        disc_warmup_steps=650,  # the discriminator learns alone before its term reaches the autoencoder
        stats_images=5000, eval_images=2000),  # keep the end of the run to seconds (`autoencoder eval`: all)
    # For CPUs without fast bf16 (AVX2): 2x2 pixel patches as channels, widths 32 / 64 (0.66M params), AdamW
    # pixel-space diffusion: the identity "autoencoder" (no steps; the stage records the pixels' scale)
    "pixels": AutoencoderStage(model=AE_PRESETS["pixels"], loss=LOSS_PRESETS["tiny"], stats_images=5000,
                               eval_images=256, train=TrainConfig(steps=0)),
    "fashion-mnist-small": AutoencoderStage(
        model=dataclasses.replace(AE_PRESETS["fashion-mnist"], block_out_channels=(32, 64), patch_size=2),
        loss=dataclasses.replace(LOSS_PRESETS["fashion-mnist"], disc_weight=0.02, disc_start=4250),
        train=_train(steps=5000, batch_size=16, lr=2e-3, warmup_steps=170, ema_halflife_steps=330,
                     min_lr_ratio=0.02),
        disc_warmup_steps=1000, stats_images=5000, eval_images=2000),
    # Shapes: 32x32 -> 16x16x8 (factor 2: a shape is 6-12 pixels wide), L2 (see the loss preset); about 11 minutes
    "shapes": AutoencoderStage(
        model=dataclasses.replace(AE_PRESETS["shapes"], block_out_channels=(32, 64), latent_channels=8),
        loss=dataclasses.replace(LOSS_PRESETS["shapes"], disc_weight=0.02, disc_start=4750),
        train=_train(steps=5600, batch_size=16, lr=1e-3, warmup_steps=190, ema_halflife_steps=370,
                     min_lr_ratio=0.02),
        disc_warmup_steps=1120, stats_images=5000, eval_images=2000),
}
# The plain (deterministic) autoencoder beside the VAE: the same network and losses without sampling or KL, so the
# two latent spaces can be compared (decoded N(0, I) draws, interpolations, how well a denoiser learns each)
PRESETS["fashion-mnist-plain"] = dataclasses.replace(
    PRESETS["fashion-mnist"], model=dataclasses.replace(PRESETS["fashion-mnist"].model, variational=False),
    loss=dataclasses.replace(PRESETS["fashion-mnist"].loss, kl_weight=0.0))
# Image folders at 32 pixels: the shapes preset (16x16x8 latents, proven on RGB scenes with small objects)
PRESETS["folder"] = PRESETS["shapes"]
# At 64: 2x2 pixel patches as channels, so the levels run at 32x32 and 16x16 as at 32 pixels (latents 16x16x8); the
# loss and the discriminator still see 64x64 images (a step costs ~2.2x the 32-pixel one), so 3,600 steps with the
# schedule scaled to them keep the whole pipeline within an hour on 2 cores
PRESETS["folder-64"] = AutoencoderStage(
    model=dataclasses.replace(PRESETS["shapes"].model, patch_size=2),
    loss=dataclasses.replace(PRESETS["shapes"].loss, disc_start=3050),
    train=_train(steps=3600, batch_size=16, lr=1e-3, warmup_steps=120, ema_halflife_steps=240, min_lr_ratio=0.02),
    disc_warmup_steps=720, stats_images=5000, eval_images=2000)


def fit_channels(cfg: AutoencoderStage, channels: int) -> AutoencoderStage:
    """Image channels of the model and discriminator set from the data (or checked, channels_from_data=False)."""
    m, d = cfg.model, cfg.loss.discriminator
    if not cfg.channels_from_data:
        for name, have in (("model.in_channels", m.in_channels), ("model.out_channels", m.out_channels),
                           ("loss.discriminator.in_channels", d.in_channels)):
            if have != channels:
                raise ValueError(f"{name}={have} but the dataset has {channels} channels; set it to {channels} or "
                                 "--set channels_from_data=true")
        return cfg
    return dataclasses.replace(
        cfg, model=dataclasses.replace(m, in_channels=channels, out_channels=channels,
                                       **({"latent_channels": channels} if m.pixel_space else {})),
        loss=dataclasses.replace(cfg.loss, discriminator=dataclasses.replace(d, in_channels=channels)))


def perceptual_module(cfg: AutoencoderStage, out: Path, ds, run):
    """The frozen LPIPS of the loss. A featnet trained here (or given by loss.featnet_path) is saved as
    DIR/lpips_featnet.safetensors; a trained one is reused when that file exists with the same training settings
    (resume, or a rerun of a run that failed early)."""
    lc, path = cfg.loss, out / FEATNET_FILE
    if lc.perceptual != "featnet":
        return build_perceptual(lc)
    if lc.featnet_path is not None:  # a given featnet: keep a copy so the stage directory is self-contained
        lpips = build_perceptual(lc)
        if run.is_main and Path(lc.featnet_path).resolve() != path.resolve():
            write_bytes(path, Path(lc.featnet_path).read_bytes())  # byte copy: same file hash
        return lpips
    if path.exists():
        net = load_featnet(path)
        info = getattr(net, "train_info", {})
        if info.get("steps") == lc.featnet_steps and info.get("seed") == lc.featnet_seed:
            run.print(f"perceptual loss: reusing the featnet in {path}")
            return LPIPS(net)
    run.print(f"perceptual loss: training a featnet on the training images ({lc.featnet_steps} steps)")
    lpips = build_perceptual(lc, ds.images, log=lambda s, loss, acc: run.print(
        f"featnet step {s} | loss {loss:.4f} | acc {acc:.3f}"))
    if run.is_main:
        save_featnet(lpips.backbone, path)
    return lpips


def build(cfg: AutoencoderStage, channels: int, device: torch.device):
    """Modules {"model", "ema", "disc" if the GAN is on, "logvar" if learned} and optimizers {"opt", "opt_disc"}."""
    model = make_autoencoder(cfg.model).to(device)
    modules: dict[str, nn.Module] = {"model": model, "ema": copy.deepcopy(model).eval().requires_grad_(False)}
    params = list(model.parameters())
    disc = build_discriminator(cfg.loss, channels)
    if disc is not None:
        modules["disc"] = disc.to(device)
    logvar = init_output_logvar(cfg.loss)
    if logvar is not None:
        modules["logvar"] = nn.ParameterDict({"s": logvar}).to(device)  # a module, so run.save/restore keep it
        params.append(modules["logvar"]["s"])
    optimizers = {"opt": common.make_adamw(params, cfg.train)}
    if disc is not None:
        optimizers["opt_disc"] = common.adamw(disc.parameters(), cfg.disc_lr, cfg.disc_betas, 0.0)
    return modules, optimizers


def main(argv: list[str] | None = None) -> int:
    return stage_main("ldmkit train autoencoder", __doc__, PRESETS, train, argv)


def train(cfg: AutoencoderStage, out, spec: str, ds, resume: bool = False, init_from: str | None = None,
          progress: bool = True) -> dict:
    cfg, out = fit_channels(cfg, ds.channels), Path(out)
    tc, lc = cfg.train, cfg.loss
    run = common.start_run(out, cfg, tc, "autoencoder", data=spec, dataset=ds, resume=resume, init_from=init_from,
                           progress=progress)
    if cfg.model.pixel_space:  # nothing to learn: record the pixels' scale, and the stage is done
        model = PixelSpace(cfg.model)
        return run.finish(model.state_dict(), {**final_metrics(model, cfg, ds, spec), "params": 0}, 0)
    lpips = perceptual_module(cfg, out, ds, run)
    modules, optimizers = build(cfg, ds.channels, run.device)
    model, ema, disc, opt = modules["model"], modules["ema"], modules.get("disc"), optimizers["opt"]
    logvar = modules["logvar"]["s"] if "logvar" in modules else None
    net = common.wrap_ddp(model, run.device)
    dnet = common.wrap_ddp(disc, run.device) if disc is not None else None
    start = run.restore(modules, optimizers)
    grid_x = ds.images[:cfg.grid_images]
    step = start
    for step in run.steps(start, tc.steps):
        idx, gidx = common.batch_indices(len(ds), tc.batch_size, step, tc.seed, run.rank, run.world)
        x = ds.to_float(ds.images[idx]).to(run.device)  # (B, C, H, W) in [-1, 1]
        f = model.cfg.downsample_factor
        eps = randn((x.shape[0], model.cfg.latent_channels, x.shape[2] // f, x.shape[3] // f),
                    example_generators(tc.seed, gidx, NOISE_STREAM)).to(run.device)  # sample g's draw: (seed, g)
        gan_on = disc is not None and disc_factor(lc, step) > 0  # the adversarial term reaches the autoencoder
        d_on = disc is not None and lc.uses_gan and step >= lc.disc_start - cfg.disc_warmup_steps
        common.set_lr(opt, common.lr_at(step, tc))
        if disc is not None:
            disc.requires_grad_(False)  # the generator step must not write gradients into the discriminator
        with common.autocast(run.device, tc.precision):
            recon, posterior = net(x, sample=True, noise=eps)  # z ~ q(z|x)
            loss, terms = generator_loss(lc, x, recon, posterior, step, lpips, disc if gan_on else None,
                                         model.last_layer(), logvar)
        loss.backward()
        gnorm = common.clip_grad(opt.param_groups[0]["params"], tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        common.ema_update(ema, model, tc.ema_halflife_steps)
        if d_on:
            terms.update(discriminator_step(cfg, run, disc, dnet, optimizers["opt_disc"], x, recon, step))
        run.log(step, **{k: v.item() for k, v in terms.items()}, grad_norm=gnorm, lr=opt.param_groups[0]["lr"])
        if run.is_main and run.should(tc.sample_every, step):
            run.image(recon_pairs(ema, ds, grid_x), "recon", step + 1, nrow=8)
        if run.should(tc.ckpt_every, step):
            run.save(step + 1, modules, optimizers, ema.state_dict())
        step += 1
    metrics = final_metrics(ema, cfg, ds, spec)
    if run.is_main:
        run.image(recon_pairs(ema, ds, grid_x), "recon", nrow=8)
        run.print(f"scale_factor {metrics['scale_factor']:.4f} | shift_factor {metrics['shift_factor']:.4f} | "
                  f"test PSNR {metrics.get('test_psnr', float('nan')):.2f} dB")
    metrics["params"] = sum(p.numel() for p in model.parameters())
    return run.finish(ema.state_dict(), metrics, step)


def discriminator_step(cfg: AutoencoderStage, run, disc, dnet, opt, x, recon, step: int) -> dict:
    """One update of the patch discriminator on real x against the (detached) reconstructions; its logged terms."""
    lc, tc = cfg.loss, cfg.train
    disc.requires_grad_(True)
    with common.autocast(run.device, tc.precision):  # recon is detached inside; warm-up counts as on
        d_loss, d_terms = discriminator_loss(lc, dnet, x, recon, max(step, lc.disc_start))
    d_loss.backward()
    common.clip_grad(disc.parameters(), tc.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {f"disc_{k}": v for k, v in d_terms.items()}


@torch.no_grad()
def recon_pairs(ae: AutoencoderKL, ds, images: torch.Tensor) -> torch.Tensor:
    """Originals beside their posterior-mode reconstructions (float [-1, 1], pairs in order)."""
    device = next(ae.parameters()).device
    x = ds.to_float(images).to(device)
    recon = ae.decode(ae.encode(x).mode()).clamp(-1, 1)
    return torch.stack([x, recon], 1).flatten(0, 1).cpu()


def final_metrics(ema: AutoencoderKL, cfg: AutoencoderStage, ds, spec: str) -> dict:
    """Latent scale (and shift) from the training set, and the test PSNR of the EMA weights on the native crop."""
    n = len(ds) if cfg.stats_images <= 0 else min(cfg.stats_images, len(ds))
    _, acc = reconstruct(ema, ds.images[:n], decode=False)
    stats = latent_statistics(acc)
    shift = stats["latent_mean"] if cfg.latent_shift else 0.0
    out = {"scale_factor": 1.0 / stats["latent_std"], "shift_factor": shift, "latent_mean": stats["latent_mean"],
           "latent_std": stats["latent_std"], "latent_stats_images": n,
           "train_kl_per_channel": stats["kl_per_channel"]}
    try:
        test = other_split(ds, "test")
    except (ValueError, FileNotFoundError):  # e.g. an image folder without a test split
        return out
    m = len(test) if cfg.eval_images <= 0 else min(cfg.eval_images, len(test))
    recon, _ = reconstruct(ema, test.images[:m])
    out["test_psnr"] = float(psnr(test.crop(test.images[:m]), test.crop(recon)).mean())
    out["test_psnr_images"] = m
    return out
