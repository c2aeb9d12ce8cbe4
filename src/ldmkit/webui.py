"""The page of `ldmkit serve`: the Gradio Blocks of its three tabs and the handlers behind them.

Each handler turns a form into `ldmkit sample` arguments (`serve.sample_argv`) and runs them through
`sample.parse_args` / `sample.generate`, so the page and the CLI cannot drift apart; a bad value becomes a
one-line message in the page (`user_errors`).
"""

from __future__ import annotations

import functools
import random
import tempfile
from pathlib import Path

import numpy as np

from ldmkit.guidance.cfg import MODES
from ldmkit.images import save_png
from ldmkit.serve import (
    FROM_PROMPT,
    VARIANTS,
    Limits,
    Pipelines,
    candidate_captions,
    class_choices,
    class_index,
    cli_tail,
    example_prompt,
    form_number,
    sample_argv,
)

CSS = """
.pixelated img, img.pixelated { image-rendering: pixelated; }
.bigimg img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }
"""



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
        steps, num = form_number(steps, "steps"), form_number(num, "number of images")
        seed = form_number(seed, "seed")
        self.limits.check(prompts=[prompt, negative], steps=steps, num=num)
        out = self._request_dir()
        argv = sample_argv(
            self.pipes.paths[name], out / "samples.npz", prompt=prompt, negative=negative,
            guidance=form_number(guidance, "guidance", False), rescale=form_number(rescale, "rescale", False),
            interval=interval, mode=mode, classifier_scale=form_number(classifier_scale, "classifier scale", False),
            class_label=class_index(self.pipes.spec(name), class_label), sampler=sampler, steps=steps, seed=seed,
            num=num, variant=variant)
        files, _, settings = self._sample(name, argv, out)
        info = (f"{len(files)} image(s), seed {seed}, {settings['sampler']} x {settings['steps']} steps, guidance "
                f"{settings['guidance']:g} (rescale {settings['guidance_rescale']:g}); the same command: "
                f"`ldmkit sample {self.pipes.paths[name]} {cli_tail(argv)}`")
        return files, [str(out / "grid.png"), str(out / "samples.npz")], info

    def edit(self, name, editor, prompt, strength, guidance, steps, seed, num):
        steps, num, seed = form_number(steps, "steps"), form_number(num, "number of images"), form_number(seed, "seed")
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
        extra = ["--init-image", str(out / "input.png"), "--strength", str(form_number(strength, "strength", False))]
        if drawn.any():
            save_png((drawn * 255).astype(np.uint8)[..., None], out / "mask.png")
            extra += ["--mask", str(out / "mask.png")]
        argv = sample_argv(self.pipes.paths[name], out / "samples.npz", prompt=prompt, negative="",
                           guidance=form_number(guidance, "guidance", False), rescale=None, interval="", mode="cfg",
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
        frames = form_number(frames, "frames")
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
                        mode = gr.Radio(list(MODES), value="cfg", label="Guidance mode")
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


def theme():
    """Gradio's default look with system fonts only (its default theme would load fonts from the web)."""
    import gradio as gr
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])
