"""`ldmkit train clip`: CLIP (text transformer + ViT) trained with the symmetric contrastive loss on captions.

The caption tokenizer is trained first, on a seeded sample of training captions, and saved as DIR/tokenizer.json
(a resumed run loads it instead; `--init-from` takes the other run's). Each step draws one caption per example from
the dataset's training wordings, seeded by the global sample index (so resumed and multi-process runs see exactly
the captions of an uninterrupted run), optionally inserts random letter strings into captions (robustness to
unknown words) and shifts and mirrors the images by a few pixels, and minimises the CLIP loss; with several
processes the negatives span the whole global batch. On the shapes data an example can also get a hard-negative
caption (its scene with the shape, colour or position changed) as one more wrong answer for its image. The ViT's
input channels and size come from the dataset.
The text tower of the result is the frozen text encoder of the denoiser stage.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ldmkit.checkpoint import atomic_path
from ldmkit.conditioning import (
    CLIPConfig,
    CLIPModel,
    TextConfig,
    Tokenizer,
    ViTConfig,
    clip_loss,
    clip_loss_gathered,
    gather_features,
    train_tokenizer,
)
from ldmkit.data.shapes import redraw
from ldmkit.eval.clip_cli import quick_metrics
from ldmkit.seeding import example_seed
from ldmkit.train import common
from ldmkit.train.args import stage_main
from ldmkit.train.clip_negatives import (  # noqa: F401
    HARD_NEGATIVE_ATTRIBUTES,
    exhaustive_negatives,
    hard_negative,
    recaption,
    shape_twin,
    training_pairs,
)
from ldmkit.train.common import TrainConfig

CAPTION_STREAM, AUGMENT_STREAM, TWIN_STREAM, CENTRE_STREAM = 2, 3, 4, 5  # example_seed streams of the caption,
                                                                       # augmentation, shape-twin and centring draws


@dataclass(frozen=True)
class CLIPStage:
    model: CLIPConfig = field(default_factory=CLIPConfig)  # towers; vision.channels/image_size are set from the data
    train: TrainConfig = field(default_factory=TrainConfig)
    tokenizer_vocab: int = 512        # BPE vocabulary (256 bytes + 4 special tokens + merges); <= text.vocab_size
    tokenizer_captions: int = 20000   # training captions (seeded sample) the tokenizer is trained on
    shift: int = 0                    # augmentation: random translation by up to this many pixels (edges replicated)
    hflip: bool = False               # augmentation: random horizontal flips (only data whose captions allow it)
    caption_noise: float = 0.0        # probability of inserting 1-3 random letter strings into a training caption
    hard_negatives: float = 0.0       # probability that an example also gets a hard-negative caption (its scene
                                      # with the shape, colour or position changed); needs the shapes data
    hard_negative_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # relative odds that a hard negative
                                      # changes the shape, the colour or the position
    shape_twins: bool = False         # every example brings its scene redrawn with another shape (and that caption)
                                      # into the batch, which doubles; needs the generated shapes data
    lock_text_steps: int = 0          # the text tower and its projection stay at their initialisation this many
                                      # steps while the image tower learns to match them (LiT-style locking)
    exhaustive_negatives: tuple[str, ...] = ()  # shapes attributes (of shape, colour, position) whose every other
                                      # value gives each example a hard-negative caption (exhaustive_negatives())
    center_init: int = 0              # start both towers' pooled features centred over this many training examples
                                      # (CLIPModel.center_); 0 = the plain random start
    eval_images: int = 2000           # test images for the zero-shot figures in metrics.json; 0 = none

    def __post_init__(self):
        if self.tokenizer_vocab > self.model.text.vocab_size:
            raise ValueError(f"tokenizer_vocab={self.tokenizer_vocab} exceeds model.text.vocab_size="
                             f"{self.model.text.vocab_size}; lower it or raise the text tower's vocabulary")
        if self.shift < 0 or self.tokenizer_captions < 1 or self.eval_images < 0 or not 0 <= self.caption_noise <= 1:
            raise ValueError(f"CLIPStage needs shift >= 0, tokenizer_captions >= 1, eval_images >= 0 and "
                             f"0 <= caption_noise <= 1; got {self.shift}, {self.tokenizer_captions}, "
                             f"{self.eval_images}, {self.caption_noise}")
        bad = set(self.exhaustive_negatives) - set(HARD_NEGATIVE_ATTRIBUTES)
        if bad:
            raise ValueError(f"CLIPStage.exhaustive_negatives names {sorted(bad)}; choose among "
                             f"{HARD_NEGATIVE_ATTRIBUTES} (the always-named caption facts)")
        if not 0 <= self.hard_negatives <= 1:
            raise ValueError(f"CLIPStage.hard_negatives is a probability in [0, 1], got {self.hard_negatives}")
        w = self.hard_negative_weights
        if len(w) != len(HARD_NEGATIVE_ATTRIBUTES) or min(w) < 0 or sum(w) <= 0:
            raise ValueError(f"CLIPStage.hard_negative_weights={w} needs {len(HARD_NEGATIVE_ATTRIBUTES)} weights >= 0 "
                             f"(for {', '.join(HARD_NEGATIVE_ATTRIBUTES)}) with a positive sum, e.g. [4, 1, 1]")


PRESETS = {
    "tiny": CLIPStage(
        model=CLIPConfig(text=TextConfig(vocab_size=512, max_length=40, width=32, layers=2, heads=2),
                         vision=ViTConfig(image_size=32, channels=3, patch_size=8, width=32, layers=2, heads=2),
                         embed_dim=32),
        train=TrainConfig(steps=24, batch_size=32, lr=2e-3, warmup_steps=4, log_every=8, ckpt_every=12),
        tokenizer_vocab=512, tokenizer_captions=2000, shift=1, eval_images=256),
    "fashion-mnist": CLIPStage(
        model=CLIPConfig(text=TextConfig(vocab_size=512, max_length=40, width=128, layers=2, heads=4),
                         vision=ViTConfig(image_size=32, channels=1, patch_size=8, width=128, layers=4, heads=4,
                                          pool="mean", pos_init="sincos", stem="conv"),
                         embed_dim=128),
        train=TrainConfig(steps=2200, batch_size=128, lr=1e-3, warmup_steps=180, weight_decay=0.05,
                          betas=(0.9, 0.98), ema_halflife_steps=90, precision="bf16", log_every=100,
                          ckpt_every=400),  # about 8 minutes on 2 AVX512-BF16 cores
        shift=2, hflip=True,  # shifts of up to 2 pixels and mirroring as augmentation
        caption_noise=0.5),  # half the captions get 1-3 random letter strings: robustness to noise words
    # Shapes: the shape of a small object is visible to neither tower at the start (docs/benchmarks.md: evidence)
    "shapes": CLIPStage(
        model=CLIPConfig(text=TextConfig(vocab_size=512, max_length=40, width=128, layers=3, heads=4),
                         vision=ViTConfig(image_size=32, channels=3, patch_size=8, width=128, layers=4, heads=4,
                                          pool="mean", pos_init="sincos", stem="conv"),
                         embed_dim=128),
        train=TrainConfig(steps=1500, batch_size=128, lr=1e-3, warmup_steps=95, weight_decay=0.05,
                          betas=(0.9, 0.98), ema_halflife_steps=47, precision="bf16", log_every=100,
                          ckpt_every=200),  # about 11 minutes on 2 AVX512-BF16 cores
        shift=1,  # no mirroring: left and right are words of the captions
        hard_negatives=1.0, hard_negative_weights=(0.0, 1.0, 1.0),  # one caption with colour or position changed
        exhaustive_negatives=("shape",),  # and the caption under every other shape
        center_init=1024,  # both towers start centred on 1,024 examples: one word moves a caption's embedding
        lock_text_steps=750),  # the text tower stays at its start for the first half (LiT-style)
}
# Image folders: the shapes preset without its label-driven negatives (a folder has captions only); at 64 pixels the
# ViT reads 16x16 patches, so it sees the 16 tokens (and costs the time) of the 32-pixel preset
PRESETS["folder"] = dataclasses.replace(PRESETS["shapes"], hard_negatives=0.0, exhaustive_negatives=())
PRESETS["folder-64"] = dataclasses.replace(PRESETS["folder"], model=dataclasses.replace(
    PRESETS["folder"].model, vision=dataclasses.replace(PRESETS["folder"].model.vision, patch_size=16)))


def fit_to_data(cfg: CLIPStage, ds) -> CLIPStage:
    """The stage config with the ViT's channels and image size taken from the dataset (checked)."""
    h, w = ds.image_size
    if h != w:
        raise ValueError(f"{ds.name}: CLIP's ViT needs square images, got {h}x{w}; load the data with a square "
                         "image_size")
    if cfg.hflip and "position" in ds.labels:
        raise ValueError(f"hflip=true would contradict the left/right positions in {ds.name}'s captions; "
                         "use --preset shapes (or --set hflip=false)")
    labelled = ds.name.startswith("shapes") and set(HARD_NEGATIVE_ATTRIBUTES) <= set(ds.labels)
    if (cfg.hard_negatives > 0 or cfg.exhaustive_negatives) and not labelled:
        raise ValueError(f"hard_negatives={cfg.hard_negatives} rewrites shapes captions from their attribute labels; "
                         f"{ds.name} has none: use --set hard_negatives=0")
    if cfg.shape_twins and (not labelled or "jitter" not in ds.meta):
        raise ValueError(f"shape_twins=true redraws generated shapes scenes; {ds.name} is not one: "
                         "use --set shape_twins=false")
    vision = dataclasses.replace(cfg.model.vision, channels=ds.channels, image_size=h)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vision=vision))


