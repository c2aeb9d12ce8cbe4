"""What every experiment shares: where it writes, how it resumes, how it trains a stage and how it judges images.

An experiment writes its figures (PNG) and its numbers (`NAME.json`) to the output folder (docs/experiments by
default) and keeps what it trains and every intermediate result in its work folder (runs/experiments/NAME). Each
intermediate result is memoised by a key (`Context.memo`) and each training run resumes from its last checkpoint, so
an interrupted experiment continues where it stopped when the same command runs again.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ldmkit.checkpoint import provenance, read_json, write_json

CLASSES_PER_ROW = 10


def machine() -> dict:
    """The machine a result was measured on: CPU model, cores, torch build, load average."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average": round(os.getloadavg()[0], 2)}


@dataclass
class Context:
    """One experiment's run: its name, folders, the bundled pipeline it builds on, and the quick switch (tests)."""

    name: str
    out: Path                   # figures and NAME.json (docs/experiments)
    work: Path                  # trained stages and memoised results (runs/experiments/NAME)
    pipeline: Path              # the bundled Fashion-MNIST pipeline (autoencoder, CLIP, eval classifier, ...)
    quick: bool = False         # minutes -> seconds: tiny budgets and few images (tests), same code path
    data_dir: str | None = None
    progress: bool = True
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        self.out, self.work, self.pipeline = Path(self.out), Path(self.work), Path(self.pipeline)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.work / "memo").mkdir(parents=True, exist_ok=True)

    def log(self, msg: str) -> None:
        if self.progress:
            print(f"[{self.name} {time.perf_counter() - self.started:6.0f} s] {msg}", flush=True)

    def memo(self, key: str, fn: Callable[[], Any]) -> Any:
        """fn()'s JSON-able result, computed once: a rerun after an interruption reads it back."""
        path = self.work / "memo" / f"{key}.json"
        if path.exists():
            return read_json(path)
        value = fn()
        write_json(path, value)
        return value

    def figure(self, suffix: str) -> Path:
        return self.out / f"{self.name}-{suffix}.png"

    def n(self, full: int, quick: int) -> int:
        return quick if self.quick else full


def stage_dir(ctx: Context, name: str, fit: Callable[[Path, bool], Any]) -> Path:
    """Train a stage into work/NAME once: a finished one is kept, an interrupted one resumes."""
    out = ctx.work / name
    if not ((out / "metrics.json").exists() and (out / "model.safetensors").exists()):
        ctx.log(f"training {name}")
        fit(out, (out / "state.pt").exists())
    return out


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def bundled_autoencoder(ctx: Context) -> Path:
    """The bundled autoencoder stage, hard-linked once into the work root and shared by every experiment: the latent
    cache a denoiser's training writes beside its autoencoder lands there (encoded once for all of them), never in
    the bundled pipeline. The cache is bound to the weights' hash and the data's size, so quick runs keep apart."""
    dst = ctx.work.parent / "bundled-autoencoder"
    if not dst.exists():
        part = ctx.work.parent / "bundled-autoencoder.partial"  # renamed when complete: a broken copy is never used
        shutil.rmtree(part, ignore_errors=True)
        shutil.copytree(ctx.pipeline / "autoencoder", part, copy_function=_link_or_copy,
                        ignore=shutil.ignore_patterns("latents", "state.pt"))
        part.rename(dst)
    return dst


def assemble_pipeline(ctx: Context, name: str, stages: dict[str, Path], defaults: dict | None = None) -> Path:
    """A pipeline folder work/NAME from stage folders (copied in by hard links) and pipeline.json: bundled stages
    and ones trained here combine freely, as long as each is bound to the autoencoder and CLIP it names."""
    from ldmkit.stages import PIPELINE_FORMAT, load_autoencoder, stage_config, stage_entry
    root = ctx.work / name
    root.mkdir(parents=True, exist_ok=True)
    for stage, src in stages.items():
        dst = root / stage
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst, copy_function=_link_or_copy, ignore=shutil.ignore_patterns("latents", "state.pt"))
    base = read_json(ctx.pipeline / "pipeline.json")
    _, scale, shift = load_autoencoder(root / "autoencoder")
    dcfg = stage_config(root / "denoiser", "ldm")
    spec = {**{k: base[k] for k in ("format", "data", "image", "data_options") if k in base},
            "format": PIPELINE_FORMAT, "stages": {s: stage_entry(root, s) for s in stages},
            "latent": {"scale_factor": scale, "shift_factor": shift, "shape": dcfg["conditioning"]["latent_shape"]},
            "defaults": {**base["defaults"], **(defaults or {})}, "provenance": provenance()}
    write_json(root / "pipeline.json", spec)
    return root


