"""`ldmkit eval SAMPLES.npz`: score images with the frozen evaluation classifier, or against any dataset.

Default (Fashion-MNIST): accuracy against the npz's `labels` (where >= 0), the Frechet distance in the classifier's
penultimate features against the Fashion-MNIST test set, and k-NN precision/recall (k = 3), each beside the floor
that the same number of real training images reaches, with the classifier's weight hash.

`--reference DATA --pipeline DIR` (any dataset, e.g. folder:PATH): FD, KID, precision/recall and CLIP score in the
features of the pipeline's CLIP image tower, each beside its real-image floor (`ldmkit.eval.reference`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ldmkit.checkpoint import file_hash, load_safetensors, read_json, write_json
from ldmkit.config import from_dict
from ldmkit.data.fashion import fashion_uint8
from ldmkit.eval.classifier import EvalClassifier, EvalClassifierConfig, score_images
from ldmkit.eval.reference import score_against_reference
from ldmkit.stages import find_pipeline


def find_classifier_dir(path: str | Path) -> Path:
    """A stage directory of the eval classifier, or a pipeline directory holding `eval-classifier/`."""
    path = Path(path)
    for cand in (path, path / "eval-classifier"):
        if (cand / "model.safetensors").exists() and (cand / "config.json").exists():
            cfg = read_json(cand / "config.json")
            if cfg.get("stage") == "eval-classifier":
                return cand
    raise FileNotFoundError(f"{path} is neither an eval-classifier stage directory nor a pipeline directory with "
                            "eval-classifier/; train one with `ldmkit train eval-classifier --out DIR`")


def load_eval_classifier(path: str | Path):
    """(model in eval mode, weights hash) from a stage or pipeline directory."""
    d = find_classifier_dir(path)
    cfg = read_json(d / "config.json")
    model = EvalClassifier(from_dict(EvalClassifierConfig, cfg["model"]))
    model.load_state_dict(load_safetensors(d / "model.safetensors"))
    return model.eval(), file_hash(d / "model.safetensors")


def load_samples(path: str | Path, fashion: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"samples file {path} not found")
    with np.load(path, allow_pickle=False) as f:
        if "images" not in f:
            raise KeyError(f"{path} has no 'images' array (keys: {sorted(f.files)}); write it with `ldmkit sample`")
        images = f["images"]
        labels = f["labels"] if "labels" in f else None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{path}: images must be uint8 N x H x W x C, got {images.dtype} {images.shape}")
    if fashion and images.shape[1:] != (28, 28, 1):
        raise ValueError(f"{path}: images must be uint8 N x 28 x 28 x 1 (Fashion-MNIST native size), got "
                         f"{images.dtype} {images.shape}")
    return images, labels


def score_file(samples: str | Path, classifier: str | Path, data_dir: str | None = None, seed: int = 0) -> dict:
    images, labels = load_samples(samples)
    model, digest = load_eval_classifier(classifier)
    xtr, _ = fashion_uint8("train", data_dir)
    xte, yte = fashion_uint8("test", data_dir)
    out = score_images(model, images, labels, xte, xtr, real_test_labels=yte, seed=seed)
    return {"samples": str(samples), "eval_classifier_sha256": digest, **out}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="ldmkit eval", description=__doc__.splitlines()[0])
    p.add_argument("samples", help="npz with images (uint8 N x 28 x 28 x 1) and optional labels (int64, -1 = none)")
    p.add_argument("--classifier", default="pretrained/fashion-mnist",
                   help="eval-classifier stage directory, or a pipeline directory containing eval-classifier/ "
                        "(default: the bundled Fashion-MNIST pipeline's)")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST idx files")
    p.add_argument("--out", default=None, help="JSON to write (default: SAMPLES with .eval.json)")
    p.add_argument("--seed", type=int, default=0, help="seed of the real-image floor subset")
    p.add_argument("--reference", default=None, metavar="DATA", help="score against this dataset (folder:PATH, "
                   "shapes, fashion-mnist) in the features of --pipeline's CLIP image tower")
    p.add_argument("--pipeline", default=None, help="with --reference: the pipeline whose CLIP tower gives features")
    args = p.parse_args(argv)
    if args.reference is not None:
        return reference_main(args)
    classifier = args.classifier
    if classifier == p.get_default("classifier") and not Path(classifier).exists():
        classifier = find_pipeline("fashion-mnist")
    result = score_file(args.samples, classifier, args.data_dir, args.seed)
    out = Path(args.out) if args.out else Path(args.samples).with_suffix(".eval.json")
    write_json(out, result)
    print(json.dumps(result, indent=2))
    return 0


def reference_main(args) -> int:
    """`--reference DATA --pipeline DIR`: FD, KID, precision/recall and CLIP score with their floors."""
    if args.pipeline is None:
        raise ValueError("--reference needs --pipeline DIR (its CLIP image tower gives the features)")
    with np.load(args.samples, allow_pickle=False) as f:
        prompts = [str(p) for p in f["prompts"]] if "prompts" in f else None
    images, _ = load_samples(args.samples, fashion=False)
    spec = read_json(Path(args.pipeline) / "pipeline.json") if (Path(args.pipeline) / "pipeline.json").exists() else {}
    options = spec.get("data_options") if spec.get("data") == args.reference else None
    if options is None and args.reference.startswith("folder:") and spec:
        options = {"image_size": spec["image"]["size"][0]}
    result = {"samples": str(args.samples), "pipeline": str(args.pipeline),
              **score_against_reference(images, prompts, args.reference, args.pipeline, args.seed, options,
                                        args.data_dir)}
    out = Path(args.out) if args.out else Path(args.samples).with_suffix(".eval.json")
    write_json(out, result)
    print(json.dumps(result, indent=2))
    return 0