def caption_sample(ds, n: int, seed: int) -> list[str]:
    """`n` training captions of randomly chosen examples, seeded (the tokenizer's training text)."""
    rng = random.Random(seed)
    return [ds.caption(rng.randrange(len(ds)), rng) for _ in range(n)]


def prepare_tokenizer(cfg: CLIPStage, ds, out: Path, run, resume: bool, init_from: str | None) -> Tokenizer:
    """Load DIR/tokenizer.json (resume) or the --init-from run's, else train one; rank 0 writes it atomically."""
    path = out / "tokenizer.json"
    if resume or init_from:
        src = path if resume else Path(init_from) / "tokenizer.json"
        if not src.is_file():
            raise FileNotFoundError(f"{src} not found: {'--resume' if resume else '--init-from'} needs the "
                                    "tokenizer of that CLIP run; start a fresh run with another --out")
        tok = Tokenizer.load(src)
    elif run.is_main:
        texts = caption_sample(ds, cfg.tokenizer_captions, cfg.train.seed)
        tok = train_tokenizer(texts, cfg.tokenizer_vocab, cfg.model.text.max_length)
    if run.is_main and not resume:
        with atomic_path(path) as tmp:
            tok.save(tmp)
    if run.world > 1:
        dist.barrier()
        if not run.is_main and not (resume or init_from):
            tok = Tokenizer.load(path)
    return tok


