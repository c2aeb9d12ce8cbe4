"""`ldmkit experiment NAME|all`: the lecture's claims, measured on this machine.

Each experiment is a module with NAME, TITLE, CLAIM, `run(ctx) -> dict` (built with `common.result`) and
`section(result) -> str` (its part of docs/experiments.md). `ldmkit experiment NAME` runs one and rewrites the page
from every result present; `all` runs them in order, skipping those already done (`--force` reruns them). An
interrupted experiment continues where it stopped: its trained stages resume and its finished parts are read back.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
from pathlib import Path

from ldmkit.checkpoint import read_json, write_bytes, write_json

ORDER = ("clip-space", "pixel-vs-latent", "ae-vs-vae", "blur", "guidance", "classifier-vs-free", "paradigms")
MODULES = {name: f"ldmkit.experiments.{name.replace('-', '_')}" for name in ORDER}
PAGE_INTRO = """# The lecture's claims, measured

Each section is one claim of the lecture (`docs/lecture.md`), the experiment that tests it on Fashion-MNIST with
this project's own stages, its figures and numbers, and whether the claim held here. Every section names the
command that made it (`ldmkit experiment NAME`, within 20 minutes on 2 CPU cores; `ldmkit experiment all` remakes
the page) and the machine. The numbers are in `docs/experiments/NAME.json`.
"""


def module(name: str):
    if name not in MODULES:
        raise ValueError(f"unknown experiment {name!r}; choose one of: {', '.join(ORDER)}, all")
    return importlib.import_module(MODULES[name])


def render_page(out: Path, page: Path) -> str:
    """docs/experiments.md from every NAME.json in `out`, in the order of ORDER."""
    parts, index = [PAGE_INTRO], []
    for name in ORDER:
        path = out / f"{name}.json"
        if not path.exists():
            continue
        res, mod = read_json(path), module(name)
        rel = out.relative_to(page.parent) if out.is_relative_to(page.parent) else out
        m = res["machine"]
        index.append(f"| [{name}](#{name}) | {mod.CLAIM} | {res['verdict']} |")
        parts.append(f'<a id="{name}"></a>\n## {name}: {mod.TITLE}\n\n**Claim.** {mod.CLAIM}\n\n'
                     f"**Verdict.** {res['verdict']}\n\n{mod.section(res, rel).strip()}\n\n"
                     f"`{res['command']}`: {res['minutes']} min on {m['cpu']} ({m['cores']} cores, torch "
                     f"{m['torch']}, load average {m['load_average']} at the end)"
                     + (" -- quick mode (tiny budgets), not a measurement" if res.get("quick") else "") + ".\n")
    if index:
        parts.insert(1, "| experiment | claim | verdict |\n| --- | --- | --- |\n" + "\n".join(index) + "\n")
    text = "\n".join(parts)
    write_bytes(page, text.encode())
    return text


def run_one(name: str, args) -> dict:
    from ldmkit.experiments.common import Context
    ctx = Context(name=name, out=Path(args.out), work=Path(args.work) / name, pipeline=Path(args.pipeline),
                  quick=args.quick, data_dir=args.data_dir, progress=not args.no_progress)
    res = module(name).run(ctx)
    write_json(ctx.out / f"{name}.json", res)
    ctx.log(f"done in {res['minutes']} min: {res['verdict']}")
    return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="ldmkit experiment", description=__doc__.splitlines()[0])
    p.add_argument("name", help=f"one of: {', '.join(ORDER)}, all")
    p.add_argument("--pipeline", default="pretrained/fashion-mnist", help="the Fashion-MNIST pipeline it builds on")
    p.add_argument("--out", default="docs/experiments", help="figures and NAME.json")
    p.add_argument("--page", default="docs/experiments.md", help="the page rewritten from every result in --out")
    p.add_argument("--work", default="runs/experiments", help="trained stages and intermediate results")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST idx files")
    p.add_argument("--quick", action="store_true", help="tiny budgets (seconds): checks the code path, "
                   "measures nothing")
    p.add_argument("--force", action="store_true", help="with all: rerun experiments that already have a result")
    p.add_argument("--restart", action="store_true", help="forget the work folder's trained stages and results first")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = list(ORDER) if args.name == "all" else [args.name]
    for name in names:
        module(name)  # an unknown name fails before anything runs
    if not (Path(args.pipeline) / "pipeline.json").exists():
        raise FileNotFoundError(f"--pipeline {args.pipeline} has no pipeline.json; the experiments build on the "
                                "bundled Fashion-MNIST pipeline (pretrained/fashion-mnist, run from the repository's "
                                "root)")
    for name in names:
        if args.restart:
            shutil.rmtree(Path(args.work) / name, ignore_errors=True)
        if args.name == "all" and not args.force and (Path(args.out) / f"{name}.json").exists():
            print(f"[{name}] already done ({Path(args.out) / f'{name}.json'}); --force reruns it", file=sys.stderr)
            continue
        run_one(name, args)
        render_page(Path(args.out), Path(args.page))
    render_page(Path(args.out), Path(args.page))
    print(f"wrote {args.page}", file=sys.stderr)
    return 0
