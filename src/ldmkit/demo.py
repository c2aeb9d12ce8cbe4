"""`ldmkit demo`: the lecture, walked through on the bundled pipelines, as one self-contained HTML report.

    ldmkit demo                      # report from pretrained/fashion-mnist and pretrained/shapes (~1-2 min, 2 cores)
    ldmkit demo --train              # retrain both pipelines from scratch first (~2 hours on 2 cores), then report

Writes OUT/report.html (opens offline: every image and chart is inline) and OUT/report.json (every number in it).
Sections follow the lecture: the latent space (reconstructions, PSNR, latent statistics, decoded N(0, I) latents,
latent against pixel interpolation), the conditions (CLIP zero-shot accuracy and retrieval), guidance (a grid of
every class prompt against the CFG scale, classifier guidance, a negative prompt), edits (img2img and inpainting),
text to image on the shapes pipeline (colour, shape, size and position from the prompt), a metrics table (the
stages' stored metrics beside class accuracy, FD, precision and recall recomputed on fresh samples), and each
stage's training curves.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ldmkit import report as R
from ldmkit.autoencoder import interpolate, sample_prior
from ldmkit.checkpoint import read_json, write_bytes, write_json
from ldmkit.data import FASHION_CLASSES, fashion_prompt
from ldmkit.data.fashion import fashion_uint8
from ldmkit.eval.classifier import score_images
from ldmkit.eval.clip_cli import fashion_zero_shot, image_features, load, test_split, text_features
from ldmkit.eval.metrics import psnr
from ldmkit.eval.score import load_eval_classifier
from ldmkit.export import export
from ldmkit.pipeline import Pipeline
from ldmkit.stages import find_pipeline
from ldmkit.train.pipeline import PRESETS, train_pipeline

SHAPES_PROMPTS = ["a red circle in the top left", "a blue square in the bottom right",
                  "a large yellow star in the center", "a small green triangle at the top",
                  "a purple diamond on the left", "an orange cross on the right",
                  "a large white circle on a navy background", "a small blue star in the bottom left"]
SCALES = (0.0, 1.0, 2.0, 3.0, 5.0)  # CFG scales of the guidance grid (1 = conditional, 0 = unconditional)
CURVE_KEYS = {"autoencoder": ("rec", "perceptual"), "fast-decoder": ("rec", "loss")}  # others: "loss"


class Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn, *args):
        t = time.perf_counter()
        print(f"[demo] {name} ...", file=sys.stderr, flush=True)
        out = fn(*args)
        self.seconds[name] = round(time.perf_counter() - t, 1)
        return out


# ----------------------------------------------------------------------------- the sections
def latent_space(pipe: Pipeline, test: np.ndarray, labels: np.ndarray, n: int) -> tuple[str, dict]:
    """Originals beside reconstructions, PSNR, latent statistics, decoded prior samples, interpolations."""
    z = pipe.encode_images(test[:n])  # (n, C, h, w) scaled latents (posterior mode)
    rec = pipe.decode(z)
    db = psnr(test[:n], rec)
    per_channel = [(float(z[:, c].mean()), float(z[:, c].std())) for c in range(z.shape[1])]
    stats = {"images": n, "psnr_db": float(db.mean()), "latent_shape": list(z.shape[1:]),
             "latent_mean": float(z.mean()), "latent_std": float(z.std()),
             "per_channel_mean_std": per_channel, "compression": test[0].size / z[0].numel()}
    pairs = [np.concatenate([test[i], rec[i]], axis=1) for i in range(12)]
    prior = pipe.decode(sample_prior(12, pipe.latent_shape))
    a, b = int(np.flatnonzero(labels == 7)[0]), int(np.flatnonzero(labels == 8)[0])  # a sneaker and a bag
    ts = np.linspace(0, 1, 9)
    za, zb = pipe.encode_images(test[[a, b]])
    lat = pipe.decode(interpolate(za, zb, len(ts)).float())
    pix = [((1 - t) * test[a].astype(np.float64) + t * test[b]).round().astype(np.uint8) for t in ts]
    rows = [[f"{i}", f"{db[i]:.1f} dB"] for i in range(12)]
    html = (f"<p>The autoencoder compresses a 28x28 image (32x32 with padding) to a {'x'.join(map(str, z.shape[1:]))}"
            f" latent: {stats['compression']:.1f}x fewer numbers. The KL term pulls the posterior toward N(0, I), "
            "weakly (weight 1e-6): scaled by the stored factor the latents have unit standard deviation, but "
            "their channel means and spreads (table) show how far from N(0, I) they stay. L1 alone would blur "
            "edges, so the autoencoder also trains with a perceptual (LPIPS-style) loss and a patch "
            "discriminator.</p>"
            f"<p><b>Reconstructions</b> (original | reconstruction), test PSNR {stats['psnr_db']:.2f} dB over "
            f"{n} test images:</p>" + R.strip(pairs, 3, [r[1] for r in rows]) +
            R.table(["latent statistic", "value"], [["mean", f"{stats['latent_mean']:.3f}"],
                                                   ["std", f"{stats['latent_std']:.3f}"]] +
                    [[f"channel {c} mean / std", f"{m:.3f} / {s:.3f}"] for c, (m, s) in enumerate(per_channel)],
                    "num metrics") +
            "<p><b>Decoded N(0, I) latents</b>: the prior a VAE is pulled toward. Pure noise in latent space "
            "decodes to blotchy textures, not garments: the denoiser is what turns noise into samples.</p>" +
            R.strip(list(prior), 3) +
            "<p><b>Interpolation</b> from a sneaker to a bag: in latent space (top) the decoder morphs one shape "
            "into the other; in pixel space (bottom) the two images are cross-faded.</p>" +
            R.strip(list(lat), 3) + R.strip(pix, 3))
    return html, stats


def clip_section(pipe_dir: Path, n: int) -> tuple[str, dict]:
    """Zero-shot accuracy on test images and retrieval examples in both directions."""
    model, _, _ = load(pipe_dir)
    ds = test_split("fashion-mnist")
    images, labels = ds.images[:n], ds.labels["class"][:n]
    feats = image_features(model, images)
    zs = fashion_zero_shot(model, feats, labels)
    prompts = [fashion_prompt(c) for c in range(10)]
    txt = text_features(model, prompts)  # (10, E)
    native = ds.crop(images).permute(0, 2, 3, 1).numpy()
    rows = []
    for c in (0, 3, 5, 8, 9):
        top = (feats @ txt[c]).topk(6).indices
        rows.append([R.esc(prompts[c]), R.strip([native[i] for i in top], 2)])
    i2t = []
    probs = (100 * feats[:6] @ txt.T).softmax(-1)
    for i in range(6):
        p, k = probs[i].max(0)
        truth = FASHION_CLASSES[int(labels[i])]
        i2t.append([R.img(native[i], 2), R.esc(prompts[int(k)]), f"{float(p):.2f}", R.esc(truth)])
    stats = {"images": n, **zs}
    html = ("<p>Text goes through a tokenizer and a small transformer; images through a ViT; contrastive training "
            "(symmetric InfoNCE) puts both in one space. Classifying an image by its nearest class prompt needs "
            f"no labels: zero-shot accuracy on {n} test images is <b>{zs['zero_shot_top1']:.1%}</b> with the "
            f"training prompt templates and {zs['zero_shot_top1_heldout']:.1%} with held-out wordings. The "
            "denoiser is conditioned on this text tower.</p><p><b>Text to image</b>: the 6 test images closest "
            "to a prompt.</p>" + R.table(["prompt", "nearest test images"], rows) +
            "<p><b>Image to text</b>: the closest class prompt and its softmax probability.</p>" +
            R.table(["image", "closest prompt", "p", "true class"], i2t, "metrics"))
    return html, stats


def guidance_section(pipe: Pipeline) -> tuple[str, dict]:
    """Every class prompt against the CFG scale; classifier guidance; a negative prompt."""
    prompts = [fashion_prompt(c) for c in range(10)]
    cols = {w: pipe(prompts, num=2, guidance=w, progress=False) for w in SCALES}
    cls = pipe(prompts, num=2, guidance=0.0, classifier_scale=4.0, progress=False)
    rows = [[R.esc(p)] + [R.strip(list(cols[w][2 * i:2 * i + 2]), 2) for w in SCALES] +
            [R.strip(list(cls[2 * i:2 * i + 2]), 2)] for i, p in enumerate(prompts)]
    d = pipe.defaults
    neg_p = ["a photo of a shirt"] * 6
    plain = pipe(neg_p[:1], num=6, progress=False)
    neg = pipe(neg_p[:1], num=6, negative_prompt="a photo of a t-shirt", progress=False)
    html = (f"<p>Classifier-free guidance: the denoiser was trained with the prompt dropped 10% of the time, so it "
            "predicts both the conditional and the unconditional noise; sampling extrapolates from the second to "
            "the first by the scale w (here w = 1 is the conditional model and w = 0 the unconditional one; Ho & "
            f"Salimans write 1 + w). The pipeline's default is w = {d['guidance']} with guidance rescale "
            f"{d.get('guidance_rescale', 0)}, {d['sampler']} with {d['steps']} steps. Each cell: two samples, the "
            "same seeds across a row. The last column is <b>classifier guidance</b> instead: the unconditional "
            "model (w = 0) pushed along the gradient of a noise-aware latent classifier's log p(class | x_t), "
            "scale 4 (Bayes' rule: the conditional score is the unconditional one plus that gradient).</p>" +
            R.table(["prompt"] + [f"w = {w:g}" for w in SCALES] + ["classifier, s = 4"], rows) +
            "<p><b>Negative prompt</b>: 'a photo of a shirt' (top) and the same with the negative prompt "
            "'a photo of a t-shirt' replacing the unconditional prediction (bottom): guidance then also pushes "
            "away from t-shirts (fewer short sleeves).</p>" + R.strip(list(plain), 3) + R.strip(list(neg), 3))
    return html, {"scales": list(SCALES), "classifier_scale": 4.0}


def edits_section(pipe: Pipeline, test: np.ndarray, labels: np.ndarray) -> tuple[str, dict]:
    """SDEdit at several strengths and inpainting of the left half."""
    picks = [int(np.flatnonzero(labels == c)[1]) for c in (0, 1, 5, 7)]
    src = test[picks]
    target = ["a photo of a dress", "a photo of a bag", "a photo of an ankle boot", "a photo of a coat"]
    strengths = (0.3, 0.5, 0.7, 0.9)
    out = {s: pipe.img2img(src, target, strength=s, progress=False) for s in strengths}
    rows = [[R.img(src[i], 2), R.esc(target[i])] + [R.img(out[s][i], 2) for s in strengths] for i in range(4)]
    mask = np.zeros(src.shape[:3])
    mask[:, :, :14] = 1
    inp = pipe.inpaint(src, mask, target, progress=False)
    html = ("<p><b>Image to image</b> (SDEdit): the input's latent is noised to a fraction of the schedule and "
            "denoised with a new prompt; small strengths keep the input's layout, large ones follow the prompt.</p>" +
            R.table(["input", "prompt"] + [f"strength {s}" for s in strengths], rows) +
            "<p><b>Inpainting</b>: the left half (mask = 1) is generated from the prompt, the right half kept.</p>" +
            R.table(["input", "prompt", "inpainted"], [[R.img(src[i], 2), R.esc(target[i]), R.img(inp[i], 2)]
                                                       for i in range(4)]))
    return html, {"strengths": list(strengths)}


def shapes_section(pipe: Pipeline) -> tuple[str, dict]:
    imgs = pipe(SHAPES_PROMPTS, num=4, progress=False)
    rows = [[R.esc(p), R.strip(list(imgs[4 * i:4 * i + 4]), 3)] for i, p in enumerate(SHAPES_PROMPTS)]
    d = pipe.defaults
    html = ("<p>A second pipeline trained on generated scenes with captions that name shape, colour, size, "
            "position and background in varied wordings. Its CLIP and denoiser must bind each word to the right "
            f"attribute. Four samples per prompt at the default w = {d['guidance']}.</p>" +
            R.table(["prompt", "samples"], rows))
    return html, {"prompts": SHAPES_PROMPTS}


def metrics_section(pipes: dict[str, Path], fashion: Pipeline, fresh: int) -> tuple[str, dict]:
    """Stored metrics of every stage, and the generator scored again on fresh samples."""
    stored = []
    keys = {"autoencoder": ("test_psnr",), "clip": ("test_zero_shot_top1", "test_zero_shot_top1_heldout",
                                                    "shape", "color", "position"),
            "classifier": ("test_acc_sigma_0", "test_acc_sigma_1"), "eval-classifier": ("test_accuracy",),
            "fast-decoder": ("test_psnr_fast", "test_psnr_full", "decode_speedup"), "denoiser": ("final_loss",),
            "distilled": ("final_loss",), "onestep": ("final_loss",)}
    out: dict = {"stored": {}}
    for pname, root in pipes.items():
        spec = read_json(root / "pipeline.json")
        for stage, entry in spec["stages"].items():
            m = read_json(root / entry["path"] / "metrics.json")
            vals = {k: m[k] for k in keys.get(stage, ()) if k in m}
            out["stored"][f"{pname}/{stage}"] = {**vals, "steps": m.get("steps_done"),
                                                 "train_seconds": m.get("train_seconds"), "params": m.get("params")}
            stored.append([R.esc(pname), R.esc(stage), R.fmt(m.get("params")), R.fmt(m.get("steps_done")),
                           R.fmt(m.get("train_seconds")), ", ".join(f"{k} {R.fmt(v, 4)}" for k, v in vals.items())])
    model, digest = load_eval_classifier(fashion.root)
    xtr, _ = fashion_uint8("train")
    xte, yte = fashion_uint8("test")
    per = max(1, fresh // 10)
    labels = np.repeat(np.arange(10), per)
    prompts = [fashion_prompt(int(c)) for c in labels]
    rows, scored = [], {}
    configs = {f"default ({fashion.defaults['sampler']}, {fashion.defaults['steps']} steps, CFG)": {}}
    if fashion.onestep is not None:
        fast = fashion.fast_decoder is not None
        configs["one-step student" + (" + fast decoder" if fast else "")] = {
            "distilled": "onestep", "steps": 1, "decoder": "fast" if fast else "full"}
    for name, kw in configs.items():
        t = time.perf_counter()
        g = fashion.guidance(distilled=bool(kw.get("distilled")))
        images = fashion.generate(prompts, guidance=g, seed=1, progress=False, micro_batch=64, **kw)
        secs = time.perf_counter() - t
        s = score_images(model, images, labels, xte, xtr, real_test_labels=yte)
        scored[name] = {**{k: s[k] for k in ("accuracy", "fd", "precision", "recall", "accuracy_floor",
                                              "fd_floor", "precision_floor", "recall_floor")},
                        "images": len(images), "img_per_s": round(len(images) / secs, 1)}
        rows.append([R.esc(name)] + [R.fmt(scored[name][k], 4) for k in ("accuracy", "fd", "precision", "recall",
                                                                          "img_per_s")])
    floor = next(iter(scored.values())) if scored else {}
    rows.append([f"real images ({len(labels)} training images; accuracy on the test set)"] +
                [R.fmt(floor.get(k), 4) for k in ("accuracy_floor", "fd_floor", "precision_floor",
                                                  "recall_floor")] + ["-"])
    out.update({"fresh": scored, "eval_classifier_sha256": digest})
    html = (f"<p><b>Fresh samples</b>: {len(labels)} images ({per} per class prompt, seed 1) scored by the frozen "
            "evaluation classifier, trained on real images only: class accuracy, and Frechet distance and k-NN "
            "precision / recall (k = 3) in its feature space against the 10,000 test images; the last row is what "
            "real training images reach.</p>" +
            R.table(["sampler", "class accuracy", "FD", "precision", "recall", "img/s"], rows, "num metrics") +
            "<p><b>Stored metrics</b> of each stage (from its metrics.json, written when it was trained).</p>" +
            R.table(["pipeline", "stage", "params", "steps", "train s", "metrics"], stored, "metrics"))
    return html, out


def curves_section(pipes: dict[str, Path]) -> tuple[str, dict]:
    charts, out = [], {}
    for pname, root in pipes.items():
        spec = read_json(root / "pipeline.json")
        for stage, entry in spec["stages"].items():
            f = root / entry["path"] / "metrics.jsonl"
            if not f.is_file():
                continue
            rows = [json.loads(r) for r in f.read_text().splitlines() if r.strip()]
            keys = [k for k in CURVE_KEYS.get(stage, ("loss",)) if rows and k in rows[0]]
            series = {k: ([r["step"] for r in rows if k in r], [r[k] for r in rows if k in r]) for k in keys}
            if series:
                charts.append(R.line_chart(series, f"{pname} / {stage}", log_y=True))
                out[f"{pname}/{stage}"] = {k: v[1][-1] for k, v in series.items()}
    html = ("<p>Training loss of every stage (log scale), from each stage's metrics.jsonl: one row per logging "
            "interval, averaged over it.</p>" + "".join(f'<figure>{c}</figure>' for c in charts))
    return html, {"final": out}


# ----------------------------------------------------------------------------- the report
def build_report(fashion_dir: Path, shapes_dir: Path | None, out: Path, fresh: int = 1000, n_test: int = 1000) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(0)
    timer = Timer()
    fashion = timer("loading pipelines", Pipeline.load, fashion_dir)
    shapes = Pipeline.load(shapes_dir) if shapes_dir is not None else None
    test, labels = fashion_uint8("test")
    pipes = {"fashion-mnist": fashion_dir, **({"shapes": shapes_dir} if shapes_dir is not None else {})}
    parts = [("1. The latent space", timer("latent space", latent_space, fashion, test, labels, n_test)),
             ("2. Conditions: CLIP", timer("CLIP", clip_section, fashion_dir, n_test)),
             ("3. Guidance", timer("guidance", guidance_section, fashion)),
             ("4. Edits: img2img and inpainting", timer("edits", edits_section, fashion, test, labels))]
    if shapes is not None:
        parts.append(("5. Text to image: shapes", timer("shapes", shapes_section, shapes)))
    parts += [("6. Metrics", timer("metrics on fresh samples", metrics_section, pipes, fashion, fresh)),
              ("7. Training curves", timer("training curves", curves_section, pipes))]
    seconds = round(time.perf_counter() - t0, 1)
    result = {"pipelines": {k: str(v) for k, v in pipes.items()},
              "sections": {h: stats for h, (_, stats) in parts}, "seconds": timer.seconds, "total_seconds": seconds,
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    intro = ("<p>The ideas of latent diffusion, each shown on trained models: the "
             f"<code>{R.esc(fashion_dir)}</code> pipeline (Fashion-MNIST, text prompts such as 'a photo of a bag') "
             + (f"and <code>{R.esc(shapes_dir)}</code> (captioned shapes)" if shapes_dir is not None else "") +
             f". Made by <code>ldmkit demo</code> in {seconds:.0f} s on {torch.get_num_threads()} CPU threads; every "
             "number is also in report.json.</p>")
    out.mkdir(parents=True, exist_ok=True)
    write_bytes(out / "report.html", R.page("ldmkit: latent diffusion, end to end", intro,
                                            [(h, body) for h, (body, _) in parts]).encode())
    write_json(out / "report.json", result)
    return result


def train_bundled(root: Path, progress: bool) -> tuple[Path, Path]:
    """`ldmkit train pipeline` for both presets into ROOT, each exported (bf16) beside it."""
    print("[demo] retraining both pipelines from scratch, as pretrained/ was made (fixed steps; on 2 AVX512-BF16 "
          "cores: fashion-mnist about 80 minutes, shapes about 45). Interrupted? Run the same command again: "
          "finished stages are kept and an interrupted one resumes.", file=sys.stderr, flush=True)
    dirs = []
    for name in ("fashion-mnist", "shapes"):
        train_pipeline(PRESETS[name], root / "train" / name, progress=progress)
        dirs.append(root / name)
        export(root / "train" / name, root / name, "bf16", overwrite=True)
    return dirs[0], dirs[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="ldmkit demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo", help="report directory")
    p.add_argument("--fashion", default="fashion-mnist", help="Fashion-MNIST pipeline (name in pretrained/ or path)")
    p.add_argument("--shapes", default="shapes", help="shapes pipeline (name in pretrained/ or path); 'none' skips it")
    p.add_argument("--fresh", type=int, default=1000, help="fresh samples scored in the metrics table")
    p.add_argument("--train", action="store_true", help="retrain both pipelines from scratch first (hours)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.train:
        fashion, shapes = train_bundled(out, not args.no_progress)
    else:
        fashion = find_pipeline(args.fashion)
        shapes = None
        if args.shapes != "none":
            try:
                shapes = find_pipeline(args.shapes)
            except FileNotFoundError as e:  # the report goes on without its shapes section
                print(f"[demo] {e}; the shapes section is left out", file=sys.stderr)
    result = build_report(fashion, shapes, out, fresh=args.fresh)
    print(f"[demo] report written to {out / 'report.html'} ({result['total_seconds']:.0f} s; numbers in "
          f"{out / 'report.json'})", file=sys.stderr)
    return 0
