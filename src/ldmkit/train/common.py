"""The training toolkit every stage's flat loop is written with.

A stage loop reads top-down: `run = start_run(...)`, build models and optimizers, `start = run.restore(...)`,
then `for step in run.steps(start, total)`: batch (`batch_indices`), `set_lr`, forward under `autocast`, backward,
`clip_grad`, optimizer step, `ema_update`, `run.log`, `run.save` at intervals, and `run.finish` at the end.
Nothing here owns the loop: no Trainer class, no callbacks.

Distributed: started by `torchrun`, `start_run` joins the process group (gloo on CPU, NCCL on GPU), batches are
split by rank from one global order, only rank 0 writes files, and logged scalars are averaged over ranks.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ldmkit.checkpoint import (
    load_safetensors,
    load_state,
    lock_run_dir,
    provenance,
    read_json,
    remove_orphaned_temporaries,
    save_safetensors,
    save_state,
    unlock_run_dir,
    write_bytes,
    write_json,
)
from ldmkit.config import to_dict
from ldmkit.nn import bf16_is_fast
from ldmkit.seeding import batch_indices, seed_everything  # noqa: F401 (batch_indices re-exported)
from ldmkit.train.distributed import all_reduce_mean, init_distributed, wrap_ddp  # noqa: F401 (re-exported)
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


class TrainingDiverged(RuntimeError):
    """A non-finite loss: the run stops and the last good checkpoint stays as it was."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: the run finished its current step, saved a checkpoint there and stopped."""


# ----------------------------------------------------------------------------- devices, seeds, precision

def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            return torch.device("cuda", local)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --set train.device=cpu")
    return dev