def noisy_caption(caption: str, rng: random.Random, p: float) -> str:
    """With probability p, 1-3 random lower-case strings (3-8 letters) inserted between the caption's words.

    They stand for words the tokenizer never saw (which it splits into rarely trained pieces), so the text tower
    learns to read the caption's content through unknown words instead of relying on the exact training wordings.
    """
    if p <= 0 or rng.random() >= p:
        return caption
    words = caption.split(" ")
    for _ in range(rng.randint(1, 3)):
        junk = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))
        words.insert(rng.randint(0, len(words)), junk)
    return " ".join(words)




def centre(model: CLIPModel, ds, n: int, seed: int, run) -> None:
    """CLIPModel.center_ on n seeded training examples and captions (the same on every rank; a resumed or
    --init-from run then loads its weights over it)."""
    rng = random.Random(example_seed(seed, 0, CENTRE_STREAM))
    idx = [rng.randrange(len(ds)) for _ in range(min(n, len(ds)))]
    ids, mask = model.tokenize([ds.caption(i, rng) for i in idx])
    stats = model.center_(ds.to_float(ds.images[idx]).to(run.device), ids, mask)
    if run.is_main:
        print("centred start: mean pair cosine " + ", ".join(
            f"{t} {stats[f'{t}_cosine_before']:.3f} -> {stats[f'{t}_cosine_after']:.3f}" for t in ("image", "text")),
              file=sys.stderr)


