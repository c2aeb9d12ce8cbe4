"""`ldmkit train eval-classifier`: the frozen Fashion-MNIST CNN that scores every generator.

It is trained on real training images only, before any generator, and never enters a training loss. Its weight
hash is written into `metrics.json` here and into every evaluation and benchmark JSON that uses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ldmkit.checkpoint import file_hash, provenance, save_safetensors, write_json
from ldmkit.config import to_dict
from ldmkit.eval.classifier import PRESETS as MODEL_PRESETS, EvalClassifierConfig, train_eval_classifier
from ldmkit.train.args import resolve_config, train_parser


@dataclass(frozen=True)
class EvalClassifierStage:
    model: EvalClassifierConfig = field(default_factory=EvalClassifierConfig)
    steps: int = 3000          # optimizer steps (batch 128: about 6.4 epochs)
    batch_size: int = 128      # images per step
    lr: float = 3e-3           # peak AdamW learning rate (one-cycle)
    seed: int = 0              # init, order and augmentation seed


PRESETS = {
    "fashion-mnist": EvalClassifierStage(),
    "tiny": EvalClassifierStage(model=MODEL_PRESETS["tiny"], steps=60, batch_size=64),
}


def fashion_uint8(split: str, data_dir: str | None = None):
    """Fashion-MNIST `split` at its native 28x28 as (uint8 (N, 28, 28, 1) numpy, int64 labels numpy)."""
    from ldmkit.data import load_dataset
    ds = load_dataset("fashion-mnist", split=split, data_dir=data_dir)
    return ds.crop(ds.images).permute(0, 2, 3, 1).numpy(), ds.labels["class"].numpy()


def main(argv: list[str] | None = None) -> int:
    p = train_parser("ldmkit train eval-classifier", __doc__.splitlines()[0], PRESETS, "fashion-mnist", data=False)
    p.add_argument("--data-dir", default=None, help="folder with the four Fashion-MNIST idx .gz files")
    args = p.parse_args(argv)
    if args.resume or args.init_from:
        p.error("the evaluation classifier trains in a few minutes from scratch; --resume/--init-from are not "
                "supported (a new --out directory starts it again)")
    cfg = resolve_config(args, PRESETS)
    train(cfg, args.out, args.data_dir, progress=not args.no_progress)
    return 0


def train(cfg: EvalClassifierStage, out, data_dir: str | None = None, progress: bool = True) -> dict:
    from pathlib import Path
    out = Path(out)
    xtr, ytr = fashion_uint8("train", data_dir)
    xte, yte = fashion_uint8("test", data_dir)
    write_json(out / "config.json", {"stage": "eval-classifier", "data": "fashion-mnist", **to_dict(cfg)})
    model, acc = train_eval_classifier(xtr, ytr, xte, yte, steps=cfg.steps, batch_size=cfg.batch_size,
                                       seed=cfg.seed, progress=progress, config=cfg.model, lr=cfg.lr)
    save_safetensors(model.state_dict(), out / "model.safetensors", {"stage": "eval-classifier"})
    metrics = {**provenance(data="fashion-mnist", stage="eval-classifier"), "test_accuracy": acc,
               "weights_sha256": file_hash(out / "model.safetensors")}
    write_json(out / "metrics.json", metrics)
    print(f"eval-classifier: test accuracy {acc:.4f}, weights {metrics['weights_sha256']} -> {out}")
    return metrics
