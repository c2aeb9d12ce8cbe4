"""Prompt in, images out: a pipeline directory loaded as one object, with every guidance option.

    pipe = Pipeline.load("pretrained/fashion-mnist")
    images = pipe(["a photo of a bag"], num=4, guidance=3.0, steps=20, sampler="dpmpp-2m", seed=0)  # uint8 NHWC

A pipeline directory holds `pipeline.json` and the stage directories it names (`autoencoder/`, `clip/` whose
text tower is the frozen text encoder, `denoiser/`, optional `classifier/`, `eval-classifier/` and
`fast-decoder/`). Each stage's
weight hash is recorded there and checked at load, and the denoiser's own record of the autoencoder and text
encoder it was trained with must match: a swapped stage fails loudly.

Prompts reach the denoiser only through the text encoder; the empty prompt "" is the unconditional (null)
condition. Class labels reach only the noise-aware classifier (classifier guidance), never the denoiser.
Image i of a call is seeded from (seed, i) and the networks run on fixed-size micro-batches, so an image does not
depend on how many others are generated with it or on the batch size.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ldmkit.data import parse_class
from ldmkit.diffusion.objectives import make_denoiser
from ldmkit.diffusion.samplers import get_sampler
from ldmkit.guidance.cfg import Guidance
from ldmkit.guidance.classifier import classifier_grad_fn, classifier_guidance
from ldmkit.guidance.multi import ChainGuidance, image_text_conds, image_text_scales
from ldmkit.images import from_uint8_nhwc, to_uint8_nhwc
from ldmkit.nn import in_precision
from ldmkit.seeding import example_generators, randn
from ldmkit.stages import load_clip, load_pipeline_stages

# Every network call runs on chunks of exactly this many rows (padded), for batch invariance: an image's bits do not
# depend on which images share its batch. 16 keeps one-image requests cheap; bulk sampling runs faster with 64 (the
# Fashion-MNIST UNet's forward over 128 rows: 443 ms in chunks of 16, 257 ms in chunks of 64, one thread).
MICRO_BATCH = 16


def fixed_chunks(fn, micro: int = MICRO_BATCH):
    """Run `fn(x, *rows)` on zero-padded chunks of exactly `micro` rows, so row i's result never depends on
    how many rows arrive together. Every tensor argument is split along dim 0; other arguments pass through."""
    def run(x: torch.Tensor, *args, **kwargs):
        n = x.shape[0]
        outs = []
        for i in range(0, n, micro):
            m = min(micro, n - i)

            def take(v, i=i, m=m):
                if not isinstance(v, torch.Tensor) or v.ndim == 0 or v.shape[0] != n:
                    return v
                part = v[i:i + m]
                return torch.cat([part, part[:1].expand(micro - m, *part.shape[1:])]) if m < micro else part
            outs.append(fn(take(x), *[take(a) for a in args], **{k: take(v) for k, v in kwargs.items()})[:m])
        return torch.cat(outs)
    return run


class PromptEncoder:
    """Encodes prompts and caches them by string; "" gives the null condition (`drop` True).

    With `batched=True` (training) prompts not yet cached are encoded in one call; with `batched=False`
    (sampling) each prompt is encoded alone, so its bits never depend on which prompts come with it.
    With `tokens=False` the denoiser is conditioned on the pooled text vector alone: the token states are
    replaced by one all-zero context token (cross-attention then adds a learned constant), so nothing but the
    pooled embedding, whose nearest training class CLIP's contrastive loss makes template-invariant, reaches it.
    """

    def __init__(self, text_encoder, batched: bool = True, cache_size: int = 65536, tokens: bool = True):
        self.text_encoder, self.batched, self.cache, self.cache_size = text_encoder, batched, {}, cache_size
        self.tokens = tokens

    def __call__(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        unique = list(dict.fromkeys(prompts))
        missing = [p for p in unique if p not in self.cache]
        if missing:
            if len(self.cache) + len(missing) > self.cache_size:
                self.cache.clear()  # full: start over, and this call's cached prompts must be encoded again too
                missing = unique
            groups = [missing] if self.batched else [[p] for p in missing]
            for group in groups:
                enc = self.text_encoder.encode(group)
                if not self.tokens:  # cache only what reaches the denoiser: pooled + one zero context token
                    if "pooled" not in enc:
                        raise ValueError("tokens=False conditions on the pooled text vector, but this text encoder "
                                         "gives none; use a CLIP text tower or keep text_tokens=true")
                    ctx = enc["context"]
                    enc = {"context": ctx.new_zeros(ctx.shape[0], 1, ctx.shape[-1]), "pooled": enc["pooled"]}
                for i, p in enumerate(group):
                    self.cache[p] = {k: v[i] for k, v in enc.items()}
        rows = [self.cache[p] for p in prompts]
        cond = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        cond["drop"] = torch.tensor([p == "" for p in prompts], dtype=torch.bool)
        return cond


def sample_latents(backbone, objective, encode: PromptEncoder, prompts: Sequence[str], indices: Sequence[int],
                   shape: tuple[int, ...], *, seed: int, guidance: Guidance, sampler: str = "dpmpp-2m",
                   steps: int = 20, spacing: str = "trailing", classifier=None, class_labels=None,
                   x_start: torch.Tensor | None = None, start_step: int = 0, inpaint=None,
                   progress: bool = False, micro_batch: int = MICRO_BATCH, precision: str = "fp32",
                   image: torch.Tensor | None = None, guide=None) -> torch.Tensor:
    """Latents (B, *shape) for one batch of prompts; example j is seeded by (seed, indices[j]).

    image: CLIP image embeddings (B, E) of image prompts, for a denoiser trained with image conditions; the image
    and the text are then guided with their own scales (`guidance.image_scale`, `guidance.scale`;
    `ldmkit.guidance.multi`).
    x_start / start_step: image-to-image (start from a noised latent at sigmas[start_step]); inpaint:
    (known latents, mask with 1 = generate) keeps the known region by replacing x0_hat outside the mask.
    precision "bf16": the backbone runs under bf16 autocast (where the hardware has bf16), the sampler in fp32.
    guide: the weaker backbone (same objective) that `guidance.mode` "autoguidance" guides with.
    """
    device = next(backbone.parameters()).device if isinstance(backbone, torch.nn.Module) else "cpu"
    def net(b):  # a backbone as the sampler's denoise(x, sigma, cond) -> x0_hat
        return make_denoiser(in_precision(fixed_chunks(b, micro_batch), precision, device), objective)
    denoise = net(backbone)
    cond = encode(prompts)
    uncond = encode([guidance.negative_prompt]) if guidance.negative_prompt is not None else \
        {**cond, "drop": torch.ones(len(prompts), dtype=torch.bool)}
    if image is None:
        fn = guidance.wrap(denoise, cond, uncond, rescale_space=_space(objective),
                           guide=None if guide is None else net(guide))
    else:
        if guidance.mode != "cfg":
            raise ValueError(f"image prompts are guided with cfg; guidance mode {guidance.mode!r} is for text alone")
        conds = image_text_conds(cond, uncond, image.to(device))
        w_image = guidance.scale if guidance.image_scale is None else guidance.image_scale
        fn = ChainGuidance(denoise, conds, image_text_scales(conds, w_image, guidance.scale),
                           rescale=guidance.rescale, rescale_space=_space(objective), interval=guidance.interval)
    if guidance.classifier_scale:
        if classifier is None or class_labels is None:
            raise ValueError("classifier guidance needs a pipeline with classifier/ and a class per prompt "
                             "(a prompt naming one class, or --class-label K)")
        grad = classifier_grad_fn(fixed_chunks(classifier, micro_batch),
                                  torch.as_tensor(class_labels, dtype=torch.long))
        fn = classifier_guidance(fn, grad, guidance.classifier_scale)
    if inpaint is not None:
        known, mask = inpaint
        inner = fn
        fn = lambda x, sigma: mask * inner(x, sigma) + (1 - mask) * known  # noqa: E731
    sigmas = objective.get_schedule().sample_sigmas(steps, spacing)[start_step:]
    gens = example_generators(seed, list(indices))
    z = randn((len(prompts), *shape), gens)  # example j's draw depends only on (seed, indices[j])
    if float(sigmas[0]) == 0:  # image-to-image at strength 0: nothing to denoise
        return x_start
    x = z if torch.isinf(sigmas[0]) else (0 if x_start is None else x_start) + sigmas[0] * z
    return get_sampler(sampler)(fn, x, sigmas, generator=gens, progress=progress)


def _space(objective) -> str:
    return {"eps": "eps", "v": "v", "x0": "x0", "flow": "flow"}[objective.kind]


class Pipeline:
    """Autoencoder + frozen text encoder + denoiser (+ noise-aware classifier) behind one call."""

    def __init__(self, root: Path, spec: dict, autoencoder, text_encoder, backbone, objective, classifier=None,
                 text_tokens: bool = True, fast_decoder=None, distilled=None, onestep=None, guide=None):
        """The loaded stages (`Pipeline.load` reads them from a pipeline directory)."""
        self.root, self.spec = root, spec
        self.fast_decoder = fast_decoder
        self.distilled = distilled  # (guidance-distilled backbone, its config) or None
        self.onestep = onestep  # (its one-step student, config) or None
        self.guide = guide  # the weaker denoiser autoguidance guides with (guide/), or None
        self.autoencoder, self.backbone, self.objective, self.classifier = autoencoder, backbone, objective, classifier
        self.encode = PromptEncoder(text_encoder, batched=False, tokens=text_tokens)
        lat = spec["latent"]
        self.scale_factor, self.shift_factor = lat["scale_factor"], lat["shift_factor"]
        self.latent_shape = tuple(lat["shape"])
        self.crop_box = spec["image"]["crop"]  # (top, left, height, width) of the native image
        self.defaults = spec["defaults"]
        self._clip = None  # CLIP with its image tower, loaded for the first image prompt

    @classmethod
    def load(cls, path: str | Path) -> "Pipeline":
        root = Path(path)
        if not (root / "pipeline.json").exists():
            raise FileNotFoundError(f"{root} is not a pipeline directory (no pipeline.json); build one with "
                                    "`ldmkit train pipeline --preset fashion-mnist --out DIR`")
        parts = load_pipeline_stages(root)
        return cls(root, **parts)

    # ------------------------------------------------------------------ latents <-> images
    @torch.no_grad()
    def decode(self, z: torch.Tensor, micro_batch: int = MICRO_BATCH, precision: str = "fp32",
               decoder: str = "full") -> np.ndarray:
        """Scaled latents -> uint8 (N, H, W, C) images at the dataset's native size. decoder "fast": the pipeline's
        fast decoder (several times cheaper, a little less sharp) instead of the autoencoder's."""
        dec = in_precision(fixed_chunks(self._decoder(decoder), micro_batch), precision)
        x = dec(z / self.scale_factor + self.shift_factor)
        top, left, h, w = self.crop_box
        x = x[:, :, top:top + h, left:left + w]
        return to_uint8_nhwc(x)

    def _image_shape(self) -> tuple[int, int, int]:
        """(h, w, C) of the images `decode` returns."""
        return (self.crop_box[2], self.crop_box[3], self.spec["image"]["channels"])

    def distilled_guidance(self) -> Guidance:
        """The guidance the distilled denoiser reproduces (its w and rescale phi)."""
        if self.distilled is None:
            raise ValueError(f"{self.root} has no distilled denoiser (no 'distilled' stage in pipeline.json); make one "
                             f"with `ldmkit train distill --pipeline {self.root}`")
        cfg = self.distilled[1]
        return Guidance(scale=float(cfg["guidance"]), rescale=float(cfg["guidance_rescale"]))

    def _distilled(self, guidance: Guidance):
        """(the distilled backbone, the guidance left to apply on top: none but classifier guidance)."""
        want = self.distilled_guidance()
        if replace(guidance, classifier_scale=0.0) != want:
            raise ValueError(f"the distilled denoiser reproduces guidance w={want.scale}, rescale {want.rescale}; "
                             f"got w={guidance.scale}, rescale {guidance.rescale}, mode {guidance.mode}, interval "
                             f"{guidance.interval}, negative prompt {guidance.negative_prompt!r}: sample without "
                             "--distilled for other guidance, or distill at it (--set guidance=W)")
        return self.distilled[0], Guidance(scale=1.0, classifier_scale=guidance.classifier_scale)

    def _decoder(self, name: str):
        if name == "full":
            return self.autoencoder.decode
        if name != "fast":
            raise ValueError(f"decoder={name!r}: use 'full' (the autoencoder's) or 'fast'")
        if self.fast_decoder is None:
            raise ValueError(f"{self.root} has no fast decoder (no fast-decoder stage in pipeline.json); train one "
                             f"with `ldmkit train fast-decoder --autoencoder {self.root / 'autoencoder'} --out "
                             f"{self.root / 'fast-decoder'}` and rerun `ldmkit train pipeline` on this directory")
        return self.fast_decoder

    def _padded(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, h, w, C) native images -> float (N, C, H, W) in [-1, 1], padded to the training size."""
        x = from_uint8_nhwc(images)
        top, left, h, w = self.crop_box
        if tuple(x.shape[2:]) != (h, w):
            raise ValueError(f"images must be {h}x{w} (the dataset's native size), got {tuple(x.shape[2:])}")
        H, W = self.spec["image"]["size"]
        return F.pad(x, (left, W - w - left, top, H - h - top), value=-1.0)

    @torch.no_grad()
    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, C) native images -> scaled latents (posterior mode), padded back like training."""
        mean = fixed_chunks(lambda v: self.autoencoder.encode(v).mode())(self._padded(images))
        return (mean - self.shift_factor) * self.scale_factor

    @torch.no_grad()
    def image_embeddings(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, C) native images -> what the denoiser reads as image prompts: CLIP image embeddings
        (N, E), or the image tower's tokens (N, T, Dv) for a denoiser trained with `image_tokens`."""
        if not getattr(self.backbone.cfg, "image_dim", 0):
            raise ValueError(f"{self.root}'s denoiser was trained on text alone; train one that reads image prompts "
                             "with `ldmkit train pipeline ... --set denoiser:image_condition=true`")
        if self._clip is None:
            self._clip = load_clip(self.root / self.spec["stages"]["clip"]["path"])
        tokens = bool(getattr(self.backbone.cfg, "image_tokens", 0))
        return fixed_chunks(lambda x: self._clip.image_condition(x, tokens))(self._padded(images)).float()

    # ------------------------------------------------------------------ sampling
    def guidance(self, scale: float | None = None, *, rescale: float | None = None, distilled: bool = False,
                 **kw) -> Guidance:
        """The guidance settings of a call, with the pipeline's defaults filled in (the one place they are):
        scale and rescale phi from pipeline.json's `defaults`, the default phi only at scales above 1 (at w <= 1
        the model is not pushed past its conditional prediction; a phi given explicitly applies as given). With
        `distilled`, the w and phi the distilled denoiser reproduces. Other keywords are `Guidance` fields."""
        if distilled:
            base = self.distilled_guidance()
            scale = base.scale if scale is None else scale
            rescale = base.rescale if rescale is None else rescale
        scale = float(self.defaults["guidance"] if scale is None else scale)
        if rescale is None:
            rescale = float(self.defaults.get("guidance_rescale", 0.0)) if scale > 1 else 0.0
        return Guidance(scale=scale, rescale=float(rescale), **kw)

    def generate(self, prompts: Sequence[str], *, guidance: Guidance, steps: int | None = None,
                 sampler: str | None = None, seed: int = 0, batch_size: int = 64, class_labels=None,
                 init_latents: torch.Tensor | None = None, strength: float = 1.0, inpaint=None,
                 progress: bool = True, micro_batch: int = MICRO_BATCH, precision: str = "fp32",
                 decoder: str = "full", distilled: bool | str = False, on_batch=None, skip: int = 0,
                 image_prompts: np.ndarray | None = None) -> np.ndarray:
        """One image per entry of `prompts` (rows in order; image i seeded by (seed, i)) -> uint8 NHWC.
        Images do not change with `batch_size`; `micro_batch` (rows per network call) may change their last bits.
        precision "bf16": denoiser and decoder under bf16 autocast, the sampler in fp32. decoder: "full" or "fast".
        distilled: sample with the guidance-distilled denoiser (one network row per image and step); `guidance`
        must then be the setting it was distilled at (`distilled_guidance`). distilled="onestep": its one-step
        student (`ldmkit train distill --set one_step_from=N`; sample it with steps=1). `on_batch(images)`: called
        with each finished batch. `skip`: the first `skip` rows (a multiple of batch_size) were made before and are
        not sampled again; the rows after them come out exactly as in a full call. `image_prompts`: uint8
        (N, h, w, C), one image per row, for a denoiser trained with image conditions (an empty prompt then makes
        variations of the image; `guidance.image_scale` is the image's scale, `guidance.scale` the text's)."""
        self._decoder(decoder)  # fail before sampling
        if image_prompts is not None:
            if distilled:
                raise ValueError("the distilled students reproduce text guidance only; drop --distilled / --one-step "
                                 "for image prompts")
            if len(image_prompts) != len(prompts):
                raise ValueError(f"{len(image_prompts)} image prompts for {len(prompts)} rows; give one per row")
            image_prompts = self.image_embeddings(image_prompts)
        backbone = self.backbone
        if distilled:
            backbone, guidance = self._distilled(guidance)
            if distilled == "onestep":
                if self.onestep is None:
                    raise ValueError(f"{self.root} has no one-step student; make one with `ldmkit train distill "
                                     f"--pipeline {self.root} --set one_step_from=2`")
                backbone = self.onestep[0]
        if micro_batch < 1:
            raise ValueError(f"micro_batch={micro_batch} must be >= 1 (rows per network call)")
        steps = int(steps or self.defaults["steps"])
        sampler = sampler or self.defaults["sampler"]
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength={strength} must lie in [0, 1] (0 = keep the input, 1 = a new sample)")
        start = steps - int(round(strength * steps))
        if skip % batch_size or not 0 <= skip <= len(prompts):
            raise ValueError(f"skip={skip} must be a multiple of batch_size={batch_size} within 0..{len(prompts)}")
        out = [np.zeros((0, *self._image_shape()), np.uint8)]
        bar = tqdm(total=len(prompts), initial=skip, desc="sampling", disable=not progress, unit="img")
        for b in range(skip, len(prompts), batch_size):
            sl = slice(b, b + batch_size)
            labels = None if class_labels is None else list(class_labels[sl])
            known = None if inpaint is None else (inpaint[0][sl], inpaint[1][sl])
            x0 = None if init_latents is None else init_latents[sl]
            z = sample_latents(backbone, self.objective, self.encode, list(prompts[sl]),
                               range(b, b + len(prompts[sl])), self.latent_shape, seed=seed, guidance=guidance,
                               sampler=sampler, steps=steps, classifier=self.classifier, class_labels=labels,
                               x_start=x0, start_step=start if x0 is not None else 0, inpaint=known,
                               micro_batch=micro_batch, precision=precision,
                               image=None if image_prompts is None else image_prompts[sl], guide=self.guide)
            out.append(self.decode(z, micro_batch, precision, decoder))
            if on_batch is not None:
                on_batch(out[-1])
            bar.update(len(prompts[sl]))
        bar.close()
        return np.concatenate(out)

    def __call__(self, prompts: Sequence[str] | str, num: int = 1, *, guidance: float | Guidance | None = None,
                 class_label: int | None = None, **kw) -> np.ndarray:
        """`num` images per prompt, rows prompt by prompt -> uint8 (N, H, W, C) at the dataset's native size.
        `guidance`: a scale (None = the pipeline's default) or a `Guidance`; `Guidance` fields may also be given as
        keywords (negative_prompt=, rescale=, interval=, mode=, classifier_scale=, apg=, image_scale=, guide_mix=).
        Other keywords go to `generate` (steps, sampler, seed, decoder, distilled, image_prompts, ...)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        rows = [p for p in prompts for _ in range(num)]
        fields = {k: kw.pop(k) for k in ("negative_prompt", "rescale", "interval", "mode", "classifier_scale", "apg",
                                         "image_scale", "guide_mix") if k in kw}
        g = guidance if isinstance(guidance, Guidance) else \
            self.guidance(guidance, distilled=bool(kw.get("distilled")), **fields)
        labels = self.class_labels(rows, class_label) if g.classifier_scale else None
        return self.generate(rows, guidance=g, class_labels=labels, **kw)

    def class_labels(self, prompts: Sequence[str], class_label: int | None = None) -> list[int]:
        """The class each prompt names (for classifier guidance), or `class_label` for every prompt."""
        if class_label is not None:
            return [int(class_label)] * len(prompts)
        labels = [parse_class(p, self.spec.get("classes")) for p in prompts]
        bad = [p for p, y in zip(prompts, labels) if y is None]
        if bad:
            raise ValueError(f"classifier guidance needs a class: prompt {bad[0]!r} names none (or several); "
                             "pass --class-label K")
        return labels

    def img2img(self, images: np.ndarray, prompts: Sequence[str], strength: float = 0.6, **kw) -> np.ndarray:
        """SDEdit (Meng et al. 2022): encode, noise to `strength` of the schedule, denoise with the prompts."""
        guidance = _as_guidance(self, kw.pop("guidance", None))
        return self.generate(list(prompts), guidance=guidance, init_latents=self.encode_images(images),
                             strength=strength, **kw)

    def inpaint(self, images: np.ndarray, mask: np.ndarray, prompts: Sequence[str], paste_unmasked: bool = True,
                **kw) -> np.ndarray:
        """Regenerate where `mask` (N, H, W) is 1 at native size; elsewhere keep the image's latent.

        The decoder sees the whole latent, so the regenerated cells also shift the decoded pixels next to them
        (on Fashion-MNIST, with the left half regenerated as another class, the right half's error was ~1.9x
        the autoencoder's own reconstruction error). With `paste_unmasked` (the default) the input's pixels are
        put back wherever the mask is 0, so the unmasked region is exactly the input; False returns the decoder's
        output everywhere."""
        guidance = _as_guidance(self, kw.pop("guidance", None))
        known = self.encode_images(images)
        mask = np.asarray(mask)
        if mask.shape != np.asarray(images).shape[:3]:
            raise ValueError(f"mask has shape {mask.shape}; expected {np.asarray(images).shape[:3]} (N, H, W) "
                             "matching the images, 1 = regenerate")
        m = torch.as_tensor(mask, dtype=torch.float32)[:, None]  # (N, 1, h, w)
        top, left, h, w = self.crop_box
        H, W = self.spec["image"]["size"]
        m = F.pad(m, (left, W - w - left, top, H - h - top), value=0.0)
        lat = F.adaptive_max_pool2d(m, known.shape[-2:])  # a latent cell is generated if any pixel in it is
        out = self.generate(list(prompts), guidance=guidance, inpaint=(known, lat), **kw)
        if paste_unmasked:
            out = np.where(mask[..., None] > 0, out, np.asarray(images, dtype=np.uint8))
        return out


def _as_guidance(pipe: Pipeline, guidance: float | Guidance | None) -> Guidance:
    return guidance if isinstance(guidance, Guidance) else pipe.guidance(guidance)