def autocast(device: torch.device, precision: str):
    """bf16 autocast where asked for and the hardware has bf16 arithmetic, otherwise a no-op (fp32).

    `precision="bf16"` means "bf16 where it is fast": on a CPU without native bf16 instructions (AVX512-BF16 or
    AMX) every bf16 kernel is emulated and a training step runs 10-20x slower than in fp32 (measured on an AVX2
    machine), so there the step runs in fp32 and the run's log says so (`effective_precision`).
    """
    if effective_precision(device, precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def effective_precision(device: torch.device, precision: str) -> str:
    """The precision `autocast(device, precision)` actually runs at."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown precision {precision!r}; use fp32 or bf16 (fp16 is very slow on CPU)")
    return "bf16" if precision == "bf16" and bf16_is_fast(device) else "fp32"


# ----------------------------------------------------------------------------- the run directory

class Run:
    """Files and bookkeeping of one training run in `out_dir` (not a trainer: the stage owns its loop)."""

    def __init__(self, out_dir: str | os.PathLike, cfg: Any, tc: TrainConfig, stage: str,
                 data: str | None = None, resume: bool = False, init_from: str | None = None,
                 progress: bool = True):
        self.dir, self.cfg, self.tc, self.stage = Path(out_dir), cfg, tc, stage
        self.resume, self.init_from = resume, init_from
        self.rank, self.world = init_distributed()
        self.is_main = self.rank == 0
        self.device = resolve_device(tc.device)
        if tc.threads > 0:
            torch.set_num_threads(tc.threads)
        self._progress = progress and self.is_main
        if self.is_main:
            lock_run_dir(self.dir)  # a second writer is refused, naming this process
            remove_orphaned_temporaries(self.dir)
        self._check_dir()
        self.info = {"stage": stage, "data": data, "precision": effective_precision(self.device, tc.precision),
                     **provenance()}
        if self.is_main and self.info["precision"] != tc.precision:
            print(f"[{stage}] train.precision={tc.precision} but this {self.device.type} has no native bf16 "
                  "arithmetic: training in fp32 (emulated bf16 is 10-20x slower)", file=sys.stderr)
        if self.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_json(self.dir / "config.json", {"stage": stage, "data": data, **to_dict(cfg)})
        self._acc: dict[str, list[float]] = {}
        self._t_last = time.perf_counter()
        self._step_last = None
        self._t0 = time.perf_counter()
        self._bar = None
        self._tb = None
        self.stopped_early = False
        self._t_trained = None  # when the step loop ended: train_seconds (wall_seconds adds the final metrics)
        seed_everything(tc.seed)

    def _check_dir(self) -> None:
        state = self.dir / "state.pt"
        if self.resume:
            if not state.exists():
                raise FileNotFoundError(f"--resume given but {state} does not exist; drop --resume to start fresh")
            saved = read_json(self.dir / "config.json")
            now = {"stage": self.stage, **to_dict(self.cfg)}
            diff = [k for k in now if k != "data" and saved.get(k) != now[k]]
            if diff:
                raise ValueError(f"--resume: the config differs from {self.dir / 'config.json'} in {diff}; "
                                 "resume with the same preset and --set overrides, or use --init-from")
        elif state.exists():
            raise FileExistsError(f"{self.dir} already holds a run (state.pt); pass --resume to continue it "
                                  "or choose another --out")
        elif (self.dir / "metrics.json").exists():
            raise FileExistsError(f"{self.dir} holds a finished {self.stage} run (metrics.json); choose another "
                                  "--out, or pass --overwrite to replace it")

    # -- restore / save
    def restore(self, modules: Mapping[str, nn.Module], optimizers: Mapping[str, torch.optim.Optimizer]) -> int:
        """Load resume state (returns the step to continue from) or `--init-from` weights (returns 0)."""
        self._modules, self._optimizers = modules, optimizers  # saved as they are if a signal stops the run
        if self.resume:
            st = load_state(self.dir / "state.pt")
            for name, m in modules.items():
                unwrap(m).load_state_dict(st["modules"][name])
            for name, o in optimizers.items():
                o.load_state_dict(st["optimizers"][name])
                match_param_layout(o)
            torch.set_rng_state(st["rng"]["torch"])
            random.setstate(_to_tuple(st["rng"]["python"]))
            self._append_log_trim(st["step"])
            self._acc = {k: list(v) for k, v in st.get("log_acc", {}).items()}  # the log interval in progress
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
            "rng": {"torch": torch.get_rng_state(), "python": _to_list(random.getstate())},
            "log_acc": {k: [float(x) for x in v] for k, v in self._acc.items()},
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
        if self._bar is not None:
            self._bar.close()
        return summary

    # -- loop helpers
    @property
    def total(self) -> int:
        """Steps this run takes: the preset's fixed count (a --minutes budget may stop it earlier)."""
        return self.tc.steps

    def steps(self, start: int, total: int) -> Iterator[int]:
        """Step indices start..total-1 with a progress bar. With an opt-in `max_minutes` budget the loop ends
        before a step (as long as the last one) would finish past it; the stage then saves as usual."""
        budget = self.tc.max_minutes * 60
        self._bar = tqdm(total=total, initial=start, desc=self.stage,
                         disable=not self._progress, dynamic_ncols=True, file=sys.stderr)
        self._step_last = start
        t_prev = None  # when the previous step started: its length is the guess for the next one
        with self._signals_stop_cleanly():
            for step in range(start, total):
                now = time.perf_counter()
                last, t_prev = (now - t_prev if t_prev is not None else 0.0), now
                if budget and now - self._t0 + last > budget:  # the next step would end past the budget
                    self.stopped_early = True
                    self.print(f"time budget of {self.tc.max_minutes} min spent at step {step}; saving and stopping")
                    break
                yield step
                self._bar.update(1)
                if self._signal is not None:
                    self._save_and_stop(step + 1)
        self._t_trained = time.perf_counter()

    @contextmanager
    def _signals_stop_cleanly(self):
        """SIGINT and SIGTERM let the current step finish, then save a checkpoint and stop (main thread only)."""
        self._signal = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def note(signum, frame):
            self._signal = signum
        old = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _save_and_stop(self, step: int) -> None:
        modules = getattr(self, "_modules", {})
        export = modules.get("ema", modules.get("model"))
        if export is not None:
            self.save(step, modules, self._optimizers, unwrap(export).state_dict())
        name = signal.Signals(self._signal).name
        self.print(f"{name}: checkpoint saved at step {step} in {self.dir}; continue with --resume")
        raise TrainingInterrupted(f"{self.stage} stopped by {name} after step {step}; the checkpoint in {self.dir} "
                                  "resumes it exactly (rerun with --resume)")

    def log(self, step: int, **scalars: float) -> None:
        """Record scalars for `step`; a non-finite loss stops the run; one line per `log_every` steps."""
        for k, v in scalars.items():
            v = float(v)
            if not math.isfinite(v):
                raise TrainingDiverged(f"{k} is {v} at step {step} of {self.stage}; stopping. The last good "
                                       f"checkpoint in {self.dir} is intact (resume with --resume); lower "
                                       "train.lr, keep train.grad_clip on, or try train.precision=fp32")
            self._acc.setdefault(k, []).append(v)
        if (step + 1) % self.tc.log_every == 0 or step + 1 == self.total:
            self._flush(step)

    def _flush(self, step: int) -> None:
        means = all_reduce_mean({k: sum(v) / len(v) for k, v in self._acc.items()})
        self._acc.clear()
        now = time.perf_counter()
        n = max(1, step + 1 - (self._step_last or 0))
        ms = 1000 * (now - self._t_last) / n
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
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in list(means.items())[:3]})
        if self.tc.tensorboard:
            self._tb_log(step + 1, means)

    def _tb_log(self, step: int, means: dict[str, float]) -> None:
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("train.tensorboard=true needs `pip install tensorboard`") from None
            self._tb = SummaryWriter(str(self.dir / "tb"))
        for k, v in means.items():
            self._tb.add_scalar(f"{self.stage}/{k}", v, step)

    def _append_log_trim(self, step: int) -> None:
        """On resume, drop log rows past the checkpoint so metrics.jsonl reads like one uninterrupted run."""
        path = self.dir / "metrics.jsonl"
        if self.is_main and path.exists():
            rows = [r for r in map(_log_row, path.read_text(errors="replace").splitlines()) if r is not None]
            write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step).encode())

    def print(self, msg: str) -> None:
        if not self.is_main:
            return
        if self._bar is not None and self._progress:
            self._bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def should(self, every: int, step: int) -> bool:
        return every > 0 and (step + 1) % every == 0


def start_run(out_dir, cfg, tc: TrainConfig, stage: str, **kw) -> Run:
    return Run(out_dir, cfg, tc, stage, **kw)


def _log_row(line: str) -> dict | None:
    """A metrics.jsonl row, or None for a blank or cut-off line (a crash or a full disk mid-append)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None


def _to_list(x):
    return [_to_list(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (tuple, list)) else x


def _human(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"
