"""`ldmkit serve [PIPELINE ...]`: a local web UI over the bundled pipelines and any pipeline directories given.

Three tabs: **Text to image** (prompt, negative prompt, CFG scale with rescale / interval / APG, classifier
guidance, sampler, steps, seed, count, fast decoder / guidance-distilled / one-step), **Edit** (SDEdit strength,
inpainting where a mask is drawn) and **Look inside** (an image's reconstruction and latent channels, latent
interpolation between two images, the CLIP tower's closest captions). Images are downloadable as PNG and npz.
This module is the request model and the command (limits, pipelines, form fields -> `ldmkit sample` arguments);
`ldmkit.webui` is the page and its handlers.

Every request goes through `ldmkit sample`'s own argument parser, checks and sampling call (`sample.parse_args`,
`sample.generate`), so the same settings give the same pixels as the CLI. The server is private by default: bound
to 127.0.0.1, Gradio's analytics off, no font, script or other asset fetched from outside. It is bounded: steps,
images per request, prompt length and upload size have limits stricter than the CLI's (each exceeded limit is a
message in the page), one job samples at a time and at most `--queue` wait; later requests are refused with a
"queue is full" message instead of piling up.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# before gradio is imported: no usage statistics, no hub calls, nothing fetched at start
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

LOOPBACK = ("127.0.0.1", "localhost", "::1")
VARIANTS = {"full denoiser": [], "fast decoder": ["--decoder", "fast"], "guidance-distilled": ["--distilled"],
            "one-step student": ["--one-step"]}

@dataclass(frozen=True)
class Limits:
    """What one request may ask for (the CLI allows more: 1000 steps, 10,000 images)."""
    max_steps: int = 100
    max_images: int = 16
    max_prompt_chars: int = 300
    max_upload_mb: float = 5.0
    max_frames: int = 10
    queue: int = 32  # requests waiting beyond the one that samples; more are refused

    def check(self, *, prompts=(), steps=None, num=None, frames=None) -> None:
        """ValueError naming the first exceeded limit and the value to use."""
        for p in prompts:
            if p is not None and len(p) > self.max_prompt_chars:
                raise ValueError(f"the prompt is {len(p)} characters long; this server takes at most "
                                 f"{self.max_prompt_chars} (shorten it)")
        if steps is not None and not 1 <= steps <= self.max_steps:
            raise ValueError(f"steps {steps:g} is outside 1..{self.max_steps}, this server's limit "
                             "(the CLI, `ldmkit sample --steps`, takes up to 1000)")
        if num is not None and not 1 <= num <= self.max_images:
            raise ValueError(f"number of images {num:g} is outside 1..{self.max_images}, this server's limit per "
                             "request (the CLI, `ldmkit sample --num`, takes more)")
        if frames is not None and not 2 <= frames <= self.max_frames:
            raise ValueError(f"frames {frames:g} is outside 2..{self.max_frames}")


class Pipelines:
    """Pipeline directories by name, each loaded on first use and kept (with its CLIP and test images)."""

    def __init__(self, paths: dict[str, Path]):
        self.paths = paths
        self._loaded: dict[str, object] = {}
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self.paths)

    def get(self, name: str):
        from ldmkit.pipeline import Pipeline  # local: the CLI's --help stays free of torch
        if name not in self.paths:
            raise ValueError(f"no pipeline {name!r} on this server; choose one of {', '.join(self.paths)}")
        with self._lock:
            if name not in self._loaded:
                self._loaded[name] = Pipeline.load(self.paths[name])
            return self._loaded[name]

    def spec(self, name: str) -> dict:
        from ldmkit.checkpoint import read_json
        return read_json(self.paths[name] / "pipeline.json")

    @functools.lru_cache(maxsize=8)  # noqa: B019 (one instance per server)
    def clip(self, name: str):
        from ldmkit.stages import load_clip
        return load_clip(self.paths[name] / self.spec(name)["stages"]["clip"]["path"])

    @functools.lru_cache(maxsize=8)  # noqa: B019
    def test_split(self, name: str):
        """The test split of the pipeline's data, loaded as its stages were (None if the data is not here)."""
        from ldmkit.data import load_split
        spec = self.spec(name)
        try:
            return load_split(spec["data"], "test", spec.get("data_options"))
        except (OSError, ValueError):
            return None


def resolve_pipelines(names: list[str]) -> dict[str, Path]:
    """Named or given pipeline directories (none: every bundled pipeline) -> {display name: directory}."""
    from ldmkit.stages import find_pipeline
    if not names:
        root = Path(__file__).resolve().parents[2] / "pretrained"
        names = sorted(p.name for p in root.iterdir() if (p / "pipeline.json").is_file()) if root.is_dir() else []
        if not names:
            raise FileNotFoundError("no bundled pipelines found (pretrained/*/pipeline.json); pass a pipeline "
                                    "directory: `ldmkit serve runs/my-pipeline`")
    out: dict[str, Path] = {}
    for n in names:
        path = find_pipeline(n)
        key = path.name if path.name not in out else str(path)
        out[key] = path
    return out


# ---------------------------------------------------------------------------------------------- requests
def form_number(value, name: str, integer: bool = True):
    """A number from a form field (None stays None); a non-finite or fractional one is refused by name."""
    if value is None or value == "":
        return None
    v = float(value)
    if not np.isfinite(v):
        raise ValueError(f"{name} {value} must be a finite number")
    if integer:
        if v != int(v):
            raise ValueError(f"{name} {value} must be a whole number")
        return int(v)
    return v


