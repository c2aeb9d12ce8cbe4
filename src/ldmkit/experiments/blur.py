"""blur: pixel-wise L2 averages the plausible outputs, so it blurs; perceptual and adversarial terms sharpen.

Three autoencoders of the fashion-mnist stage preset (KL weight 1e-6), each trained for the same 1,200 steps at
batch 16 with an L2 pixel loss: L2 alone; L2 + LPIPS (weight 0.1, the bundled autoencoder's trained feature net,
so none is trained here); and L2 + LPIPS + the adaptively weighted patch GAN (weight 0.1; the discriminator
learns alone from step 600 and its term reaches the autoencoder for the last 300 steps; the preset's, for its
last 15%). Measured on the first 1,000 test images at their native 28x28: PSNR, SSIM, the perceptual distance
(LPIPS in the same bundled feature net), the Frechet distance of the reconstructions to the originals in the
evaluation classifier's features, and the high-frequency energy ratio: the FFT energy above half the Nyquist
frequency (radial frequency > 0.25 cycles per pixel) of a reconstruction over that of its original, averaged over
the images (1: all the fine detail kept; blur lowers it). Figure: zoomed crops (the 14x14 window with the most
edges) of the originals and each reconstruction, nearest-neighbour upscaled.

The claim holds here when the full loss keeps at least 0.05 more of the high-frequency energy than L2 alone and
its reconstructions' FD is lower; the verdict is computed from the numbers.

Budget: about 15 minutes on 2 cores: ~4 min for L2 alone, ~4.5 min with LPIPS, ~5 min with the discriminator
and the GAN phase, ~1.5 min for the final scale estimates and the measurements.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from ldmkit.experiments.ae_vs_vae import FEATNET, fashion, load_arrays, rounded, save_arrays, train_autoencoder
from ldmkit.experiments.common import Context, Judge, pyplot, result, save_figure

NAME = "blur"
TITLE = "why L2 reconstructions blur, and what sharpens them"
CLAIM = ("pixel-wise L2 averages the plausible outputs, so its reconstructions are blurry; a perceptual (LPIPS) "
         "and an adversarial term restore the fine detail")

STEPS, DISC_START, DISC_WARMUP = 1200, 900, 300
TEST_IMAGES, ZOOM_IMAGES, ZOOM = 1000, 4, 14
MARGIN = 0.05  # how much more high-frequency energy the full loss must keep than L2 alone


# ---- the high-frequency energy ------------------------------------------------------------------------------------

def _as_float(images) -> torch.Tensor:
    x = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    x = x.double() / 255.0 if x.dtype == torch.uint8 else x.double()
    return x[:, None] if x.ndim == 3 else x  # (N, C, H, W)


def power_spectrum(images) -> tuple[torch.Tensor, torch.Tensor]:
    """(|FFT|^2 / (H W) per image (N, C, H, W), radial frequency (H, W) in cycles per pixel). Images (N, H, W) or
    (N, C, H, W), uint8 (read as /255) or float. By Parseval the power sums to the sum of squared pixels."""
    x = _as_float(images)
    h, w = x.shape[-2:]
    power = torch.fft.fft2(x).abs().square() / (h * w)
    fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(w, dtype=torch.float64)[None, :]
    return power, (fy.square() + fx.square()).sqrt()


def high_frequency_energy(images, cutoff: float = 0.5) -> torch.Tensor:
    """Per-image energy (N,) at radial frequencies above `cutoff` times Nyquist (0.5 cycles per pixel)."""
    power, radius = power_spectrum(images)
    return (power * (radius > cutoff * 0.5)).sum((1, 2, 3))


def high_frequency_fraction(images, cutoff: float = 0.5) -> torch.Tensor:
    """Per-image share (N,) of the energy around the mean (all but the zero frequency) above cutoff x Nyquist;
    0 for a constant image."""
    power, radius = power_spectrum(images)
    ac = (power * (radius > 0)).sum((1, 2, 3))
    hf = (power * (radius > cutoff * 0.5)).sum((1, 2, 3))
    return torch.where(ac > 1e-12, hf / ac.clamp_min(1e-12), torch.zeros_like(hf))


def high_frequency_ratio(recon, orig, cutoff: float = 0.5) -> float:
    """Mean over images of the reconstruction's high-frequency energy over its original's (originals without any
    such energy are left out): 1 keeps all the fine detail, a blurred reconstruction has less."""
    a, b = high_frequency_energy(recon, cutoff), high_frequency_energy(orig, cutoff)
    keep = b > 1e-12
    return float((a[keep] / b[keep]).mean()) if keep.any() else float("nan")


def busiest_window(image: np.ndarray, size: int = ZOOM) -> tuple[int, int]:
    """(top, left) of the size x size window of a (H, W) image with the largest sum of squared neighbour
    differences: where a blur shows most."""
    x = image.astype(np.float64)
    g = np.zeros_like(x)
    g[:, 1:] += np.diff(x, axis=1) ** 2
    g[1:, :] += np.diff(x, axis=0) ** 2
    c = np.pad(g.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = c[size:, size:] - c[:-size, size:] - c[size:, :-size] + c[:-size, :-size]
    top, left = np.unravel_index(int(sums.argmax()), sums.shape)
    return int(top), int(left)


# ---- the experiment -----------------------------------------------------------------------------------------------

def variants(ctx: Context) -> list[tuple[str, str, list[str]]]:
    """(stage name, label, overrides of the fashion-mnist autoencoder preset): one loss each, equal steps."""
    l2 = ["loss.rec=l2"]
    return [("l2", "L2", [*l2, "loss.perceptual=none", "loss.disc_weight=0"]),
            ("l2-lpips", "L2 + LPIPS", [*l2, "loss.disc_weight=0"]),
            ("l2-lpips-gan", "L2 + LPIPS + GAN", [*l2, "loss.disc_weight=0.1",
                                                  f"loss.disc_start={ctx.n(DISC_START, 1)}",
                                                  f"disc_warmup_steps={ctx.n(DISC_WARMUP, 1)}"])]


@torch.no_grad()
def measure(ctx: Context, ae_dir: Path, test, judge, lpips, zoom: list[int], key: str) -> dict:
    """PSNR, SSIM, LPIPS, FD to the originals and the high-frequency energy of one autoencoder's reconstructions."""
    from ldmkit.eval.autoencoder_eval import image_metrics, reconstruct
    from ldmkit.eval.metrics import frechet_distance
    from ldmkit.stages import load_autoencoder
    ae, _, _ = load_autoencoder(ae_dir)
    images = test.images[:ctx.n(TEST_IMAGES, 20)]
    recon, _ = reconstruct(ae, images)
    orig, recon = test.crop(images), test.crop(recon)  # uint8 (N, 1, 28, 28)
    out = image_metrics(orig, recon, lpips())
    _, f_orig = judge().features(orig)
    _, f_recon = judge().features(recon)
    out.update(fd=frechet_distance(f_recon, f_orig), hf_ratio=high_frequency_ratio(recon, orig),
               hf_fraction=float(high_frequency_fraction(recon).mean()))
    save_arrays(ctx, key, recon=recon[zoom].numpy())
    return rounded(out)


