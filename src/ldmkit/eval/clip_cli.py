"""`ldmkit clip eval|embed|score`: evaluate a CLIP stage, print text embeddings, CLIP-score generated images.

`ldmkit clip eval DIR` (a CLIP stage directory, or a pipeline directory holding clip/) writes DIR/eval.json
(DIR/clip/eval.json for a pipeline) with:

- zero_shot_top1: Fashion-MNIST: top-1 over all 10,000 test images against the ten classes, each class embedded as
  the renormalised mean of its captions under every training template (prompt ensembling, Radford et al. 2021,
  section 3.1.4); zero_shot_top1_heldout does the same with the held-out templates no training caption uses.
  Shapes: the mean of the shape, colour, size and position accuracies below.
- Shapes, per attribute (shape, color, size, position, background): the class embedding of value v is the
  renormalised mean of the canonical captions of all 3,888 attribute combinations with that value. Every value
  thus averages over exactly the same combinations of the other attributes, so no class is favoured by its
  prompt set. The same figures on the "heldout" split (shape-colour pairs never seen in training) carry a
  `_heldout` suffix.
- i2t_r{1,5}, t2i_r{1,5}: retrieval on the first --num test images, each paired with one caption (Fashion-MNIST:
  a training template drawn with a fixed seed; shapes: the canonical caption). Many captions coincide (Fashion-
  MNIST has 120 distinct ones), so a retrieved item counts as correct when its caption string equals the
  query's; image-to-text ranks the distinct caption strings only, so copies of one wrong caption cannot fill the
  top k. Ties count in the query's favour. On Fashion-MNIST the template is not visible in the image, so the
  string rule caps these figures (about 1/12 at R@1); i2t_r1_class / t2i_r1_class count a retrieved item of the
  same class as correct. Shapes add t2i_r1_heldout: text-to-image R@1 among --num images of held-out pairs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

from ldmkit.checkpoint import file_hash, read_json, write_json
from ldmkit.conditioning import clip_score, zero_shot_classifier
from ldmkit.data import FASHION_CLASSES, HELDOUT_TEMPLATES, TRAIN_TEMPLATES, fill_template, load_split, to_float
from ldmkit.data.shape_captions import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, shape_caption
from ldmkit.stages import load_clip

ATTRIBUTES = ("shape", "color", "size", "position", "background")
TOP1_ATTRIBUTES = ("shape", "color", "size", "position")  # zero_shot_top1 of shapes = their mean accuracy


# ----------------------------------------------------------------------------- loading
def find_clip_dir(path: str | Path) -> Path:
    """A CLIP stage directory, or the clip/ stage of a pipeline directory."""
    path = Path(path)
    for cand in (path, path / "clip"):
        if (cand / "config.json").exists() and read_json(cand / "config.json").get("stage") == "clip":
            return cand
    raise FileNotFoundError(f"{path} is neither a CLIP stage directory nor a pipeline directory with clip/; "
                            "train one with `ldmkit train clip --out DIR`")


def load(path: str | Path):
    """(CLIPModel in eval mode, config dict, stage directory)."""
    d = find_clip_dir(path)
    return load_clip(d), read_json(d / "config.json"), d


def test_split(spec: str, split: str = "test", data_dir: str | None = None, options: dict | None = None):
    return load_split(spec, split, options, data_dir)


@torch.no_grad()
def image_features(model, images: torch.Tensor, batch_size: int = 500, tokens: bool = False) -> torch.Tensor:
    """uint8 (N, C, H, W) at model resolution -> unit-norm (N, E) float32 on the CPU (with `tokens`: the image
    tower's tokens (N, T, Dv), `CLIPModel.image_condition`)."""
    parts = [model.image_condition(to_float(images[i:i + batch_size]).to(model.device), tokens).float().cpu()
             for i in range(0, images.shape[0], batch_size)]
    return torch.cat(parts)


@torch.no_grad()
def text_features(model, prompts: list[str], batch_size: int = 1000) -> torch.Tensor:
    parts = [model.encode_prompts(prompts[i:i + batch_size]).float().cpu() for i in range(0, len(prompts), batch_size)]
    return torch.cat(parts)  # (N, E)


def top1(feats: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor) -> float:
    return ((feats @ class_emb.T).argmax(1) == labels).float().mean().item()


# ----------------------------------------------------------------------------- zero-shot
def fashion_zero_shot(model, feats: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1 with the training templates and with the held-out templates (prompt ensembling)."""
    out = {}
    for key, templates in (("zero_shot_top1", TRAIN_TEMPLATES), ("zero_shot_top1_heldout", HELDOUT_TEMPLATES)):
        weights = zero_shot_classifier(model, FASHION_CLASSES, templates, fill_template).float().cpu()  # (10, E)
        out[key] = top1(feats, weights, labels)
    return out


def attribute_embeddings(model) -> dict[str, torch.Tensor]:
    """Attribute -> (values, E) class embeddings: renormalised means of the canonical captions of all scenes."""
    sizes = {"shape": len(SHAPES), "color": len(COLORS), "size": len(SIZES), "position": len(POSITIONS),
             "background": len(BACKGROUNDS)}
    scenes = list(itertools.product(*(range(sizes[a]) for a in ATTRIBUTES)))  # 3888 combinations
    emb = text_features(model, [shape_caption(*s) for s in scenes])  # (3888, E)
    values = torch.tensor(scenes)  # (3888, 5)
    out = {}
    for k, attr in enumerate(ATTRIBUTES):
        rows = [emb[values[:, k] == v].mean(0) for v in range(sizes[attr])]
        out[attr] = torch.nn.functional.normalize(torch.stack(rows), dim=-1)  # (V, E)
    return out


def shapes_zero_shot(feats: torch.Tensor, labels: dict, class_emb: dict, suffix: str = "") -> dict:
    out = {f"{a}{suffix}": top1(feats, class_emb[a], labels[a]) for a in ATTRIBUTES}
    out[f"zero_shot_top1{suffix}"] = sum(out[f"{a}{suffix}"] for a in TOP1_ATTRIBUTES) / len(TOP1_ATTRIBUTES)
    return out


# ----------------------------------------------------------------------------- retrieval
def retrieval_by_key(img: torch.Tensor, txt: torch.Tensor, captions: list[str], keys: list | None = None,
                     ks=(1, 5), suffix: str = "") -> dict:
    """Recall@k where a retrieved item is correct when its key (default: its caption string) equals the query's.

    img, txt (N, E) unit-norm, row i of both belonging to pair i. Image-to-text ranks the distinct caption strings
    (the first row of each); text-to-image ranks all N images. Ties count in the query's favour.
    """
    keys = captions if keys is None else keys
    kid = {k: n for n, k in enumerate(dict.fromkeys(keys))}
    key = torch.tensor([kid[k] for k in keys])  # (N,)
    first = sorted({c: i for i, c in reversed(list(enumerate(captions)))}.values())  # distinct captions
    sim = img @ txt.T  # (N, N) image i against text j
    out = {}
    for name, s, match in (("i2t", sim[:, first], key[:, None] == key[first][None, :]),
                           ("t2i", sim.T, key[:, None] == key[None, :])):
        best = s.masked_fill(~match, -torch.inf).max(1).values  # (Q,) best correct candidate
        rank = (s.masked_fill(match, -torch.inf) > best[:, None]).sum(1)  # wrong candidates above it
        out.update({f"{name}_r{k}{suffix}": (rank < k).float().mean().item() for k in ks})
    return out


# ----------------------------------------------------------------------------- evaluation
def evaluate(model, spec: str, data_dir: str | None = None, num: int = 1000, batch_size: int = 500,
             options: dict | None = None) -> dict:
    """Every figure of the module docstring for the stage's dataset (`options`: its recorded data options)."""
    test = test_split(spec, "test", data_dir, options)
    n = min(num, len(test))
    feats = image_features(model, test.images, batch_size)  # (N, E)
    out: dict = {"data": spec, "test_images": len(test), "retrieval_images": n}
    if spec == "fashion-mnist":
        out.update(fashion_zero_shot(model, feats, test.labels["class"]))
        rng = random.Random(0)
        caps = [test.caption(i, rng) for i in range(n)]
        txt = text_features(model, caps)
        out.update(retrieval_by_key(feats[:n], txt, caps))
        classes = test.labels["class"][:n].tolist()
        out.update(retrieval_by_key(feats[:n], txt, caps, classes, ks=(1,), suffix="_class"))
        return out
    caps = test.captions(range(n))  # canonical
    out.update(retrieval_by_key(feats[:n], text_features(model, caps), caps))
    if spec == "shapes":
        emb = attribute_embeddings(model)
        out.update(shapes_zero_shot(feats, test.labels, emb))
        held = test_split(spec, "heldout")
        hfeats = image_features(model, held.images, batch_size)
        out.update(shapes_zero_shot(hfeats, held.labels, emb, "_heldout"))
        m = min(num, len(held))
        hcaps = held.captions(range(m))
        r = retrieval_by_key(hfeats[:m], text_features(model, hcaps), hcaps, ks=(1,), suffix="_heldout")
        out["t2i_r1_heldout"] = r["t2i_r1_heldout"]
    else:
        out["zero_shot_top1"] = None  # no labels to classify
    return out


def quick_metrics(model, spec: str, ds, n: int) -> dict:
    """Zero-shot figures on the first n test images, for a training run's metrics.json ({} without labels)."""
    if spec not in ("fashion-mnist", "shapes"):
        return {}
    test = test_split(spec, "test", ds.meta.get("data_dir"))
    feats = image_features(model, test.images[:n])
    labels = {k: v[:n] for k, v in test.labels.items()}
    if spec == "fashion-mnist":
        return {f"test_{k}": v for k, v in fashion_zero_shot(model, feats, labels["class"]).items()}
    return {f"test_{k}": v for k, v in shapes_zero_shot(feats, labels, attribute_embeddings(model)).items()}


def eval_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="ldmkit clip eval", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("dir", help="CLIP stage directory, or a pipeline directory containing clip/")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST idx files")
    p.add_argument("--num", type=int, default=1000, help="test images (and captions) used for retrieval")
    p.add_argument("--batch-size", type=int, default=500, help="images per forward pass")
    args = p.parse_args(argv)
    if args.num < 1 or args.batch_size < 1:
        p.error(f"--num ({args.num}) and --batch-size ({args.batch_size}) must be >= 1")
    model, cfg, d = load(args.dir)
    spec = cfg.get("data")
    if not spec:
        raise ValueError(f"{d / 'config.json'} names no dataset ('data'); cannot choose the evaluation split")
    with torch.inference_mode():
        result = evaluate(model, spec, args.data_dir, args.num, args.batch_size, cfg.get("data_options"))
    result = {"clip_dir": str(d), "clip_sha256": file_hash(d / "model.safetensors"), **result}
    write_json(d / "eval.json", result)
    print(json.dumps(result, indent=2))
    return 0


# ----------------------------------------------------------------------------- embed / score
def embed_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="ldmkit clip embed",
                                description="print CLIP text embeddings (unit-norm, the pooled vector the denoiser "
                                            "sees) of prompts")
    p.add_argument("dir", help="CLIP stage directory, or a pipeline directory containing clip/")
    p.add_argument("prompts", nargs="+", help="prompts to embed")
    p.add_argument("--decimals", type=int, default=4, help="digits printed per value")
    p.add_argument("--out", default=None, help="write the (N, E) float32 embeddings to this .npy file instead")
    args = p.parse_args(argv)
    model, _, _ = load(args.dir)
    emb = model.text_encoder().encode(args.prompts)["pooled"].numpy().astype(np.float32)  # (N, E)
    if args.out:
        if not args.out.endswith(".npy"):
            p.error(f"--out {args.out} must end in .npy")
        np.save(args.out, emb)
        print(f"wrote {emb.shape[0]} x {emb.shape[1]} embeddings to {args.out}", file=sys.stderr)
        return 0
    for prompt, row in zip(args.prompts, emb):
        print(f"{prompt}\t" + " ".join(f"{v:.{args.decimals}f}" for v in row))
    return 0


def to_model_resolution(images: np.ndarray, size: int, channels: int, source: str) -> torch.Tensor:
    """uint8 N x H x W x C at native size -> uint8 (N, C, size, size), padded with black and centred the way the
    Fashion-MNIST loader pads 28 -> 32 (an odd margin puts the extra row and column at the bottom and right)."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{source}: images must be uint8 N x H x W x C, got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    if c != channels or h > size or w > size:
        raise ValueError(f"{source}: images are {h}x{w}x{c} but the CLIP stage takes {channels} channel(s) at "
                         f"up to {size}x{size}; score samples of the dataset this CLIP was trained on")
    out = torch.zeros(n, c, size, size, dtype=torch.uint8)
    top, left = (size - h) // 2, (size - w) // 2
    out[:, :, top:top + h, left:left + w] = torch.from_numpy(images).permute(0, 3, 1, 2)
    return out


def score_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="ldmkit clip score",
                                description="CLIP score (100 * max(cos, 0), Hessel et al. 2021) of an npz's images "
                                            "against its prompts")
    p.add_argument("dir", help="CLIP stage directory, or a pipeline directory containing clip/")
    p.add_argument("samples", help="npz with images (uint8 N x H x W x C, native size) and prompts (unicode)")
    p.add_argument("--out", default=None, help="JSON to write (default: SAMPLES with .clip.json)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    args = p.parse_args(argv)
    model, _, d = load(args.dir)
    path = Path(args.samples)
    if not path.exists():
        raise FileNotFoundError(f"samples file {path} not found")
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in ("images", "prompts") if k not in f]
        if missing:
            raise KeyError(f"{path} lacks {missing} (keys: {sorted(f.files)}); write it with `ldmkit sample`")
        images, prompts = f["images"], [str(s) for s in f["prompts"]]
    if len(prompts) != len(images):
        raise ValueError(f"{path}: {len(images)} images but {len(prompts)} prompts; they must pair one to one")
    v = model.config.vision
    x = to_float(to_model_resolution(images, v.image_size, v.channels, str(path)))
    result = {"samples": str(path), "clip_dir": str(d), "clip_sha256": file_hash(d / "model.safetensors"),
              "n": len(prompts), "clip_score": clip_score(model, x, prompts, args.batch_size)}
    write_json(Path(args.out) if args.out else path.with_suffix(".clip.json"), result)
    print(json.dumps(result, indent=2))
    return 0
