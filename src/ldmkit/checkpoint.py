"""Atomic files, safetensors weights, resume state and provenance for stage directories.

A stage directory holds `config.json` (the resolved config), `model.safetensors` (EMA weights where there is EMA),
`metrics.json` (summary), `metrics.jsonl` (the log) and `state.pt` (optimizer, step, RNG: plain containers of
tensors, loadable with `torch.load(weights_only=True)`). Every write goes to a temporary file in the same folder,
is fsynced, then renamed over the target, so an interrupted write leaves the previous file intact.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors.torch import load_file, save

import ldmkit


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        raise OSError(e.errno, f"could not write {path}: {e.strerror}; the previous file (if any) is unchanged: "
                               "free some space or write elsewhere") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """`path` if it is a regular file (a link to one is fine); a FIFO, device or folder would hang or mislead a
    reader, so it is refused with its name."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} not found")
    if not path.is_file():
        raise ValueError(f"{what} {path} is not a regular file (a folder, FIFO or device); restore the file")
    return path


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is this a stage directory written by `ldmkit train`?")
    regular_file(path, "JSON file")
    try:
        return json.loads(path.read_text())
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; restore it or retrain the stage") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore it or retrain the stage") from None


def save_safetensors(state_dict: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    write_bytes(path, canonical_safetensors(save(tensors, metadata=metadata)))


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header written in sorted key order: the library writes its
    metadata in an arbitrary order, so equal weights could otherwise hash differently. Tensor offsets are relative
    to the data section, so only the header changes (space-padded to 8 bytes, as the format asks)."""
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + n:]


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    path = regular_file(path, "weights file")
    try:
        return load_file(str(path), device=device)
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a readable safetensors file ({e}); re-export or retrain it") from None


def save_state(obj: dict, path: str | os.PathLike) -> None:
    """Save resume state (plain dicts/lists/tensors/numbers only) atomically."""
    try:
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
    except RuntimeError as e:  # torch's writer reports a full disk as "unexpected pos ..."
        free = shutil.disk_usage(Path(path).parent).free
        raise OSError(f"could not write {path} ({str(e).splitlines()[0][:120]}); {free / 1e6:.1f} MB free on that "
                      "disk, the previous checkpoint is intact: free some space and rerun with --resume") from None


def load_state(path: str | os.PathLike, expect: Iterable[str] = ()) -> dict:
    """Load resume state with `weights_only=True`: no arbitrary objects are ever unpickled. `expect`: module names
    a training run's checkpoint must hold (with its step, optimizers and RNG state)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: nothing to resume (drop --resume to start fresh)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()[0][:200]  # without terminal colours
        raise ValueError(f"{path} could not be loaded as plain resume state ({why}); "
                         "it is damaged or not ldmkit's: restore it or start fresh without --resume") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not resume state; restore it or start fresh")
    expect = list(expect)
    if expect:
        missing = [k for k in ("step", "modules", "optimizers", "rng") if k not in state]
        missing += [f"modules.{n}" for n in expect if n not in state.get("modules", {})]
        if missing:
            raise ValueError(f"{path} is not a checkpoint of this run (no {missing}); restore it, or start fresh "
                             "without --resume")
    return state


def file_hash(path: str | os.PathLike, n: int = 16) -> str:
    """sha256 of a file's bytes, first `n` hex digits."""
    regular_file(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(**extra: Any) -> dict:
    """Who made a file: ldmkit version, git commit, torch version, plus anything given (data, seed...)."""
    return {"ldmkit": ldmkit.__version__, "git_commit": git_commit(), "torch": torch.__version__, **extra}


# ----------------------------------------------------------------------------- run directories
LOCK_FILE = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def lock_run_dir(path: str | os.PathLike) -> None:
    """Claim `path` for this process: DIR/.lock holds the writer's PID. Another live process's lock is refused with
    its PID named; a lock left by a dead process (a kill) is taken over. The same process may claim it again."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lock = path / LOCK_FILE
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid == os.getpid():
                return
            if pid and _pid_alive(pid):
                raise FileExistsError(f"{path} is being written by another training run (PID {pid}); wait for it "
                                      "to finish or choose another --out") from None
            lock.unlink(missing_ok=True)  # stale: its writer is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        return
    raise FileExistsError(f"could not claim {lock}; remove it if no training run is writing to {path}")


def unlock_run_dir(path: str | os.PathLike) -> None:
    """Release this process's claim on `path` (a no-op when another process holds it)."""
    lock = Path(path) / LOCK_FILE
    try:
        if int(lock.read_text().strip() or 0) == os.getpid():
            lock.unlink()
    except (OSError, ValueError):
        pass


def remove_orphaned_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files an interrupted atomic write left in `path` (call while holding its lock)."""
    gone = [p for p in Path(path).glob(".*.tmp") if p.is_file()]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def check_run_dir(path: Path, config: dict, resume: bool) -> None:
    """A fresh run needs a folder without a run in it; `--resume` needs a checkpoint and the same config."""
    state, stage = path / "state.pt", config["stage"]
    if resume:
        if not state.exists():
            raise FileNotFoundError(f"--resume given but {state} does not exist; drop --resume to start fresh")
        saved = read_json(path / "config.json")
        diff = changed_keys({k: v for k, v in saved.items() if k not in ("data", "data_options")},
                            {k: v for k, v in config.items() if k not in ("data", "data_options")})
        if diff:
            raise ValueError(f"--resume: the config differs from {path / 'config.json'} in {diff}; "
                             "resume with the same preset and --set overrides, or use --init-from")
    elif state.exists():
        raise FileExistsError(f"{path} already holds a run (state.pt); pass --resume to continue it "
                              "or choose another --out")
    elif (path / "metrics.json").exists():
        raise FileExistsError(f"{path} holds a finished {stage} run (metrics.json); choose another "
                              "--out, or pass --overwrite to replace it")


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two nested configs differ (train.lr, model.widths, ...)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [k for key in sorted(set(old) | set(new), key=str)
                for k in changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]
