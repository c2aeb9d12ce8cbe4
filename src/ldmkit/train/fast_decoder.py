"""`ldmkit train fast-decoder --autoencoder DIR --out DIR`: a small decoder for a trained autoencoder's latents.

The encoder stays frozen: each step draws z ~ q(z|x) for a batch of training images from the autoencoder's latent
cache (the same cache the denoiser trains on) and fits the fast decoder's output to the image itself, with the
autoencoder stage's pixel loss and, when the stage has one, its LPIPS feature network. So the fast decoder reads the
latent space the denoiser samples in, and a pipeline can decode with either decoder
(`ldmkit sample --decoder fast`). metrics.json compares both decoders on held-out images: PSNR on the native crop
and decoding time per image.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldmkit.autoencoder.fast_decoder import FastDecoder, FastDecoderConfig, config_for
from ldmkit.autoencoder.featnet import load_featnet
from ldmkit.autoencoder.loss import nll_loss, pixel_loss
from ldmkit.autoencoder.lpips import LPIPS
from ldmkit.data import other_split
from ldmkit.eval.metrics import psnr
from ldmkit.stages import load_autoencoder, weights_hash
from ldmkit.train import common
from ldmkit.train.args import stage_main
from ldmkit.train.autoencoder import FEATNET_FILE
from ldmkit.train.common import TrainConfig
from ldmkit.train.latent_cache import draw_latents, posterior_cache


@dataclass(frozen=True)
class FastDecoderStage:
    model: FastDecoderConfig = field(default_factory=FastDecoderConfig)  # channels set from the autoencoder
    rec: str = "l1"                   # pixel loss: l1 | l2
    perceptual_weight: float = 0.1    # weight of the autoencoder stage's LPIPS featnet (0, or no featnet: off)
    autoencoder: str = ""             # the autoencoder stage directory (filled in)
    autoencoder_sha256: str = ""      # its weight hash: the fast decoder belongs to this latent space
    eval_images: int = 2000           # held-out images for the final PSNR comparison; 0 = all
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=3000, batch_size=32, lr=2e-3, warmup_steps=75, ema_halflife_steps=150, min_lr_ratio=0.02,
        grad_clip=0.0, log_every=100, ckpt_every=500))


PRESETS = {
    "tiny": FastDecoderStage(model=FastDecoderConfig(channels=(16, 8, 8), blocks=1), eval_images=64,
                             train=TrainConfig(steps=20, batch_size=16, lr=2e-3, warmup_steps=2, log_every=5,
                                               ckpt_every=10, ema_halflife_steps=5, grad_clip=0.0)),
    # 8x8x4 -> 32x32: widths 64 / 32 / 16, two blocks each (220k parameters); decoding 64 images at one thread
    # took 109 ms against 757 ms for the Fashion-MNIST autoencoder's decoder (6.9x)
    "fashion-mnist": FastDecoderStage(model=FastDecoderConfig(channels=(64, 32, 16), blocks=2)),
}


def bind(cfg: FastDecoderStage, ae_dir: str | Path) -> tuple[FastDecoderStage, torch.nn.Module]:
    """The config with the autoencoder's path, hash and latent / image channels filled in; the autoencoder."""
    ae, _, _ = load_autoencoder(ae_dir)
    model = config_for(ae.cfg, channels=cfg.model.channels, blocks=cfg.model.blocks)
    return dataclasses.replace(cfg, model=model, autoencoder=str(ae_dir),
                               autoencoder_sha256=weights_hash(ae_dir)), ae


def main(argv: list[str] | None = None) -> int:
    return stage_main("ldmkit train fast-decoder", __doc__, PRESETS, train, argv, on_autoencoder=True)


