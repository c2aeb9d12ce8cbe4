"""`ldmkit sample PIPELINE --prompt P [--prompt P2 ...] --num N --out samples.npz|grid.png`.

`--num` is images per prompt; rows go prompt by prompt. The npz holds `images` (uint8 N x H x W x C at the
dataset's native size), `prompts` (numpy unicode), `labels` (int64: the class a prompt names, else -1) and the
scalars `guidance`, `sampler`, `steps`, `seed` and `guidance_rescale` (the phi used). Image i is seeded from
(seed, i): the same command writes the same file, and an image does not change with `--num` or `--batch-size`. An
empty prompt means unconditional. `--init-image FILE --strength S` edits an image (SDEdit) and `--mask FILE`
inpaints it where the mask is white; the npz then also records `edit` and `strength`. Every finished batch is
kept in `.NAME.parts/` beside `--out` until the run ends, so a run stopped in any way (Ctrl-C, SIGTERM, SIGKILL)
continues where it stopped when the same command runs again; Ctrl-C or SIGTERM also write the finished images to
`--out` with `complete=False`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import shutil
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ldmkit.checkpoint import file_hash, regular_file, write_bytes
from ldmkit.data import parse_class
from ldmkit.data.folder import read_image
from ldmkit.diffusion.samplers import SAMPLERS
from ldmkit.guidance.cfg import APG_DEFAULTS, MODES, APGConfig, Guidance
from ldmkit.images import grid, save_png
from ldmkit.pipeline import Pipeline


def parse_interval(text: str | None):
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
        return lo, hi
    except ValueError:
        raise argparse.ArgumentTypeError(f"--guidance-interval {text!r}: give LO,HI in sigma, e.g. 0.3,5") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="ldmkit sample", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("pipeline", help="pipeline directory (pipeline.json + stage directories)")
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable); '' = unconditional")
    p.add_argument("--image-prompt", metavar="FILE", help="variations of this image (with --prompt: both mixed)")
    p.add_argument("--image-guidance", type=float, metavar="W", help="the image's scale; default: --guidance")
    p.add_argument("--num", type=int, default=1, help="images per prompt (up to 10000)")
    p.add_argument("--out", required=True, help="samples.npz (arrays) or grid.png (a grid)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale w (1 = conditional, 0 = "
                   "unconditional); default: the pipeline's")
    p.add_argument("--sampler", default=None, choices=sorted(SAMPLERS), help="default: the pipeline's")
    p.add_argument("--steps", type=int, default=None, help="sampling steps; default: the pipeline's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=16, help="rows per network call: 64 is faster for many "
                   "images, 16 for a few; images do not change with --num or --batch-size at a given --micro-batch")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: denoiser and decoder "
                   "under bf16 autocast where the CPU/GPU has bf16 arithmetic (faster; images differ slightly)")
    p.add_argument("--decoder", choices=["full", "fast"], default="full", help="fast: the pipeline's fast "
                   "decoder (`ldmkit train fast-decoder`), several times cheaper per image, slightly less sharp")
    p.add_argument("--distilled", action="store_true", help="sample with the pipeline's guidance-distilled "
                   "denoiser (`ldmkit train distill`): one network call per step, guidance fixed at its w and phi")
    p.add_argument("--one-step", action="store_true", help="the distilled denoiser's one-step student (`ldmkit "
                   "train distill --set one_step_from=N`): one network call per image; --steps defaults to 1")
    p.add_argument("--negative-prompt", default=None, help="replaces the unconditional prediction")
    p.add_argument("--classifier-scale", type=float, default=0.0, help="classifier guidance strength s")
    p.add_argument("--class-label", type=int, default=None, help="class for classifier guidance (needed with '')")
    p.add_argument("--guidance-interval", type=parse_interval, default=None, metavar="LO,HI",
                   help="guide only for sigma in (LO, HI]")
    p.add_argument("--guidance-rescale", type=float, default=None, metavar="PHI", help="guidance rescale phi "
                   "(0 = plain CFG); default: the pipeline's")
    p.add_argument("--guidance-mode", choices=MODES, default="cfg", help="autoguidance: by the pipeline's guide/")
    p.add_argument("--guide-mix", type=float, default=1.0, metavar="L", help="autoguidance: the guide's share of the "
                   "guiding branch, the rest unconditional (1 = autoguidance alone, 0 = CFG)")
    p.add_argument("--apg-eta", type=float, default=APG_DEFAULTS.eta, help="APG: weight of the update parallel to D_c")
    p.add_argument("--apg-momentum", type=float, default=APG_DEFAULTS.momentum, help="APG: momentum beta (negative)")
    p.add_argument("--apg-threshold", type=float, default=APG_DEFAULTS.norm_threshold,
                   help="APG: norm threshold r (0 = off)")
    p.add_argument("--init-image", default=None, metavar="FILE", help="edit this image instead of starting from "
                   "noise (SDEdit): it is resized and centre-cropped to the pipeline's size")
    p.add_argument("--strength", type=float, default=0.6, help="with --init-image: how much of the noise schedule "
                   "is rerun (0 keeps the image, 1 ignores it)")
    p.add_argument("--mask", default=None, metavar="FILE", help="with --init-image: inpaint where this grayscale "
                   "image is white (> 127); black pixels keep the input")
    p.add_argument("--no-progress", action="store_true")
    return p


def read_native(path: Path, pipe: Pipeline, channels: int | None = None) -> np.ndarray:
    """An image file resized and centre-cropped to the pipeline's size, cut to its native box: uint8 (h, w, C)."""
    _, _, h, w = pipe.crop_box
    img, _ = read_image(Path(path), max(h, w), channels or pipe.spec["image"]["channels"], (0, 0, 0))
    return img.transpose(1, 2, 0)[:h, :w]


