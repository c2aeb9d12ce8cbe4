"""The training toolkit every stage's flat loop is written with.

A stage loop reads top-down: `run = start_run(...)`, build models and optimizers, `start = run.restore(...)`,
then `for step in run.steps(start, total)`: batch (`batch_indices`), `set_lr`, forward under `autocast`, backward,
`clip_grad`, optimizer step, `ema_update`, `run.log`, `run.save` at intervals, and `run.finish` at the end.
Nothing here owns the loop: no Trainer class, no callbacks. The pieces live beside it: `device` (where and in
what precision), `distributed`, `logger` (metrics.jsonl, console, TensorBoard), `interrupt` (SIGINT/SIGTERM),
`optim` (AdamW/Muon, schedule, clipping, EMA), and `ldmkit.seeding` / `ldmkit.checkpoint`.
Under `torchrun`, `start_run` joins the process group, batches split by rank from one global order, only rank 0
writes files, and logged scalars are averaged over ranks.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

import torch
from torch import nn

from ldmkit.checkpoint import (
    check_run_dir,
    load_safetensors,
    load_state,
    lock_run_dir,
    provenance,
    remove_orphaned_temporaries,
    save_safetensors,
    save_state,
    unlock_run_dir,
    write_json,
)
from ldmkit.config import to_dict
from ldmkit.data import data_options
from ldmkit.seeding import batch_indices, rng_state, seed_everything, set_rng_state  # noqa: F401 (batch_indices re-exported)
from ldmkit.train.device import autocast, effective_precision, resolve_device  # noqa: F401 (re-exported)
from ldmkit.train.distributed import all_reduce_mean, init_distributed, wrap_ddp  # noqa: F401 (re-exported)
from ldmkit.train.interrupt import TrainingInterrupted, stop_on_signals
from ldmkit.train.logger import MetricsLog, TrainingDiverged  # noqa: F401 (re-exported)
from ldmkit.train.optim import adamw, clip_grad, ema_update, lr_at, make_adamw, match_param_layout, set_lr, unwrap  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000                        # optimizer steps in the whole run
    batch_size: int = 64                     # global batch, split evenly over processes
    lr: float = 2e-4                         # peak learning rate
    weight_decay: float = 0.0                # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: Muon on weight matrices, AdamW on the rest (train/muon.py)
    warmup_steps: int = 100                  # linear warmup from 0 to lr
    min_lr_ratio: float = 0.1                # cosine decays to lr * min_lr_ratio at the last step
    grad_clip: float = 1.0                   # max global grad norm; 0 disables clipping
    ema_halflife_steps: float = 0.0          # EMA half-life in optimizer steps; 0 disables EMA
    seed: int = 0                            # seeds init, data order and every random draw
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 = autocast where the device supports it
    device: str = "auto"                     # auto | cpu | cuda | cuda:N | mps
    log_every: int = 50                      # one log line (and a metrics.jsonl row) per this many steps
    ckpt_every: int = 500                    # resume checkpoint interval (state.pt + model.safetensors)
    sample_every: int = 0                    # image grid interval during training; 0 = only at the end
    max_minutes: float = 0.0                 # opt-in wall-clock budget (--minutes): save and stop when spent; 0 = none
    threads: int = 0                         # torch intra-op threads; 0 keeps torch's default
    tensorboard: bool = False                # also log scalars to DIR/tb (needs the tensorboard package)


# ----------------------------------------------------------------------------- the run directory

class Run:
    """Files and bookkeeping of one training run in `out_dir` (not a trainer: the stage owns its loop)."""

    def __init__(self, out_dir: str | os.PathLike, cfg: Any, tc: TrainConfig, stage: str,
                 data: str | None = None, resume: bool = False, init_from: str | None = None,
                 progress: bool = True, dataset=None):
        self.dir, self.cfg, self.tc, self.stage = Path(out_dir), cfg, tc, stage
        self.resume, self.init_from = resume, init_from
        self.rank, self.world = init_distributed()
        self.is_main = self.rank == 0
        self.device = resolve_device(tc.device)
        if tc.threads > 0:
            torch.set_num_threads(tc.threads)
        if self.is_main:
            lock_run_dir(self.dir)  # a second writer is refused, naming this process
            remove_orphaned_temporaries(self.dir)
        check_run_dir(self.dir, {"stage": stage, **to_dict(cfg)}, resume)
        self.info = {"stage": stage, "data": data, "precision": effective_precision(self.device, tc.precision),
                     **provenance()}
        self.logs = MetricsLog(self.dir, stage, tc, self.is_main, progress)
        if self.info["precision"] != tc.precision:
            self.print(f"[{stage}] train.precision={tc.precision} but this {self.device.type} has no native bf16 "
                       "arithmetic: training in fp32 (emulated bf16 is 10-20x slower)")
        if self.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            options = {} if dataset is None else data_options(dataset)  # how to load it again (size, folder)
            write_json(self.dir / "config.json", {"stage": stage, "data": data, "data_options": options,
                                                  **to_dict(cfg)})
        self._t0 = time.perf_counter()
        self.stopped_early = False
        self._t_trained = None  # when the step loop ended: train_seconds (wall_seconds adds the final metrics)
        seed_everything(tc.seed)

    # -- restore / save
    def restore(self, modules: Mapping[str, nn.Module], optimizers: Mapping[str, torch.optim.Optimizer]) -> int:
        """Load resume state (returns the step to continue from) or `--init-from` weights (returns 0)."""
        self._modules, self._optimizers = modules, optimizers  # saved as they are if a signal stops the run
        if self.resume:
            st = load_state(self.dir / "state.pt", expect=modules)
            for name, m in modules.items():
                unwrap(m).load_state_dict(st["modules"][name])
            for name, o in optimizers.items():
                o.load_state_dict(st["optimizers"][name])
                match_param_layout(o)
            set_rng_state(st["rng"])
            self.logs.trim(st["step"])
            self.logs.acc = {k: list(v) for k, v in st.get("log_acc", {}).items()}  # the interval in progress
            return int(st["step"])
        if self.init_from:
            src = Path(self.init_from) / "model.safetensors"
            weights = load_safetensors(src)
            for name in ("model", "ema"):
                if name in modules:
                    missing, unexpected = unwrap(modules[name]).load_state_dict(weights, strict=False)
                    if missing or unexpected:
                        raise ValueError(f"--init-from {src}: weights do not fit this model (missing {missing[:4]},"
                                         f" unexpected {unexpected[:4]}); use a run of the same preset")
        return 0

    def save(self, step: int, modules: Mapping[str, nn.Module], optimizers: Mapping[str, torch.optim.Optimizer],
             export: Mapping[str, torch.Tensor]) -> None:
        """Resume checkpoint at `step` (steps done so far): state.pt, then model.safetensors, both atomic."""
        if not self.is_main:
            return
        state = {
            "step": step,
            "modules": {n: unwrap(m).state_dict() for n, m in modules.items()},
            "optimizers": {n: o.state_dict() for n, o in optimizers.items()},
            "rng": rng_state(),
            "log_acc": {k: [float(x) for x in v] for k, v in self.logs.acc.items()},
        }
        save_state(state, self.dir / "state.pt")
        save_safetensors(dict(export), self.dir / "model.safetensors", {"stage": self.stage, "step": str(step)})

    def finish(self, export: Mapping[str, torch.Tensor], metrics: Mapping[str, Any], step: int) -> dict:
        """Final weights and the metrics.json summary (with provenance and wall time)."""
        summary = {**self.info, "steps_done": step, "stopped_early": self.stopped_early,
                   "train_seconds": None if self._t_trained is None else round(self._t_trained - self._t0, 1),
                   "wall_seconds": round(time.perf_counter() - self._t0, 1), **metrics}
        if self.is_main:
            save_safetensors(dict(export), self.dir / "model.safetensors", {"stage": self.stage, "step": str(step)})
            write_json(self.dir / "metrics.json", summary)
            unlock_run_dir(self.dir)
        self.logs.close()
        return summary

    # -- loop helpers
    def steps(self, start: int, total: int) -> Iterator[int]:
        """Step indices start..total-1 with a progress bar. With an opt-in `max_minutes` budget the loop ends
        before a step (as long as the last one) would finish past it; the stage then saves as usual."""
        budget = self.tc.max_minutes * 60
        self.logs.open_bar(start, total)
        t_prev = None  # when the previous step started: its length is the guess for the next one
        with stop_on_signals() as stop:
            for step in range(start, total):
                now = time.perf_counter()
                last, t_prev = (now - t_prev if t_prev is not None else 0.0), now
                if budget and now - self._t0 + last > budget:  # the next step would end past the budget
                    self.stopped_early = True
                    self.print(f"time budget of {self.tc.max_minutes} min spent at step {step}; saving and stopping")
                    break
                yield step
                self.logs.bar.update(1)
                if stop.signum is not None:
                    self._save_and_stop(step + 1, stop.name)
        self._t_trained = time.perf_counter()

    def _save_and_stop(self, step: int, name: str) -> None:
        modules = getattr(self, "_modules", {})
        export = modules.get("ema", modules.get("model"))
        if export is not None:
            self.save(step, modules, self._optimizers, unwrap(export).state_dict())
        self.print(f"{name}: checkpoint saved at step {step} in {self.dir}; continue with --resume")
        raise TrainingInterrupted(f"{self.stage} stopped by {name} after step {step}; the checkpoint in {self.dir} "
                                  "resumes it exactly (rerun with --resume)")

    def log(self, step: int, **scalars: float) -> None:
        """Record scalars for `step` (see `MetricsLog.log`); a non-finite value stops the run."""
        self.logs.log(step, **scalars)

    def print(self, msg: str) -> None:
        self.logs.print(msg)

    def image(self, images, name: str, step: int | None = None, nrow: int | None = None):
        """Save a grid of images into the run folder (and TensorBoard), saying where (see `MetricsLog.image`)."""
        return self.logs.image(images, name, step, nrow)

    def should(self, every: int, step: int) -> bool:
        return every > 0 and (step + 1) % every == 0


def start_run(out_dir, cfg, tc: TrainConfig, stage: str, **kw) -> Run:
    return Run(out_dir, cfg, tc, stage, **kw)
