"""A run's log: scalars averaged per interval into `metrics.jsonl`, one console line, the progress bar, and
optionally TensorBoard. A non-finite value stops the run (`TrainingDiverged`)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ldmkit.checkpoint import write_bytes
from ldmkit.images import grid, save_png, to_uint8_nhwc
from ldmkit.train.distributed import all_reduce_mean


class TrainingDiverged(RuntimeError):
    """A non-finite loss: the run stops and the last good checkpoint stays as it was."""


class MetricsLog:
    """Scalars of one stage run; only the main process writes or prints."""

    def __init__(self, run_dir: Path, stage: str, tc, is_main: bool, progress: bool):
        self.dir, self.stage, self.tc, self.is_main = run_dir, stage, tc, is_main
        self.progress = progress and is_main
        self.acc: dict[str, list[float]] = {}  # the interval in progress (saved in resume checkpoints)
        self.bar = None
        self._tb = None
        self._t_last, self._step_last = time.perf_counter(), 0

    def open_bar(self, start: int, total: int) -> None:
        self.bar = tqdm(total=total, initial=start, desc=self.stage, disable=not self.progress,
                        dynamic_ncols=True, file=sys.stderr)
        self._t_last, self._step_last = time.perf_counter(), start

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def log(self, step: int, **scalars: float) -> None:
        """Record scalars for `step`; one line per `log_every` steps (and at the last step)."""
        for k, v in scalars.items():
            v = float(v)
            if not math.isfinite(v):
                raise TrainingDiverged(f"{k} is {v} at step {step} of {self.stage}; stopping. The last good "
                                       f"checkpoint in {self.dir} is intact (resume with --resume); lower "
                                       "train.lr, keep train.grad_clip on, or try train.precision=fp32")
            self.acc.setdefault(k, []).append(v)
        if (step + 1) % self.tc.log_every == 0 or step + 1 == self.tc.steps:
            self.flush(step)

    def flush(self, step: int) -> None:
        means = all_reduce_mean({k: sum(v) / len(v) for k, v in self.acc.items()})
        self.acc.clear()
        now = time.perf_counter()
        ms = 1000 * (now - self._t_last) / max(1, step + 1 - self._step_last)
        self._t_last, self._step_last = now, step + 1
        row = {"step": step + 1, **{k: round(v, 6) for k, v in means.items()}, "ms_per_step": round(ms, 1),
               "img_per_s": round(self.tc.batch_size / max(ms, 1e-9) * 1000, 1)}
        if not self.is_main:
            return
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        parts = [f"step {step + 1}"] + [f"{k} {v:.4g}" for k, v in means.items()]
        parts += [f"{ms:.0f} ms/step", f"{_human(row['img_per_s'])} img/s"]
        self.print(" | ".join(parts))
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in list(means.items())[:3]})
        if self.tc.tensorboard:
            self._tb_log(step + 1, means)

    def _tb_log(self, step: int, means: dict[str, float]) -> None:
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter  # local: tensorboard is optional
            except ImportError:
                raise ImportError("train.tensorboard=true needs `pip install tensorboard`") from None
            self._tb = SummaryWriter(str(self.dir / "tb"))
        for k, v in means.items():
            self._tb.add_scalar(f"{self.stage}/{k}", v, step)

    def image(self, images, name: str, step: int | None = None, nrow: int | None = None) -> Path | None:
        """A grid of `images` (float [-1, 1] NCHW or uint8 NHWC) as DIR/NAME-STEP.png (DIR/NAME.png at the end),
        said on the console, and in TensorBoard when it is on. Only the main process writes."""
        if not self.is_main:
            return None
        arr = grid(to_uint8_nhwc(images) if isinstance(images, torch.Tensor) else np.asarray(images), nrow=nrow,
                   scale=2)
        path = self.dir / (f"{name}.png" if step is None else f"{name}-{step:06d}.png")
        save_png(arr, path)
        self.print(f"[{self.stage}] {name} grid -> {path}")
        if self.tc.tensorboard:
            self._tb_log(step or self.tc.steps, {})  # opens the writer
            self._tb.add_image(f"{self.stage}/{name}", arr, step or self.tc.steps, dataformats="HWC")
        return path

    def trim(self, step: int) -> None:
        """On resume, drop rows past the checkpoint so metrics.jsonl reads like one uninterrupted run."""
        path = self.dir / "metrics.jsonl"
        if self.is_main and path.exists():
            rows = [r for r in map(_log_row, path.read_text(errors="replace").splitlines()) if r is not None]
            write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step).encode())

    def print(self, msg: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None and self.progress:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)


def _log_row(line: str) -> dict | None:
    """A metrics.jsonl row, or None for a blank or cut-off line (a crash or a full disk mid-append)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None


def _human(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"