def run(ctx: Context) -> dict:
    from ldmkit.autoencoder.featnet import load_featnet
    from ldmkit.autoencoder.lpips import LPIPS
    judge = functools.cache(lambda: Judge(ctx))  # built only when something is left to measure
    lpips = functools.cache(lambda: LPIPS(load_featnet(ctx.pipeline / FEATNET)))
    train, test = fashion(ctx, "train", ctx.n(0, 256)), fashion(ctx, "test")
    n = ctx.n(TEST_IMAGES, 20)
    orig = test.crop(test.images[:n])
    zoom = sorted(np.argsort(-high_frequency_fraction(orig).numpy(), kind="stable")[:ctx.n(ZOOM_IMAGES, 2)].tolist())
    rows, crops = [], {}
    for key, name, overrides in variants(ctx):
        ae_dir = train_autoencoder(ctx, f"autoencoder-{key}", "fashion-mnist", ctx.n(STEPS, 3), overrides, train)
        memo = f"recon-{key}"
        row = ctx.memo(memo, functools.partial(measure, ctx, ae_dir, test, judge, lpips, zoom, memo))
        ctx.log(f"{name}: PSNR {row['psnr']:.2f} dB, FD {row['fd']:.3f}, high-frequency ratio {row['hf_ratio']:.3f}")
        rows.append({"variant": key, "label": name, **row})
        crops[key] = load_arrays(ctx, memo)["recon"]
    by = {r["variant"]: r for r in rows}
    l2, full = by["l2"], by["l2-lpips-gan"]
    sharper, closer = full["hf_ratio"] >= l2["hf_ratio"] + MARGIN, full["fd"] < l2["fd"]
    numbers = {"variants": rows, "steps": ctx.n(STEPS, 3), "disc_start": ctx.n(DISC_START, 1),
               "disc_warmup_steps": ctx.n(DISC_WARMUP, 1), "test_images": n,
               "hf_fraction_originals": round(float(high_frequency_fraction(orig).mean()), 4),
               "margin": MARGIN, "sharper": sharper, "closer": closer, "zoom_images": zoom}
    facts = (f"the full loss keeps {full['hf_ratio']:.2f} of the originals' high-frequency energy against "
             f"{l2['hf_ratio']:.2f} for L2 alone (L2 + LPIPS {by['l2-lpips']['hf_ratio']:.2f}), and its "
             f"reconstructions' FD is {full['fd']:.3f} against {l2['fd']:.3f} (PSNR {full['psnr']:.2f} against "
             f"{l2['psnr']:.2f} dB)")
    if sharper and closer:
        verdict = f"holds: {facts}"
    else:
        failed = [w for w, ok in ((f"the full loss's high-frequency ratio is not {MARGIN} above L2's", sharper),
                                  ("its FD is not lower than L2's", closer)) if not ok]
        verdict = f"does not hold here ({'; '.join(failed)}): {facts}"
    figure = _zoom(ctx, orig[zoom].numpy(), crops, rows)
    return result(ctx, numbers, verdict, [figure])


