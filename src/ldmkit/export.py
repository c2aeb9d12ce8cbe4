"""`ldmkit export PIPELINE --out DIR`: a pipeline for sharing, as the bundled ones in `pretrained/` are made.

Each stage keeps what sampling, evaluation and the demo report read (config.json, model.safetensors,
metrics.json, metrics.jsonl, tokenizer.json, the LPIPS feature net) and drops training state (state.pt, optimizer
moments, image grids). `--dtype bf16` stores floating-point weights in bfloat16 (half the size; they are cast back
to float32 at load). New weights mean new hashes: every hash that named an old file (pipeline.json, each stage's
record of the stage it was made from) is rewritten to the new file's, and paths into the source pipeline become
paths relative to the exported one. Nothing is written to DIR until every stage converts.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from ldmkit.checkpoint import file_hash, load_safetensors, read_json, save_safetensors, write_json
from ldmkit.stages import stage_entry

KEEP = ("config.json", "metrics.json", "metrics.jsonl", "tokenizer.json", "eval.json")  # copied as they are
WEIGHTS = ("model.safetensors", "lpips_featnet.safetensors")  # converted to --dtype
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def convert(src: Path, dst: Path, dtype: torch.dtype) -> None:
    """Copy a safetensors file with its floating-point tensors cast to `dtype` (integer buffers and the file's
    metadata stay as they are)."""
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_safetensors(src).items()}
    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata() or {}
    save_safetensors(state, dst, metadata)


def _rewrite(obj, hashes: dict[str, str], src: str):
    """`obj` with every old hash replaced by its new one and every path into `src` made relative to it."""
    if isinstance(obj, dict):
        return {k: _rewrite(v, hashes, src) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rewrite(v, hashes, src) for v in obj]
    if isinstance(obj, str):
        if obj in hashes:
            return hashes[obj]
        if obj == src or obj.startswith(src + "/"):
            return obj[len(src):].lstrip("/") or "."
    return obj


def export(src: str | Path, out: str | Path, dtype: str = "bf16", overwrite: bool = False) -> dict:
    src, out = Path(src), Path(out)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    spec = read_json(src / "pipeline.json")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; choose another --out or pass --overwrite")
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out.parent if out.parent.exists() else None) as tmp:
        tmp = Path(tmp)
        hashes = {}
        for name, entry in spec["stages"].items():
            s, d = src / entry["path"], tmp / name
            d.mkdir(parents=True)
            for f in WEIGHTS:
                if (s / f).exists():
                    convert(s / f, d / f, DTYPES[dtype])
            hashes[entry["sha256"]] = file_hash(d / "model.safetensors")
        prefixes = {str(src), str(src.resolve())}
        for name, entry in spec["stages"].items():
            for f in KEEP:
                p = src / entry["path"] / f
                if not p.exists():
                    continue
                if f.endswith(".json") and f != "tokenizer.json":
                    obj = read_json(p)
                    for prefix in prefixes:
                        obj = _rewrite(obj, hashes, prefix)
                    write_json(tmp / name / f, obj)
                else:
                    shutil.copyfile(p, tmp / name / f)
        new = _rewrite(spec, hashes, str(src))
        new["stages"] = {name: stage_entry(tmp, name) for name in spec["stages"]}
        new["weights_dtype"] = dtype
        write_json(tmp / "pipeline.json", new)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(tmp, out)
    return new


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="ldmkit export", description=__doc__.splitlines()[0])
    p.add_argument("pipeline", help="pipeline directory (written by `ldmkit train pipeline`)")
    p.add_argument("--out", required=True, help="directory to write (must be empty or absent)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="storage type of the weights")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)
    spec = export(args.pipeline, args.out, args.dtype, args.overwrite)
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(f"exported {len(spec['stages'])} stages ({args.dtype}, {size / 1e6:.1f} MB) to {args.out}", file=sys.stderr)
    return 0