def read_edit_inputs(args, pipe: Pipeline, rows: int) -> tuple[np.ndarray, np.ndarray | None]:
    """--init-image (and --mask) at the pipeline's native size, repeated for every output row."""
    img = read_native(args.init_image, pipe)
    mask = None
    if args.mask is not None:
        m = read_native(args.mask, pipe, channels=1)[..., 0]
        mask = np.repeat((m > 127).astype(np.float32)[None], rows, 0)
        if not mask.any():
            raise ValueError(f"--mask {args.mask} has no white pixel: nothing to inpaint (white = regenerate)")
    return np.repeat(img[None], rows, 0), mask


def labels_for(prompts: list[str], names: list[str] | None = None) -> np.ndarray:
    """The class each prompt names (-1: none); `names`: the pipeline's class names (None: Fashion-MNIST's)."""
    return np.array([(-1 if (y := parse_class(p, names)) is None else y) for p in prompts], dtype=np.int64)


def save_samples(path: str | Path, images: np.ndarray, prompts: list[str], labels: np.ndarray | None = None,
                 **scalars) -> None:
    """Write the npz contract (loadable with allow_pickle=False) or a PNG grid, atomically."""
    path = Path(path)
    if path.suffix == ".png":
        save_png(grid(images, scale=2), path)
        return
    if path.suffix != ".npz":
        raise ValueError(f"--out {path} must end in .npz (arrays) or .png (a grid)")
    buf = io.BytesIO()
    labels = labels_for(prompts) if labels is None else labels
    np.savez(buf, images=images, prompts=np.array(prompts, dtype=np.str_), labels=labels,
             **{k: np.array(v) for k, v in scalars.items()})
    write_bytes(path, buf.getvalue())


def check_args(args) -> None:
    """Every argument and the output path, before the pipeline is loaded or anything is sampled."""
    if args.prompt is None:
        if args.image_prompt is None:
            raise ValueError("give --prompt TEXT (repeatable), or --image-prompt FILE for variations of an image")
        args.prompt = [""]  # the image alone
    if args.image_prompt is not None:
        regular_file(args.image_prompt, "--image-prompt")
        if args.distilled or args.one_step:
            raise ValueError("the distilled students reproduce text guidance only; drop --distilled / --one-step")
    if not 1 <= args.num <= 10000:
        raise ValueError(f"--num {args.num} must lie in 1..10000")
    for text in [*args.prompt, *([args.negative_prompt] if args.negative_prompt is not None else [])]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"prompt {text.encode('utf-8', 'replace').decode()!r} is not valid UTF-8 text; "
                             "check the shell's encoding (LANG=C.UTF-8)") from None
    if args.batch_size < 1 or args.micro_batch < 1:
        raise ValueError(f"--batch-size {args.batch_size} and --micro-batch {args.micro_batch} must be >= 1")
    if args.steps is not None and not 1 <= args.steps <= 1000:
        raise ValueError(f"--steps {args.steps} must lie in 1..1000 (leave it out for the pipeline's default)")
    for name in ("guidance", "guidance_rescale", "classifier_scale", "apg_eta", "apg_momentum", "apg_threshold",
                 "image_guidance"):
        v = getattr(args, name)
        if v is not None and not math.isfinite(v):
            raise ValueError(f"--{name.replace('_', '-')} {v} must be a finite number")
    for name in ("guidance", "image_guidance"):
        v = getattr(args, name)
        if v is not None and not -20 <= v <= 50:
            raise ValueError(f"--{name.replace('_', '-')} {v} is outside -20..50 (1 = conditional, 0 = "
                             "unconditional; useful values lie around 1-8)")
    if args.init_image is None and args.mask is not None:
        raise ValueError("--mask needs --init-image (the image to inpaint)")
    if args.init_image is not None:
        regular_file(args.init_image, "--init-image")
        if args.mask is not None:
            regular_file(args.mask, "--mask")
        if not 0 < args.strength <= 1:
            raise ValueError(f"--strength {args.strength} must lie in (0, 1]")
        if args.distilled or args.one_step:
            raise ValueError("--init-image works with the full denoiser; drop --distilled / --one-step")
    if not -2**63 <= args.seed < 2**63:
        raise ValueError(f"--seed {args.seed} must fit in 64 bits (the npz stores it as int64)")
    out = Path(args.out)
    if out.suffix not in (".npz", ".png"):
        raise ValueError(f"--out {out} must end in .npz (arrays) or .png (a grid)")
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a directory; name a .npz or .png file")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"--out {out}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"--out {out}: folder {parent} is not writable")