def _zoom(ctx: Context, originals: np.ndarray, crops: dict, rows: list[dict]) -> Path:
    """One row per image: the original's busiest 14x14 window, then the same window of each reconstruction."""
    plt = pyplot()
    cols = [("original", originals)] + [(f"{r['label']}\nHF ratio {r['hf_ratio']:.2f}", crops[r["variant"]])
                                        for r in rows]
    fig, axes = plt.subplots(len(originals), len(cols), figsize=(2.2 * len(cols), 2.3 * len(originals)),
                             squeeze=False)
    for i in range(len(originals)):
        top, left = busiest_window(originals[i, 0])
        for j, (name, images) in enumerate(cols):
            ax = axes[i, j]
            ax.imshow(images[i, 0, top:top + ZOOM, left:left + ZOOM], cmap="gray", vmin=0, vmax=255,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
    fig.suptitle(f"{ZOOM}x{ZOOM} crops of test images and their reconstructions (nearest-neighbour upscaled)",
                 fontsize=10)
    return save_figure(ctx, fig, "zoom")


def section(res: dict, rel) -> str:
    n = res["numbers"]
    table = ("| loss | PSNR (dB) | SSIM | LPIPS | FD to the originals | high-frequency energy ratio |\n"
             "| --- | --- | --- | --- | --- | --- |\n" + "\n".join(
                 f"| {r['label']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['lpips']:.4f} | {r['fd']:.3f} | "
                 f"{r['hf_ratio']:.3f} |" for r in n["variants"]))
    return (f"Three autoencoders of the fashion-mnist preset, {n['steps']} steps each at batch 16 with an L2 pixel "
            f"loss; the GAN's discriminator learns alone from step {n['disc_start'] - n['disc_warmup_steps']} and "
            f"its term reaches the autoencoder from step {n['disc_start']}. Measured on {n['test_images']} test "
            f"images at 28x28. LPIPS uses the bundled autoencoder's feature net, the one two of the losses "
            f"optimise; FD compares the reconstructions with the originals in the evaluation classifier's features; "
            f"the high-frequency energy ratio is a reconstruction's FFT energy above half the Nyquist frequency over "
            f"its original's ({n['hf_fraction_originals']:.1%} of the originals' energy lies there, their mean "
            f"brightness left out). The claim needs the full loss's ratio at least {n['margin']} above L2's and a "
            f"lower FD.\n\n"
            f"{table}\n\n![zoomed crops]({rel}/{res['figures'][0]})")