class Judge:
    """The bundled pipeline's frozen evaluation classifier, with the Fashion-MNIST splits it scores against. What
    depends only on real images (the test set's features and k-NN radii, the real-data floor of each sample count) is
    computed once, so a scored point costs about a second. Quick mode compares against 1,000 test images."""

    def __init__(self, ctx: Context, k: int = 3):
        from ldmkit.data.fashion import fashion_uint8
        from ldmkit.eval.metrics import knn_radii
        from ldmkit.eval.score import load_eval_classifier
        self.model, self.sha = load_eval_classifier(ctx.pipeline)
        self.xtr, self.ytr = fashion_uint8("train", ctx.data_dir)
        xte, yte = fashion_uint8("test", ctx.data_dir)
        ref = ctx.n(len(xte), 1000)
        self.xte, self.yte, self.k, self._floors = xte[:ref], yte[:ref], k, {}
        logits, self.test_feats = self.features(self.xte)
        self.test64 = self.test_feats.double()
        self.test_radii = knn_radii(self.test64, k)
        self.accuracy_floor = float((logits.argmax(1) == torch.as_tensor(self.yte)).double().mean())

    def features(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, penultimate features) of uint8 images (N, 28, 28, 1)."""
        from ldmkit.eval.classifier import predict
        return predict(self.model, images)

    def _inside(self, queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
        hits = [(torch.cdist(queries[i:i + 1024], centres) <= radii[None]).any(1) for i in range(0, len(queries), 1024)]
        return float(torch.cat(hits).double().mean())

    def precision_recall(self, feats: torch.Tensor) -> tuple[float, float]:
        """k-NN precision and recall (Kynkaanniemi et al. 2019) against the test set, as `eval.metrics` defines them."""
        from ldmkit.eval.metrics import knn_radii
        fake = feats.double()
        return (self._inside(fake, self.test64, self.test_radii),
                self._inside(self.test64, fake, knn_radii(fake, self.k)))

    def floors(self, n: int) -> dict:
        """FD, recall and accuracy of real images: n random training images (seed 0, as `score_images` draws them)."""
        from ldmkit.eval.metrics import frechet_distance
        if n not in self._floors:
            pick = torch.randperm(len(self.xtr), generator=torch.Generator().manual_seed(0))[:n].numpy()
            _, f = self.features(self.xtr[pick])
            self._floors[n] = {"fd_floor": frechet_distance(f, self.test_feats),
                               "recall_floor": self.precision_recall(f)[1], "accuracy_floor": self.accuracy_floor}
        return self._floors[n]

    def score(self, images: np.ndarray, labels) -> dict:
        """Accuracy, FD, precision, recall (k = 3, against the test set), their real-data floors and within-class
        diversity: the mean distance between two samples of one class in the classifier's features, over the same
        for real test images of that class."""
        from ldmkit.eval.metrics import frechet_distance
        labels = np.asarray(labels)
        logits, f = self.features(images)
        out = {"accuracy": float((logits.argmax(1) == torch.as_tensor(labels)).double().mean()),
               "fd": frechet_distance(f, self.test_feats)}
        out["precision"], out["recall"] = self.precision_recall(f)
        out.update(self.floors(len(images)))
        ratios = [float(torch.pdist(f[torch.as_tensor(labels == c)]).mean()
                        / torch.pdist(self.test_feats[torch.as_tensor(self.yte == c)][:len(f)]).mean())
                  for c in np.unique(labels) if (labels == c).sum() > 1]
        out["diversity"] = float(np.mean(ratios)) if ratios else float("nan")
        return {k: round(v, 4) for k, v in out.items()}


def class_prompts(per_class: int, template: str = "a photo of a {}") -> tuple[list[str], list[int]]:
    from ldmkit.data import FASHION_CLASSES, fill_template
    rows = [(fill_template(template, name), c) for c, name in enumerate(FASHION_CLASSES) for _ in range(per_class)]
    return [p for p, _ in rows], [c for _, c in rows]


def save_grid(images: np.ndarray, path: Path, nrow: int = CLASSES_PER_ROW, scale: int = 2) -> Path:
    from ldmkit.images import grid, save_png
    save_png(grid(images, nrow=nrow, scale=scale), path)
    return path


def pyplot():
    """matplotlib's pyplot with a file-only backend (the `experiments` extra)."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("ldmkit experiment draws its plots with matplotlib: pip install 'ldmkit[experiments]'") \
            from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(ctx: Context, fig, suffix: str) -> Path:
    """Lay out, write (ctx.figure(suffix), 110 dpi) and close a matplotlib figure; its path."""
    fig.tight_layout()
    path = ctx.figure(suffix)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def result(ctx: Context, numbers: dict, verdict: str, figures: list[Path], notes: str = "") -> dict:
    """The record an experiment returns: numbers, its verdict on the claim, its figures and how it was made."""
    return {"name": ctx.name, "verdict": verdict, "numbers": numbers, "notes": notes,
            "figures": [Path(f).name for f in figures], "quick": ctx.quick,
            "command": f"ldmkit experiment {ctx.name}", "minutes": round((time.perf_counter() - ctx.started) / 60, 1),
            "machine": machine(), "provenance": provenance()}


def dumps(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)
