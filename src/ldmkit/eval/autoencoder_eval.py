"""`ldmkit autoencoder eval DIR`: how well a trained autoencoder reconstructs the test split.

DIR is an autoencoder stage directory, or a pipeline directory holding `autoencoder/`. Every test image is encoded
and decoded through the posterior mode (the mean, no sampling noise). All image metrics compare uint8 images on the
dataset's native crop (28x28 for Fashion-MNIST, whose 32x32 model inputs are padded):

- psnr: mean over images of the per-image PSNR (peak 255), `ldmkit.eval.metrics.psnr`;
- ssim: mean per-image SSIM (Wang et al. 2004), `ldmkit.eval.metrics.ssim`;
- lpips: mean LPIPS distance (Zhang et al. 2018, eq. 1) in the stage's own perceptual backbone, named in
  `lpips_backbone` (the featnet trained for the stage, `lpips_featnet.safetensors`; values are comparable only
  between evaluations with the same backbone file, whose hash is recorded);
- latent_mean, latent_std: moments of posterior samples z ~ q(z|x) over the test set, computed exactly from the
  posterior moments (E z = E mu, E z^2 = E [mu^2 + sigma^2]);
- psnr_sample: the same PSNR for decodes of one posterior sample z ~ q(z|x) per image (seed 0). The decoder is
  trained on samples; a mode far worse than a sample means the decoder depends on the sampling noise, which a
  denoiser's outputs do not carry (a shapes autoencoder with too small a KL weight decoded its mean at 8.5 dB
  against 23.4 dB for a sample);
- kl_per_channel: KL(q(z_c|x) || N(0, I)) summed over the channel's positions, averaged over test images (nats);
- active_per_channel: fraction of each channel's positions whose posterior mean varies over the test set with
  variance > 0.01, the "active units" statistic of Burda et al. 2016 (IWAE, sec. 5.2); a collapsed channel has 0.

With an evaluation classifier (`--eval-classifier DIR`, or `eval-classifier/` in a pipeline directory), its test
accuracy on the originals and on the reconstructions is reported with its weight hash. Results are printed and
written to DIR/eval.json (a pipeline: DIR/autoencoder/eval.json) beside a grid of originals and reconstructions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from ldmkit.autoencoder.featnet import load_featnet
from ldmkit.autoencoder.lpips import LPIPS, lpips_vgg16
from ldmkit.checkpoint import file_hash, read_json, write_json
from ldmkit.data import load_split, to_float, to_uint8
from ldmkit.eval.classifier import accuracy
from ldmkit.eval.metrics import psnr, ssim
from ldmkit.eval.score import load_eval_classifier
from ldmkit.images import grid, save_png
from ldmkit.stages import load_autoencoder, weights_hash

ACTIVE_VARIANCE = 0.01  # Burda et al. 2016: a latent unit is active if Var_x(E[z | x]) exceeds this


# ---- locating the stage and its pieces -----------------------------------------------------------------------------

def find_autoencoder_dir(path: str | Path) -> Path:
    """The autoencoder stage directory `path` itself, or `path/autoencoder` for a pipeline directory."""
    path = Path(path)
    for cand in (path, path / "autoencoder"):
        cfg = cand / "config.json"
        if cfg.exists() and read_json(cfg).get("stage") == "autoencoder":
            return cand
    raise FileNotFoundError(f"{path} is neither an autoencoder stage directory (config.json with stage "
                            "'autoencoder') nor a pipeline directory with autoencoder/; train one with "
                            f"`ldmkit train autoencoder --out {path}`")


def stage_lpips(stage_dir: Path, cfg: dict):
    """(LPIPS module or None, description) of the perceptual backbone the stage was trained with."""
    loss = cfg.get("loss", {})
    for path in (stage_dir / "lpips_featnet.safetensors", loss.get("featnet_path")):
        if path and Path(path).exists():
            return LPIPS(load_featnet(path)), {"kind": "featnet", "path": str(path), "sha256": file_hash(path)}
    if loss.get("perceptual") == "vgg16" and loss.get("vgg16_path") and Path(loss["vgg16_path"]).exists():
        return (lpips_vgg16(loss["vgg16_path"], loss.get("lpips_heads_path")),
                {"kind": "vgg16", "path": loss["vgg16_path"], "sha256": file_hash(loss["vgg16_path"])})
    return None, {"kind": "none", "reason": f"no lpips_featnet.safetensors in {stage_dir} and no usable "
                                            "loss.featnet_path / loss.vgg16_path in its config"}


# ---- reconstruction and statistics ---------------------------------------------------------------------------------

@torch.no_grad()
def reconstruct(ae, images: torch.Tensor, batch_size: int = 256, decode: bool = True,
                samples: list | None = None) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """Posterior-mode reconstructions of uint8 images (N, C, H, W) as uint8 (None if not `decode`), and latent
    sums for statistics: per channel sums of mu, mu^2 + sigma^2, KL and per position of mu, mu^2. A list passed as
    `samples` receives the uint8 decodes of one posterior sample per image (generator seeded 0)."""
    ae.eval()
    device = next(ae.parameters()).device
    out, acc = [], {}
    gen = torch.Generator().manual_seed(0)
    for i in range(0, len(images), batch_size):
        post = ae.encode(to_float(images[i:i + batch_size]).to(device))
        if decode:
            out.append(to_uint8(ae.decode(post.mode())).cpu())
        if samples is not None:
            eps = torch.randn(post.mean.shape, generator=gen).to(device)
            samples.append(to_uint8(ae.decode(post.mean + post.std * eps)).cpu())
        mu, var = post.mean.double().cpu(), post.var.double().cpu()  # (B, c, h, w)
        parts = {"mu": mu.sum((0, 2, 3)), "second": (mu.square() + var).sum((0, 2, 3)),
                 "kl": post.kl_per_channel().double().cpu().sum(0), "pos_mu": mu.sum(0),
                 "pos_mu2": mu.square().sum(0)}
        for k, v in parts.items():
            acc[k] = acc.get(k, 0) + v
    acc["n"] = torch.tensor(float(len(images)), dtype=torch.float64)
    acc["hw"] = torch.tensor(float(mu.shape[2] * mu.shape[3]), dtype=torch.float64)
    return (torch.cat(out) if decode else None), acc


def latent_statistics(acc: dict[str, torch.Tensor]) -> dict:
    """Mean and std of posterior samples (all elements), mean KL and active fraction per channel."""
    n, hw = acc["n"], acc["hw"]
    elements = n * hw * acc["mu"].numel()  # images x positions x channels
    mean = acc["mu"].sum() / elements
    second = acc["second"].sum() / elements
    pos_var = acc["pos_mu2"] / n - (acc["pos_mu"] / n).square()  # (c, h, w) Var_x(E[z|x]) per unit
    return {"latent_mean": float(mean), "latent_std": float((second - mean.square()).clamp_min(0).sqrt()),
            "latent_mean_per_channel": (acc["mu"] / (n * hw)).tolist(),
            "kl_per_channel": (acc["kl"] / n).tolist(),
            "active_per_channel": (pos_var > ACTIVE_VARIANCE).double().mean((1, 2)).tolist()}


@torch.no_grad()
def lpips_distance(lpips, a: torch.Tensor, b: torch.Tensor, batch_size: int = 500) -> float:
    """Mean LPIPS between two uint8 batches (N, C, H, W)."""
    total = 0.0
    for i in range(0, len(a), batch_size):
        total += lpips(to_float(a[i:i + batch_size]), to_float(b[i:i + batch_size])).double().sum().item()
    return total / len(a)


def image_metrics(orig: torch.Tensor, recon: torch.Tensor, lpips=None) -> dict:
    """psnr, ssim (and lpips) of uint8 (N, C, H, W) batches, already cropped to the native size."""
    out = {"psnr": float(psnr(orig, recon).mean()), "ssim": float(ssim(orig, recon, layout="NCHW").mean())}
    out["lpips"] = lpips_distance(lpips, orig, recon) if lpips is not None else None
    return out


def classifier_accuracy(clf_dir, orig: torch.Tensor, recon: torch.Tensor, labels: torch.Tensor) -> dict:
    """The evaluation classifier's accuracy on the original and reconstructed crops, and its weight hash."""
    model, sha = load_eval_classifier(clf_dir)
    acc_o, acc_r = accuracy(model, orig, labels), accuracy(model, recon, labels)
    return {"eval_classifier_acc_orig": acc_o, "eval_classifier_acc_recon": acc_r,
            "eval_classifier_acc_diff": acc_o - acc_r, "eval_classifier_sha256": sha}