def sample_argv(pipe_dir: Path, out: Path, *, prompt: str, negative: str, guidance, rescale, interval: str,
                mode: str, classifier_scale, class_label, sampler: str, steps, seed, num, variant: str,
                extra: list[str] = ()) -> list[str]:
    """The `ldmkit sample` command line of a form's settings (empty fields: the pipeline's defaults)."""
    argv = [str(pipe_dir), "--prompt", prompt or "", "--num", str(num), "--seed", str(seed), "--out", str(out),
            "--no-progress", "--guidance-mode", mode]
    opt = {"--guidance": guidance, "--guidance-rescale": rescale, "--classifier-scale": classifier_scale or None,
           "--class-label": class_label, "--steps": steps}
    argv += [f"{k}={v}" for k, v in opt.items() if v is not None]
    if negative:
        argv += ["--negative-prompt", negative]
    if interval and interval.strip():
        argv += ["--guidance-interval", interval.strip()]
    if sampler and sampler != "pipeline default":
        argv += ["--sampler", sampler]
    if variant not in VARIANTS:
        raise ValueError(f"model {variant!r} is not one of {', '.join(VARIANTS)}")
    return argv + VARIANTS[variant] + list(extra)


def candidate_captions(spec: dict, test) -> list[str]:
    """Captions CLIP ranks for an image: every class's prompt, then up to 2,000 distinct test-split captions."""
    out = [f"a photo of a {c}" for c in class_names(spec)]
    if test is not None:
        seen = set(out)
        for i in range(min(len(test), 2000)):
            c = test.caption(i)
            if c not in seen:
                seen.add(c)
                out.append(c)
    return out


FROM_PROMPT = "the one the prompt names"


def class_names(spec: dict) -> list[str]:
    if spec.get("classes"):
        return list(spec["classes"])
    if spec.get("data") == "fashion-mnist":
        from ldmkit.data.captions import FASHION_CLASSES
        return list(FASHION_CLASSES)
    return []


def class_choices(spec: dict) -> list[str]:
    return [FROM_PROMPT, *class_names(spec)]


def class_index(spec: dict, choice: str | None) -> int | None:
    if not choice or choice == FROM_PROMPT:
        return None
    names = class_names(spec)
    if choice not in names:
        raise ValueError(f"class {choice!r} is not one of this pipeline's classes ({', '.join(names) or 'none'})")
    return names.index(choice)


def cli_tail(argv: list[str]) -> str:
    """The argument part of an `ldmkit sample` command line, quoted for a shell, without the internal options."""
    import shlex
    skip = {"--no-progress"}
    out, i = [], 1
    while i < len(argv):
        a = argv[i]
        if a == "--out":
            out += ["--out", "samples.npz"]
            i += 2
            continue
        if a not in skip and not (a == "--guidance-mode" and argv[i + 1] == "cfg"):
            out.append(a)
        elif a == "--guidance-mode":
            i += 1
        i += 1
    return " ".join(shlex.quote(a) for a in out)


def example_prompt(spec: dict) -> str:
    classes = spec.get("classes")
    if spec.get("data") == "fashion-mnist":
        return "a photo of a sneaker"
    if classes:
        return f"a photo of a {classes[0]}"
    if spec.get("data") == "shapes" or "shapes" in str(spec.get("data")):
        return "a large red star in the top left"
    return ""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="ldmkit serve", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("pipelines", nargs="*", help="pipeline directories or bundled names (default: every bundled one)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback exposes the UI "
                   "(and your CPU) to the network")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-steps", type=int, default=Limits.max_steps)
    p.add_argument("--max-images", type=int, default=Limits.max_images, help="images per request")
    p.add_argument("--max-upload-mb", type=float, default=Limits.max_upload_mb)
    p.add_argument("--queue", type=int, default=Limits.queue, help="requests that may wait; more are refused")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} must lie in 1..65535")
    for opt, v, hi in (("--max-steps", args.max_steps, 1000), ("--max-images", args.max_images, 256),
                       ("--queue", args.queue, 10000)):
        if not 1 <= v <= hi:
            raise ValueError(f"{opt} {v} must lie in 1..{hi}")
    if not 0 < args.max_upload_mb <= 100:
        raise ValueError(f"--max-upload-mb {args.max_upload_mb} must lie in (0, 100]")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError("the web UI needs Gradio: pip install 'ldmkit[serve]' (or scripts/setup.sh test)") from None
    limits = Limits(max_steps=args.max_steps, max_images=args.max_images, max_upload_mb=args.max_upload_mb,
                    queue=args.queue)
    pipes = Pipelines(resolve_pipelines(args.pipelines))
    if args.host not in LOOPBACK:
        print(f"ldmkit serve: warning: bound to {args.host}: anyone who can reach this address can use the UI",
              file=sys.stderr)
    from ldmkit.webui import CSS, build_app, theme
    with tempfile.TemporaryDirectory(prefix="ldmkit-serve-") as work:
        demo = build_app(pipes, limits, Path(work))
        print(f"ldmkit serve: {', '.join(pipes.names)} on http://{args.host}:{args.port} (Ctrl-C stops)",
              file=sys.stderr, flush=True)
        demo.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False, show_error=True,
                    max_file_size=int(args.max_upload_mb * 1024 * 1024), theme=theme(), css=CSS, ssr_mode=False,
                    quiet=True, footer_links=[], allowed_paths=[work])
    return 0


@contextlib.contextmanager
def background_server(argv: list[str], cwd: str | Path | None = None, timeout: float = 120):
    """`ldmkit serve ARGV` on a free loopback port in a subprocess, yielding (url, process) once the page answers;
    stopped on exit (benchmarks, screenshots and tests start the server this way)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "ldmkit", "serve", *argv, "--port", str(port)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ldmkit serve exited with code {proc.returncode}: {proc.stdout.read()[-2000:]}")
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"ldmkit serve did not answer on {url} within {timeout:.0f} s") from None
                time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

