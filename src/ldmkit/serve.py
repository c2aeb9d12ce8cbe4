"""`ldmkit serve [PIPELINE ...]`: a local web UI over the bundled pipelines and any pipeline directories given.

Three tabs: **Text to image** (prompt, negative prompt, CFG scale with rescale / interval / APG, classifier
guidance, sampler, steps, seed, count, fast decoder / guidance-distilled / one-step), **Edit** (SDEdit strength,
inpainting where a mask is drawn) and **Look inside** (an image's reconstruction and latent channels, latent
interpolation between two images, the CLIP tower's closest captions). Images are downloadable as PNG and npz.

Every request goes through `ldmkit sample`'s own argument parser, checks and sampling call (`sample.parse_args`,
`sample.generate`), so the same settings give the same pixels as the CLI. The server is private by default: bound
to 127.0.0.1, Gradio's analytics off, no font, script or other asset fetched from outside. It is bounded: steps,
images per request, prompt length and upload size have limits stricter than the CLI's (each exceeded limit is a
message in the page), one job samples at a time and at most `--queue` wait; later requests are refused with a
"queue is full" message instead of piling up.
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import tempfile
import threading
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
CSS = """
.pixelated img, img.pixelated { image-rendering: pixelated; }
.bigimg img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }
"""


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


# ---------------------------------------------------------------------------------------------- request handlers
def _num(value, name: str, integer: bool = True):
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


class App:
    """The handlers behind the page; each returns files the page shows and offers for download."""

    def __init__(self, pipes: Pipelines, limits: Limits, workdir: Path):
        self.pipes, self.limits, self.workdir = pipes, limits, workdir

    def _request_dir(self) -> Path:
        return Path(tempfile.mkdtemp(dir=self.workdir))

    def _sample(self, name: str, argv: list[str], out_dir: Path):
        from ldmkit import sample
        args = sample.parse_args(argv)
        pipe = self.pipes.get(name)
        images, rows, labels, settings = sample.generate(args, pipe)
        sample.save_samples(out_dir / "samples.npz", images, rows, labels, **settings)
        sample.save_samples(out_dir / "grid.png", images, rows, labels)
        files = []
        for i, img in enumerate(images):
            path = out_dir / f"image-{i:02d}.png"
            save_png(img, path)
            files.append((str(path), rows[i] or "(unconditional)"))
        return files, pipe, settings

    def text_to_image(self, name, prompt, negative, guidance, rescale, interval, mode, classifier_scale,
                      class_label, sampler, steps, seed, num, variant):
        steps, num = _num(steps, "steps"), _num(num, "number of images")
        seed = _num(seed, "seed")
        self.limits.check(prompts=[prompt, negative], steps=steps, num=num)
        out = self._request_dir()
        argv = sample_argv(
            self.pipes.paths[name], out / "samples.npz", prompt=prompt, negative=negative,
            guidance=_num(guidance, "guidance", False), rescale=_num(rescale, "rescale", False), interval=interval,
            mode=mode, classifier_scale=_num(classifier_scale, "classifier scale", False),
            class_label=class_index(self.pipes.spec(name), class_label), sampler=sampler, steps=steps, seed=seed,
            num=num, variant=variant)
        files, _, settings = self._sample(name, argv, out)
        info = (f"{len(files)} image(s), seed {seed}, {settings['sampler']} x {settings['steps']} steps, guidance "
                f"{settings['guidance']:g} (rescale {settings['guidance_rescale']:g}); the same command: "
                f"`ldmkit sample {self.pipes.paths[name]} {cli_tail(argv)}`")
        return files, [str(out / "grid.png"), str(out / "samples.npz")], info

    def edit(self, name, editor, prompt, strength, guidance, steps, seed, num):
        steps, num, seed = _num(steps, "steps"), _num(num, "number of images"), _num(seed, "seed")
        self.limits.check(prompts=[prompt], steps=steps, num=num)
        if not editor or editor.get("background") is None:
            raise ValueError("upload an image to edit first (drop a PNG or JPEG on the image field)")
        out = self._request_dir()
        background = np.asarray(editor["background"])
        save_png(background[..., :3] if background.shape[-1] == 4 else background, out / "input.png")
        layers = [np.asarray(layer) for layer in editor.get("layers") or [] if layer is not None]
        drawn = np.zeros(background.shape[:2], bool)
        for layer in layers:
            if layer.ndim == 3 and layer.shape[-1] == 4 and layer.shape[:2] == drawn.shape:
                drawn |= layer[..., 3] > 0
        extra = ["--init-image", str(out / "input.png"), "--strength", str(_num(strength, "strength", False))]
        if drawn.any():
            save_png((drawn * 255).astype(np.uint8)[..., None], out / "mask.png")
            extra += ["--mask", str(out / "mask.png")]
        argv = sample_argv(self.pipes.paths[name], out / "samples.npz", prompt=prompt, negative="",
                           guidance=_num(guidance, "guidance", False), rescale=None, interval="", mode="cfg",
                           classifier_scale=None, class_label=None, sampler="pipeline default", steps=steps,
                           seed=seed, num=num, variant="full denoiser", extra=extra)
        files, pipe, settings = self._sample(name, argv, out)
        seen = self._native(pipe, out / "input.png")
        save_png(seen[0], out / "input-as-seen.png")
        what = "inpainted where the mask is drawn" if drawn.any() else f"SDEdit at strength {settings['strength']:g}"
        return ([(str(out / "input-as-seen.png"), "input, as the pipeline sees it"), *files],
                [str(out / "grid.png"), str(out / "samples.npz")], f"{len(files)} image(s), {what}")

    # ------------------------------------------------------------------ look inside
    def _native(self, pipe, path) -> np.ndarray:
        """An image file at the pipeline's native size and channels: uint8 (1, h, w, C), as `ldmkit sample
        --init-image` reads it."""
        from ldmkit.sample import read_native
        return read_native(Path(path), pipe)[None]

    def test_image(self, name) -> str:
        ds = self.pipes.test_split(name)
        if ds is None:
            raise ValueError(f"the data of {name} ({self.pipes.spec(name)['data']}) is not on this machine; "
                             "upload an image instead")
        i = random.randrange(len(ds))
        top, left, h, w = ds.crop_box
        img = ds.images[i].permute(1, 2, 0).numpy()[top:top + h, left:left + w]
        path = self._request_dir() / f"test-{i}.png"
        save_png(img, path)
        return str(path)

    def test_image_to_edit(self, name) -> dict:
        path = self.test_image(name)
        return {"background": path, "layers": [], "composite": path}

    def reconstruct(self, name, image_path):
        import torch
        if not image_path:
            raise ValueError("choose an image first (upload one or press 'A test image')")
        pipe = self.pipes.get(name)
        x = self._native(pipe, image_path)
        with torch.no_grad():
            z = pipe.encode_images(x)
            recon = pipe.decode(z)
        out = self._request_dir()
        save_png(x[0], out / "input.png")
        save_png(recon[0], out / "reconstruction.png")
        lat = z[0].numpy()
        chans = [(c - c.min()) / max(float(c.max() - c.min()), 1e-8) for c in lat]
        tiles = np.stack([(c * 255).round().astype(np.uint8)[..., None] for c in chans])
        from ldmkit.images import grid
        save_png(grid(tiles, nrow=min(len(tiles), 8), scale=max(1, 96 // lat.shape[-1])), out / "latent.png")
        mse = float(np.mean((recon[0].astype(np.float64) - x[0].astype(np.float64)) ** 2))
        psnr = 10 * np.log10(255 ** 2 / mse) if mse > 0 else float("inf")
        info = (f"latent {lat.shape[0]} x {lat.shape[1]} x {lat.shape[2]} (scaled: mean {lat.mean():+.2f}, std "
                f"{lat.std():.2f}; the VAE's KL term pulls it toward N(0, I)); reconstruction PSNR {psnr:.1f} dB")
        return ([(str(out / "input.png"), "input"), (str(out / "reconstruction.png"), "reconstruction")],
                str(out / "latent.png"), info)

    def interpolate(self, name, path_a, path_b, frames):
        import torch

        from ldmkit.autoencoder import interpolate
        frames = _num(frames, "frames")
        self.limits.check(frames=frames)
        if not path_a or not path_b:
            raise ValueError("choose two images (upload or 'A test image' for each)")
        pipe = self.pipes.get(name)
        x = np.concatenate([self._native(pipe, path_a), self._native(pipe, path_b)])
        with torch.no_grad():
            z = pipe.encode_images(x)
            images = pipe.decode(interpolate(z[0], z[1], frames))
        t = np.linspace(0, 1, frames)
        out = self._request_dir()
        files = []
        for i, img in enumerate(images):
            save_png(img, out / f"frame-{i:02d}.png")
            files.append((str(out / f"frame-{i:02d}.png"), f"t = {float(t[i]):.2f}"))
        return files

    def closest_captions(self, name, image_path, k: int = 5):
        import torch
        if not image_path:
            raise ValueError("choose an image first (upload one or press 'A test image')")
        pipe = self.pipes.get(name)
        captions = candidate_captions(self.pipes.spec(name), self.pipes.test_split(name))
        if not captions:
            raise ValueError(f"{name} has neither class names nor its data here: no captions to rank")
        clip = self.pipes.clip(name)
        x = self._native(pipe, image_path)
        from ldmkit.images import from_uint8_nhwc
        top, left, h, w = pipe.crop_box
        H, W = pipe.spec["image"]["size"]
        img = torch.nn.functional.pad(from_uint8_nhwc(x), (left, W - w - left, top, H - h - top), value=-1.0)
        with torch.no_grad():
            fi = torch.nn.functional.normalize(clip.encode_image(img), dim=-1)
            ft = torch.cat([torch.nn.functional.normalize(clip.encode_prompts(captions[i:i + 256]), dim=-1)
                            for i in range(0, len(captions), 256)])
            sims = (fi @ ft.T)[0]
            probs = torch.softmax(clip.logit_scale() * sims, 0)
        best = torch.argsort(sims, descending=True)[:k].tolist()
        return {f"{captions[i]}  (cos {float(sims[i]):.3f})": float(probs[i]) for i in best}


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


def save_png(image: np.ndarray, path) -> None:
    from ldmkit.images import save_png as _save
    _save(image, path)


# ---------------------------------------------------------------------------------------------- the page
def user_errors(fn):
    """A bad value or file becomes the page's error message (one line) instead of a traceback."""
    import gradio as gr

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, OSError, SystemExit) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if isinstance(e, SystemExit):
                msg = "the settings were refused by the sampler's argument parser; check the fields"
            raise gr.Error(msg, print_exception=False) from None
    return run


def build_app(pipes: Pipelines, limits: Limits, workdir: Path):
    """The Gradio Blocks of the three tabs (not launched)."""
    import gradio as gr

    from ldmkit.diffusion.samplers import SAMPLERS
    app = App(pipes, limits, workdir)
    first = pipes.spec(pipes.names[0])
    d = first["defaults"]
    gallery = functools.partial(gr.Gallery, columns=4, height=360, object_fit="contain", elem_classes="pixelated",
                                format="png")
    with gr.Blocks(title="ldmkit", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown("## ldmkit: latent diffusion\nA text prompt becomes CLIP text features; the denoiser turns noise "
                    "into a latent under classifier-free guidance; the autoencoder's decoder turns the latent into "
                    "pixels. Same settings, same seed: the same image as `ldmkit sample`.")
        name = gr.Dropdown(pipes.names, value=pipes.names[0], label="Pipeline")
        with gr.Tab("Text to image"):
            with gr.Row():
                with gr.Column(scale=2):
                    prompt = gr.Textbox(label="Prompt", value=example_prompt(first), elem_id="prompt")
                    negative = gr.Textbox(label="Negative prompt (replaces the unconditional prediction)")
                    with gr.Row():
                        guidance = gr.Slider(0, 15, value=d["guidance"], step=0.5, label="Guidance scale w "
                                             "(0 unconditional, 1 conditional)")
                        rescale = gr.Slider(0, 1, value=d.get("guidance_rescale", 0.0), step=0.05,
                                            label="Guidance rescale phi")
                    with gr.Row():
                        mode = gr.Radio(["cfg", "apg"], value="cfg", label="Guidance mode")
                        interval = gr.Textbox(label="Guidance interval LO,HI (sigma; empty = all steps)")
                    with gr.Row():
                        classifier_scale = gr.Slider(0, 10, value=0, step=0.5, label="Classifier guidance scale")
                        class_label = gr.Dropdown(class_choices(first), value=FROM_PROMPT,
                                                  label="Class for classifier guidance")
                    with gr.Row():
                        sampler = gr.Dropdown(["pipeline default", *sorted(SAMPLERS)], value="pipeline default",
                                              label="Sampler")
                        steps = gr.Number(value=d["steps"], label=f"Steps (1-{limits.max_steps})", elem_id="steps")
                        seed = gr.Number(value=0, label="Seed", precision=0, elem_id="seed")
                        num = gr.Number(value=4, label=f"Images (1-{limits.max_images})", elem_id="num")
                    variant = gr.Radio(list(VARIANTS), value="full denoiser", label="Model")
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column(scale=3):
                    images = gallery(label="Images", elem_id="images")
                    files = gr.File(label="Download (PNG grid, npz)", file_count="multiple")
                    info = gr.Markdown(elem_id="info")
            go.click(user_errors(app.text_to_image), [name, prompt, negative, guidance, rescale, interval, mode,
                                                      classifier_scale, class_label, sampler, steps, seed, num,
                                                      variant], [images, files, info],
                     concurrency_id="sampling", api_name="text_to_image")
        with gr.Tab("Edit"):
            with gr.Row():
                with gr.Column(scale=2):
                    editor = gr.ImageEditor(label="Image (draw on it to inpaint there; no drawing = SDEdit)",
                                            type="numpy", image_mode="RGBA", sources=["upload"],
                                            brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed"),
                                            canvas_size=(256, 256), fixed_canvas=True, elem_id="editor")
                    e_test = gr.Button("A test image")
                    e_prompt = gr.Textbox(label="Prompt", value=example_prompt(first))
                    strength = gr.Slider(0.05, 1, value=0.6, step=0.05, label="Strength (SDEdit: how much of the "
                                         "noise schedule is rerun)")
                    with gr.Row():
                        e_guidance = gr.Slider(0, 15, value=d["guidance"], step=0.5, label="Guidance scale w")
                        e_steps = gr.Number(value=d["steps"], label=f"Steps (1-{limits.max_steps})")
                        e_seed = gr.Number(value=0, label="Seed", precision=0)
                        e_num = gr.Number(value=4, label=f"Images (1-{limits.max_images})")
                    e_go = gr.Button("Edit", variant="primary")
                with gr.Column(scale=3):
                    e_images = gallery(label="Input and results")
                    e_files = gr.File(label="Download (PNG grid, npz)", file_count="multiple")
                    e_info = gr.Markdown()
            e_test.click(user_errors(app.test_image_to_edit), [name], [editor])
            e_go.click(user_errors(app.edit), [name, editor, e_prompt, strength, e_guidance, e_steps, e_seed, e_num],
                       [e_images, e_files, e_info], concurrency_id="sampling", api_name="edit")
        with gr.Tab("Look inside"):
            with gr.Row():
                with gr.Column():
                    img_a = gr.Image(label="Image", type="filepath", elem_classes="bigimg", height=220)
                    test_a = gr.Button("A test image")
                    with gr.Row():
                        recon_go = gr.Button("Encode and decode", variant="primary")
                        clip_go = gr.Button("Closest captions (CLIP)")
                with gr.Column():
                    recon = gallery(label="Input and reconstruction", columns=2, height=260)
                    latent = gr.Image(label="Latent channels (each scaled to its own range)", type="filepath",
                                      elem_classes="bigimg", height=200)
                    recon_info = gr.Markdown()
                    captions = gr.Label(num_top_classes=5, label="Closest captions by the CLIP image tower")
            with gr.Row():
                with gr.Column():
                    img_b = gr.Image(label="Second image (interpolation)", type="filepath", elem_classes="bigimg",
                                     height=220)
                    test_b = gr.Button("A test image")
                    frames = gr.Slider(2, limits.max_frames, value=min(8, limits.max_frames), step=1,
                                       label="Frames")
                    interp_go = gr.Button("Interpolate in latent space", variant="primary")
                with gr.Column():
                    interp = gallery(label="Decoded latents, first image to second", height=260)
            test_a.click(user_errors(app.test_image), [name], [img_a])
            test_b.click(user_errors(app.test_image), [name], [img_b])
            recon_go.click(user_errors(app.reconstruct), [name, img_a], [recon, latent, recon_info])
            clip_go.click(user_errors(app.closest_captions), [name, img_a], [captions])
            interp_go.click(user_errors(app.interpolate), [name, img_a, img_b, frames], [interp])

        def defaults_of(n):
            spec = pipes.spec(n)
            dd = spec["defaults"]
            return (gr.update(value=example_prompt(spec)), gr.update(value=dd["guidance"]),
                    gr.update(value=dd.get("guidance_rescale", 0.0)), gr.update(value=dd["steps"]),
                    gr.update(value=example_prompt(spec)),
                    gr.update(choices=class_choices(spec), value=FROM_PROMPT))
        name.change(defaults_of, [name], [prompt, guidance, rescale, steps, e_prompt, class_label])
    demo.queue(default_concurrency_limit=1, max_size=limits.queue)
    return demo


def example_prompt(spec: dict) -> str:
    classes = spec.get("classes")
    if spec.get("data") == "fashion-mnist":
        return "a photo of a sneaker"
    if classes:
        return f"a photo of a {classes[0]}"
    if spec.get("data") == "shapes" or "shapes" in str(spec.get("data")):
        return "a large red star in the top left"
    return ""


def theme():
    """Gradio's default look with system fonts only (its default theme would load fonts from the web)."""
    import gradio as gr
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


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
    import sys
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
    with tempfile.TemporaryDirectory(prefix="ldmkit-serve-") as work:
        demo = build_app(pipes, limits, Path(work))
        print(f"ldmkit serve: {', '.join(pipes.names)} on http://{args.host}:{args.port} (Ctrl-C stops)",
              file=sys.stderr, flush=True)
        demo.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False, show_error=True,
                    max_file_size=int(args.max_upload_mb * 1024 * 1024), theme=theme(), css=CSS, ssr_mode=False,
                    quiet=True, footer_links=[], allowed_paths=[work])
    return 0