def attach_negative_numbers(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`--guidance -1e9` -> `--guidance=-1e9`: argparse reads a value like -1e9 as an unknown option, so a number
    after a numeric option is attached to it (then range-checked like any other value)."""
    numeric = {s for a in parser._actions if a.type in (int, float) for s in a.option_strings}
    out = []
    for arg in argv:
        if out and out[-1] in numeric and arg.startswith("-"):
            try:
                float(arg)
            except ValueError:
                pass
            else:
                out[-1] = f"{out[-1]}={arg}"
                continue
        out.append(arg)
    return out


def settings_for(args, pipe: Pipeline) -> tuple[Guidance, dict, dict]:
    """The guidance, the `generate` keywords and the settings recorded in the npz, from parsed (and checked)
    arguments: the one place the CLI and the web UI turn options into a sampling call."""
    distilled = "onestep" if args.one_step else args.distilled
    g = pipe.guidance(args.guidance, rescale=args.guidance_rescale, distilled=bool(distilled),
                      mode=args.guidance_mode, interval=args.guidance_interval, negative_prompt=args.negative_prompt,
                      classifier_scale=args.classifier_scale, image_scale=args.image_guidance, guide_mix=args.guide_mix,
                      apg=APGConfig(args.apg_eta, args.apg_momentum, args.apg_threshold))
    sampler = args.sampler or pipe.defaults["sampler"]
    steps = args.steps or (1 if args.one_step else pipe.defaults["steps"])
    kw = dict(steps=steps, sampler=sampler, seed=args.seed, batch_size=args.batch_size, micro_batch=args.micro_batch,
              precision=args.precision, decoder=args.decoder, progress=not args.no_progress)
    settings = dict(guidance=g.scale, sampler=sampler, steps=int(steps), seed=int(args.seed),
                    guidance_rescale=g.rescale, decoder=args.decoder,
                    distilled="onestep" if args.one_step else ("guidance" if args.distilled else "none"),
                    **({"edit": "inpaint" if args.mask else "img2img", "strength": float(args.strength)}
                       if args.init_image else {}),
                    **({"image_prompt": Path(args.image_prompt).name,
                        "image_guidance": g.scale if g.image_scale is None else g.image_scale}
                       if args.image_prompt else {}))
    if args.image_prompt:
        kw["image_prompts"] = read_native(args.image_prompt, pipe)
    return g, kw, settings


def rows_and_labels(args, pipe: Pipeline) -> tuple[list[str], np.ndarray]:
    """The prompt of each output row (`--num` per prompt, in order) and the class it names or was guided toward."""
    rows = [p for p in args.prompt for _ in range(args.num)]
    labels = labels_for(rows, pipe.spec.get("classes"))
    if args.class_label is not None:
        labels[:] = args.class_label
    return rows, labels


def generate(args, pipe: Pipeline, on_batch=None, skip: int = 0) -> tuple[np.ndarray, list[str], np.ndarray, dict]:
    """(images, prompt of each row, class label of each row, settings) for parsed and checked arguments.
    `skip`: leading rows made before (text to image only): the images returned start after them."""
    g, kw, settings = settings_for(args, pipe)
    kw["skip"] = skip
    distilled = "onestep" if args.one_step else args.distilled
    rows, labels = rows_and_labels(args, pipe)
    if "image_prompts" in kw:  # one copy of the image prompt per row
        kw["image_prompts"] = np.repeat(kw["image_prompts"][None], len(rows), 0)
    if args.init_image is None:
        images = pipe(args.prompt, args.num, guidance=g, class_label=args.class_label, distilled=distilled,
                      on_batch=on_batch, **kw)
    else:
        if skip:
            raise ValueError("edits (--init-image) are not resumed; sample them again")
        del kw["skip"]
        init, mask = read_edit_inputs(args, pipe, len(rows))
        if g.classifier_scale:
            kw["class_labels"] = pipe.class_labels(rows, args.class_label)
        images = (pipe.img2img(init, rows, strength=args.strength, guidance=g, on_batch=on_batch, **kw)
                  if mask is None else pipe.inpaint(init, mask, rows, guidance=g, on_batch=on_batch, **kw))
    return images, rows, labels, settings


def parse_args(argv: list[str]):
    """Parsed and checked `ldmkit sample` arguments (ValueError / OSError on a bad value)."""
    parser = build_parser()
    args = parser.parse_args(attach_negative_numbers(list(argv), parser))
    check_args(args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    pipe = Pipeline.load(args.pipeline)
    out = Path(args.out)
    rows, labels = rows_and_labels(args, pipe)
    parts = FinishedBatches(out, run_fingerprint(args, pipe, rows))
    resumable = args.init_image is None  # edits are quick to redo and their input is not fingerprinted
    done: list[np.ndarray] = []  # finished batches, in order

    def finished(batch: np.ndarray) -> None:
        done.append(parts.save(batch, sum(len(b) for b in done)) if resumable else batch)
    try:
        with sigterm_as_interrupt(), output_lock(out):
            earlier = parts.load() if resumable else []
            done.extend(earlier)
            skip = sum(len(b) for b in done)
            if skip:
                print(f"continuing: {skip} of {len(rows)} images were made by an earlier, interrupted run "
                      f"({parts.dir})", file=sys.stderr)
            new, _, _, settings = generate(args, pipe, on_batch=finished, skip=skip)
    except KeyboardInterrupt:
        if not done:
            raise KeyboardInterrupt("interrupted before the first batch finished; nothing written") from None
        n = sum(len(b) for b in done)
        save_samples(args.out, np.concatenate(done), rows[:n], labels[:n], complete=False,
                     **settings_for(args, pipe)[2])
        raise KeyboardInterrupt(f"interrupted: the first {n} of {len(rows)} images are in {args.out} "
                                "(complete=False); rerun the same command to continue from there") from None
    images = np.concatenate([*earlier, new])  # `new` as generate returns it (inpainting pastes after sampling)
    save_samples(args.out, images, rows, labels, **settings)
    parts.clear()
    print(f"wrote {len(images)} images to {args.out}", file=sys.stderr)
    return 0


def run_fingerprint(args, pipe: Pipeline, rows: list[str]) -> str:
    """What decides the images of a sample run: the pipeline's stages and every sampling setting."""
    g, kw, settings = settings_for(args, pipe)
    key = {"stages": {k: v.get("sha256") for k, v in pipe.spec["stages"].items()}, "rows": rows,
           "settings": settings, "guidance": repr(g), "class_label": args.class_label,
           "image_prompt": file_hash(args.image_prompt) if args.image_prompt else None,
           **{k: kw[k] for k in ("batch_size", "micro_batch", "precision", "decoder")}}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


class FinishedBatches:
    """`.NAME.parts/` beside --out: every finished batch of a run, written as it is made, so a run stopped in any
    way (Ctrl-C, SIGTERM, SIGKILL, power loss) continues where it stopped when the same command runs again. A
    folder left by a run with other settings is replaced. Removed once --out is written."""

    def __init__(self, out: Path, fingerprint: str):
        self.dir = out.parent / f".{out.name}.parts"
        self.fingerprint = fingerprint

    def load(self) -> list[np.ndarray]:
        stamp = self.dir / "fingerprint"
        if self.dir.is_dir() and (not stamp.is_file() or stamp.read_text().strip() != self.fingerprint):
            shutil.rmtree(self.dir)  # another command's batches
        if not self.dir.is_dir():
            return []
        out, n = [], 0
        for f in sorted(self.dir.glob("batch-*.npz")):
            if int(f.stem.split("-")[1]) != n:  # a gap: keep only the unbroken start
                break
            with np.load(f, allow_pickle=False) as z:
                out.append(z["images"])
            n += len(out[-1])
        return out

    def save(self, images: np.ndarray, start: int) -> np.ndarray:
        if not self.dir.is_dir():
            self.dir.mkdir(parents=True)
            write_bytes(self.dir / "fingerprint", self.fingerprint.encode())
        buf = io.BytesIO()
        np.savez(buf, images=images)
        write_bytes(self.dir / f"batch-{start:09d}.npz", buf.getvalue())
        return images

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def output_lock(out: Path):
    """Hold `.NAME.lock` beside --out while sampling: a second `ldmkit sample` into the same file is refused (the
    later writer would silently replace the first one's images). The lock ends with the process."""
    try:
        import fcntl  # local: POSIX only; elsewhere sampling runs unlocked
    except ImportError:
        yield
        return
    lock = out.parent / f".{out.name}.lock"
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise FileExistsError(f"--out {out}: another ldmkit sample (PID {f.read().strip() or '?'}) is writing it; "
                                  "wait for it or choose another --out") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a scheduler's stop) ends sampling like Ctrl-C, so the finished batches are kept."""
    def stop(signum, frame):
        raise KeyboardInterrupt
    try:
        old = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