def train(cfg: FastDecoderStage, out, spec: str, ds, ae_dir: str, resume: bool = False,
          init_from: str | None = None, progress: bool = True) -> dict:
    cfg, ae = bind(cfg, ae_dir)
    tc, out = cfg.train, Path(out)
    run = common.start_run(out, cfg, tc, "fast-decoder", data=spec, dataset=ds, resume=resume, init_from=init_from,
                           progress=progress)
    cache = posterior_cache(ae_dir, ae, cfg.autoencoder_sha256, ds, spec, "train", fallback_dir=out,
                            progress=progress)
    featnet = Path(ae_dir) / FEATNET_FILE
    lpips = LPIPS(load_featnet(featnet)).to(run.device) if cfg.perceptual_weight > 0 and featnet.is_file() else None
    model = FastDecoder(cfg.model).to(run.device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    net = common.wrap_ddp(model, run.device)
    opt = common.make_adamw(model.parameters(), tc)
    start = run.restore({"model": model, "ema": ema}, {"opt": opt})
    step, loss = start, torch.zeros(())
    for step in run.steps(start, tc.steps):
        idx, gidx = common.batch_indices(len(ds), tc.batch_size, step, tc.seed, run.rank, run.world)
        z = draw_latents(cache, idx, gidx, tc.seed, 1.0, 0.0).to(run.device)  # unscaled z ~ q(z|x)
        x = ds.to_float(ds.images[idx]).to(run.device)
        common.set_lr(opt, common.lr_at(step, tc))
        with common.autocast(run.device, tc.precision):
            recon = net(z)
            rec = pixel_loss(x, recon, cfg.rec)
            p = lpips(x, recon) if lpips is not None else None
            loss = nll_loss(rec, p, x[0].numel(), cfg.perceptual_weight).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        common.ema_update(ema, model, tc.ema_halflife_steps)
        terms = {"rec": rec.mean().item() / x[0].numel(), **({"perceptual": p.mean().item()} if p is not None else {})}
        run.log(step, loss=loss.item(), **terms, lr=opt.param_groups[0]["lr"])
        if run.should(tc.ckpt_every, step):
            run.save(step + 1, {"model": model, "ema": ema}, {"opt": opt}, ema.state_dict())
        step += 1
    metrics = compare_decoders(ae, ema, cfg, spec, ds) if run.is_main else {}
    if run.is_main and metrics:
        run.print(f"test PSNR: fast decoder {metrics['test_psnr_fast']:.2f} dB, full decoder "
                  f"{metrics['test_psnr_full']:.2f} dB; decoding {metrics['decode_speedup']:.1f}x faster")
    if run.is_main:  # originals, the full decoder's and the fast decoder's reconstructions, a row each
        with torch.no_grad():
            x = ds.to_float(ds.images[:8]).to(run.device)
            z = ae.encode(x).mode()
            run.image(torch.cat([x, ae.decode(z), ema(z)]).clamp(-1, 1).cpu(), "decoders", nrow=8)
    metrics["params"] = sum(p.numel() for p in model.parameters())
    return run.finish(ema.state_dict(), metrics, step)


@torch.no_grad()
def compare_decoders(ae, fast: FastDecoder, cfg: FastDecoderStage, spec: str, ds) -> dict:
    """Test PSNR on the native crop of both decoders from the posterior mode, and their decoding times."""
    try:
        test = other_split(ds, "test")
    except (ValueError, FileNotFoundError):  # e.g. an image folder without a test split
        return {}
    m = len(test) if cfg.eval_images <= 0 else min(cfg.eval_images, len(test))
    device = next(fast.parameters()).device
    out, secs = {"test_psnr_images": m}, {}
    images = test.images[:m]
    means = torch.cat([ae.encode(test.to_float(images[i:i + 256]).to(device)).mode() for i in range(0, m, 256)])
    for name, dec in (("full", ae.decode), ("fast", fast)):
        t = time.perf_counter()
        img = torch.cat([test.to_uint8(dec(means[i:i + 256])).cpu() for i in range(0, m, 256)])
        secs[name] = time.perf_counter() - t
        out[f"test_psnr_{name}"] = float(psnr(test.crop(images), test.crop(img)).mean())
        out[f"decode_ms_per_image_{name}"] = 1000 * secs[name] / m
    out["decode_speedup"] = secs["full"] / secs["fast"]
    return out
