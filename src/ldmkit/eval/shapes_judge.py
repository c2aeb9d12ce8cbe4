"""The shapes judge: one small CNN per attribute (shape, colour, position) that reads generated shapes images.

The text-to-image acceptance on captioned shapes asks whether a sample shows what its prompt named. Three
evaluation classifiers (`EvalClassifier`, 32x32 RGB) answer that, each trained on freshly generated scenes of ALL
36 shape-colour pairs (the held-out pairs included: the judge must read those too; only the generators never see
them), with a seed stream of their own, never mirrored (left and right are position labels). Like the Fashion-MNIST
evaluation classifier they are frozen before they judge anything and never enter a training loss; their weight
hashes travel with every score.

    ldmkit train shapes-judge --out DIR [--steps 1200] [--images 20000]     (ldmkit.train.shapes_judge)

writes DIR/{shape,color,position}.safetensors, DIR/config.json and DIR/metrics.json (accuracy of each on 2,000
newly drawn scenes, split into seen and held-out pairs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ldmkit.checkpoint import file_hash, load_safetensors, read_json
from ldmkit.config import from_dict
from ldmkit.data.shape_captions import COLORS, SHAPES
from ldmkit.eval.classifier import EvalClassifier, EvalClassifierConfig, predict

ATTRIBUTES = ("shape", "color", "position")
JUDGE_SEED = 9173  # the judge's image stream (the pipeline's data uses seed 0)
EVAL_SEED = 9174   # the scenes its accuracy is measured on


def judge_config(num_classes: int, attribute: str) -> EvalClassifierConfig:
    """32x32 RGB; the position judge keeps the spatial map in its head (a global average pool forgets where)."""
    return EvalClassifierConfig(image_size=32, in_channels=3, num_classes=num_classes, widths=(24, 48, 96),
                                depths=(1, 1, 1), pixel_mean=0.45, pixel_std=0.3,
                                head="flat" if attribute == "position" else "avg")


def scenes_nhwc(ds) -> np.ndarray:
    return ds.images.permute(0, 2, 3, 1).numpy()  # uint8 (N, 32, 32, 3)


def seen_mask(shapes: np.ndarray, colors: np.ndarray, heldout: list[tuple[str, str]]) -> np.ndarray:
    """True where (shape, colour) is a pair the generators trained on."""
    held = {(SHAPES.index(s), COLORS.index(c)) for s, c in heldout}
    return np.array([(int(s), int(c)) not in held for s, c in zip(shapes, colors)], dtype=bool)


def judge_accuracy(models: dict, images, labels: dict, seen: np.ndarray) -> dict:
    """Per attribute: accuracy on all images, on seen pairs and on held-out pairs (None where there are none)."""
    out = {}
    for a, model in models.items():
        logits, _ = predict(model, torch.as_tensor(images))
        right = (logits.argmax(1).numpy() == np.asarray(labels[a]))
        out[a] = {"all": float(right.mean()),
                  "seen": float(right[seen].mean()) if seen.any() else None,
                  "heldout": float(right[~seen].mean()) if (~seen).any() else None}
    return out


def load_judge(path: str | Path) -> tuple[dict, dict, list]:
    """({attribute: model in eval mode}, {attribute: weights hash}, held-out pairs) from a judge directory."""
    path = Path(path)
    if not (path / "config.json").exists() or read_json(path / "config.json").get("stage") != "shapes-judge":
        raise FileNotFoundError(f"{path} is not a shapes judge directory; train one with "
                                "`ldmkit train shapes-judge --out DIR`")
    cfg = read_json(path / "config.json")
    models, hashes = {}, {}
    for a in ATTRIBUTES:
        m = EvalClassifier(from_dict(EvalClassifierConfig, cfg["models"][a]))
        m.load_state_dict(load_safetensors(path / f"{a}.safetensors"))
        models[a], hashes[a] = m.eval(), file_hash(path / f"{a}.safetensors")
    return models, hashes, [tuple(p) for p in cfg["heldout"]]