def augment(x: torch.Tensor, gidx: torch.Tensor, seed: int, shift: int, hflip: bool) -> torch.Tensor:
    """Per-example random translation by up to `shift` px (edge pixels replicated) and optional mirror.

    Draws are seeded by (seed, global sample index), so they do not depend on batch layout or resumption.
    """
    if shift == 0 and not hflip:
        return x
    B, C, H, W = x.shape
    rngs = [random.Random(example_seed(seed, int(g), AUGMENT_STREAM)) for g in gidx]
    d = torch.tensor([[r.randint(-shift, shift), r.randint(-shift, shift), hflip and r.random() < 0.5]
                      for r in rngs])  # (B, 3): dy, dx, flip
    xp = F.pad(x, (shift, shift, shift, shift), mode="replicate")  # (B, C, H + 2s, W + 2s)
    rows = torch.arange(H) + shift - d[:, :1]  # (B, H) source rows
    cols = torch.arange(W) + shift - d[:, 1:2]  # (B, W) source columns
    cols = torch.where(d[:, 2:].bool(), cols.flip(1), cols)  # mirrored rows read right to left
    b = torch.arange(B)[:, None, None]
    out = xp[b, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, world: int,
                     neg: torch.Tensor | None = None, neg_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The CLIP loss of the global batch in fp32, to backpropagate; its value is `world` times the mean loss.

    With W processes the negatives span every rank. Each rank's features carry only their own share of the
    full-batch gradient, so the loss is multiplied by W and DDP's gradient mean gives the towers the full-batch
    gradient; the temperature, which every rank sees whole, has its gradient divided by W to match. A multi-process
    run thus takes the steps of a single process at the same global batch.
    """
    img, txt = img.float(), txt.float()
    neg = None if neg is None else neg.float()
    if world == 1:
        return clip_loss(img, txt, scale, neg, neg_mask).mean()
    all_img, offset = gather_features(img)  # (N, E), no gradient
    all_txt, _ = gather_features(txt)
    all_neg = all_mask = None
    if neg is not None:
        all_neg, _ = gather_features(neg)
        all_mask = gather_features(neg_mask.float())[0].bool()  # (N, K)
    scale = scale.detach() + (scale - scale.detach()) / world  # same value, 1/W of the gradient
    return world * clip_loss_gathered(img, txt, all_img, all_txt, offset, scale, neg, all_neg, all_mask).mean()


def default_preset(spec: str) -> str:
    """The preset `ldmkit train clip` uses when --preset is not given: the data's own ("shapes" for the generated
    shapes, whose left/right captions forbid the mirroring of the Fashion-MNIST preset), else "fashion-mnist"."""
    return "shapes" if spec == "shapes" else "fashion-mnist"


def main(argv: list[str] | None = None) -> int:
    return stage_main("ldmkit train clip", __doc__, PRESETS, train, argv, preset_by_data=default_preset)


def train(cfg: CLIPStage, out, spec: str, ds, resume: bool = False, init_from: str | None = None,
          progress: bool = True) -> dict:
    cfg = fit_to_data(cfg, ds)
    tc, out = cfg.train, Path(out)
    run = common.start_run(out, cfg, tc, "clip", data=spec, dataset=ds, resume=resume, init_from=init_from,
                           progress=progress)
    tok = prepare_tokenizer(cfg, ds, out, run, resume, init_from)
    model = CLIPModel(cfg.model, tok).to(run.device)
    if cfg.center_init:
        centre(model, ds, cfg.center_init, tc.seed, run)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    net = common.wrap_ddp(model, run.device)
    opt = common.make_adamw(model.parameters(), tc)
    text_params = [*model.text.parameters(), *model.text_proj.parameters()]
    allowed = training_pairs(ds) if cfg.shape_twins or cfg.exhaustive_negatives else set()
    # negatives per example: the same on every rank, so the gathered (N, K, E) tensors line up
    K = (cfg.hard_negatives > 0) + sum(len(ds.label_names[a]) - 1 for a in cfg.exhaustive_negatives)
    start = run.restore({"model": model, "ema": ema}, {"opt": opt})
    export = ema if tc.ema_halflife_steps > 0 else model
    step, loss, scale = start, torch.zeros(()), model.logit_scale()
    for step in run.steps(start, tc.steps):
        idx, gidx = common.batch_indices(len(ds), tc.batch_size, step, tc.seed, run.rank, run.world)
        x = augment(ds.to_float(ds.images[idx]), gidx, tc.seed, cfg.shift, cfg.hflip).to(run.device)
        x, captions, negatives = batch_captions(cfg, ds, idx, gidx, x, allowed)
        locked = step < cfg.lock_text_steps
        common.set_lr(opt, common.lr_at(step, tc))
        img, txt, neg, neg_mask, scale = encode_batch(net, model, x, captions, negatives, K, locked, tc.precision)
        loss = contrastive_loss(img, txt, scale, run.world, neg, neg_mask)
        loss.backward()
        if locked:
            for p in text_params:
                p.grad = None  # AdamW leaves parameters without a gradient untouched (no decay, no moments)
        common.clip_grad(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.clamp_logit_scale_()
        common.ema_update(ema, model, tc.ema_halflife_steps)
        run.log(step, loss=loss.item() / run.world, logit_scale=scale.item(), lr=opt.param_groups[0]["lr"])
        if run.should(tc.ckpt_every, step):
            run.save(step + 1, {"model": model, "ema": ema}, {"opt": opt}, export.state_dict())
        step += 1
    metrics = {"final_loss": loss.item() / run.world, "logit_scale": model.logit_scale().item(),
               "params": sum(p.numel() for p in model.parameters())}
    if run.is_main and cfg.eval_images:
        metrics.update(quick_metrics(export.eval(), spec, ds, cfg.eval_images))
    return run.finish(export.state_dict(), metrics, step)


def batch_captions(cfg: CLIPStage, ds, idx: torch.Tensor, gidx: torch.Tensor, x: torch.Tensor, allowed: set):
    """The batch's captions and text negatives, each example's drawn from its own seeded stream; with shape twins
    the images grow by a redrawn copy of each scene. Returns (images, captions, negatives per example as
    (single hard negatives, exhaustive negatives))."""
    tc = cfg.train
    rngs = [random.Random(example_seed(tc.seed, int(g), CAPTION_STREAM)) for g in gidx]
    captions, singles, extras, states = [], [], [], []
    for i, r in zip(idx.tolist(), rngs):
        state = r.getstate()
        states.append(state)
        captions.append(noisy_caption(ds.caption(i, r), r, cfg.caption_noise))
        one = hard_negative(ds, i, state, r, cfg.hard_negatives, captions[-1], cfg.hard_negative_weights) \
            if cfg.hard_negatives else None
        singles.append([] if one is None else [one])
        extras.append(exhaustive_negatives(ds, i, state, cfg.exhaustive_negatives, allowed))
    if cfg.shape_twins:
        twins = [shape_twin(ds, i, st, random.Random(example_seed(tc.seed, int(g), TWIN_STREAM)), allowed)
                 for i, st, g in zip(idx.tolist(), states, gidx)]
        drawn = redraw(ds, idx, shape=[v["shape"] for v, _ in twins], color=[v["color"] for v, _ in twins])
        x = torch.cat([x, augment(ds.to_float(drawn), gidx, tc.seed, cfg.shift, cfg.hflip).to(x.device)])
        captions += [c for _, c in twins]
        singles += [[] for _ in twins]
        extras += [[] for _ in twins]
    return x, captions, list(zip(singles, extras))


def encode_batch(net, model, x: torch.Tensor, captions: list[str], negatives, K: int, locked: bool,
                 precision: str):
    """Image features, caption features, and the (B, K, E) negatives with their (B, K) mask (None when K = 0).

    Each distinct caption is encoded once, through the towers' forward; while the text tower is locked the
    exhaustive negatives (five times as many captions) are encoded without a graph, as their gradient would be
    dropped anyway (with no graph after the lock too, a step is half as long but the text tower learns less)."""
    device = x.device
    singles, extras = [a for a, _ in negatives], [b for _, b in negatives]
    graded = captions + [n for ns in singles for n in ns] + ([] if locked else [n for ns in extras for n in ns])
    distinct = {c: k for k, c in enumerate(dict.fromkeys(graded))}
    ids, mask = model.tokenizer(list(distinct))
    with common.autocast(device, precision):
        img, txt_all, scale = net(x, ids.to(device), mask.to(device))  # (B, E), (U, E), ()
        if locked:
            for ns in extras:
                distinct.update((n, len(distinct)) for n in ns if n not in distinct)
            new = list(distinct)[txt_all.shape[0]:]
            if new:
                with torch.no_grad():
                    ex_ids, ex_mask = model.tokenizer(new)
                    txt_all = torch.cat([txt_all, model.encode_text(ex_ids.to(device), ex_mask.to(device))])
    txt = txt_all[torch.tensor([distinct[c] for c in captions], device=device)]  # (B, E)
    if not K:
        return img, txt, None, None, scale
    rows = [a + b for a, b in negatives]  # B doubles with twins, whose rows have none
    neg_mask = torch.tensor([[k < len(ns) for k in range(K)] for ns in rows], device=device)
    neg = txt_all[torch.tensor([[distinct[ns[k]] if k < len(ns) else 0 for k in range(K)] for ns in rows],
                               device=device)]
    return img, txt, neg, neg_mask, scale