def save_pairs(orig: torch.Tensor, recon: torch.Tensor, path: Path, n: int = 32, pairs_per_row: int = 8) -> None:
    """A grid of the first n images, each original followed by its reconstruction (uint8 NCHW)."""
    n = min(n, len(orig))
    both = torch.stack([orig[:n], recon[:n]], 1).flatten(0, 1)  # (2n, C, H, W): o0, r0, o1, r1, ...
    save_png(grid(both.permute(0, 2, 3, 1).numpy(), nrow=2 * pairs_per_row, scale=2), path)


# ---- the evaluation ---------------------------------------------------------------------------------------------

def evaluate(stage_dir: str | Path, data_dir: str | None = None, batch_size: int = 256,
             eval_classifier: str | Path | None = None, npz: str | Path | None = None,
             png: str | Path | None = None) -> dict:
    """Every metric of the module docstring for the stage in `stage_dir` (not written to disk here)."""
    stage_dir = Path(stage_dir)
    cfg = read_json(stage_dir / "config.json")
    spec = cfg.get("data")
    if not spec:
        raise ValueError(f"{stage_dir / 'config.json'} records no dataset ('data'); cannot pick a test split")
    ae, scale, shift = load_autoencoder(stage_dir)
    ds = load_split(spec, "test", cfg.get("data_options"), data_dir)
    sampled: list = []
    recon, acc = reconstruct(ae, ds.images, batch_size, samples=sampled)
    orig_c, recon_c = ds.crop(ds.images), ds.crop(recon)  # native size, (N, C, h, w) uint8
    lpips, backbone = stage_lpips(stage_dir, cfg)
    out = {"stage_dir": str(stage_dir), "data": spec, "split": "test", "n": len(ds),
           "crop": list(ds.native_size), "autoencoder_sha256": weights_hash(stage_dir),
           **image_metrics(orig_c, recon_c, lpips),
           "psnr_sample": float(psnr(orig_c, ds.crop(torch.cat(sampled))).mean()),
           "lpips_backbone": backbone, **latent_statistics(acc),
           "scale_factor": scale, "shift_factor": shift}
    if eval_classifier is not None:
        if "class" not in ds.labels:
            raise ValueError(f"--eval-classifier given but dataset {spec} has no class labels")
        out.update(classifier_accuracy(eval_classifier, orig_c, recon_c, ds.labels["class"]))
    if npz is not None:
        labels = ds.labels["class"] if "class" in ds.labels else torch.full((len(ds),), -1)
        np.savez(npz, images=recon_c.permute(0, 2, 3, 1).numpy(), labels=labels.numpy().astype(np.int64))
    if png is not None:
        save_pairs(orig_c, recon_c, Path(png))
    return out


def find_eval_classifier(path: str | Path) -> Path | None:
    d = Path(path) / "eval-classifier"
    return d if (d / "model.safetensors").exists() else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="ldmkit autoencoder eval", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("dir", help="autoencoder stage directory, or a pipeline directory with autoencoder/")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST idx files")
    p.add_argument("--batch-size", type=int, default=256, help="images per encode/decode batch")
    p.add_argument("--eval-classifier", default=None, metavar="DIR",
                   help="evaluation classifier stage (default: DIR/eval-classifier if present)")
    p.add_argument("--npz", default=None, metavar="FILE", help="save all reconstructions (uint8 N x H x W x C)")
    p.add_argument("--out-json", default=None, help="where to write the JSON (default: STAGE/eval.json)")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    stage = find_autoencoder_dir(args.dir)
    clf = args.eval_classifier or find_eval_classifier(args.dir)
    res = evaluate(stage, args.data_dir, args.batch_size, clf, args.npz, stage / "eval_recon.png")
    out_json = Path(args.out_json) if args.out_json else stage / "eval.json"
    write_json(out_json, res)
    print(json.dumps(res, indent=2))
    print(f"wrote {out_json} and {stage / 'eval_recon.png'}", file=sys.stderr)
    return 0
