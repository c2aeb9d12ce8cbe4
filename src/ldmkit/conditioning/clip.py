"""CLIP (Radford et al. 2021): a ViT image tower and a text tower projected into one L2-normalised space.

Trained with the symmetric InfoNCE loss over in-batch negatives, `clip_loss`; the temperature is learned as
log(logit_scale), initialised at log(1 / 0.07) and clamped so the scale never exceeds 100 (paper, section 2.5).
`clip_loss_gathered` spans the negatives over all ranks of a distributed job. The tokenizer lives on the model
(`model.tokenizer`): strings go in through `encode_prompts` and through the frozen text-encoder view returned by
`text_encoder()`, which implements the conditioning interface

    encode(prompts) -> {"context": (B, T, text width)  per-token states of the text tower after its final LayerNorm,
                        "context_mask": (B, T) bool    True = real token,
                        "pooled": (B, embed_dim)        the CLIP text embedding: projected and L2-normalised}

Evaluation helpers (zero-shot classification, retrieval recall, CLIP score) are plain functions at the bottom.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ldmkit.conditioning.text import TextConfig, TextTransformer
from ldmkit.conditioning.tokenizer import Tokenizer
from ldmkit.conditioning.vit import ViT, ViTConfig


@dataclass(frozen=True)
class CLIPConfig:
    text: TextConfig = field(default_factory=TextConfig)  # text tower
    vision: ViTConfig = field(default_factory=ViTConfig)  # image tower
    embed_dim: int = 128  # shared embedding space E
    init_temperature: float = 0.07  # logit_scale starts at 1 / init_temperature
    max_logit_scale: float = 100.0  # logit_scale is clamped to at most this

    def __post_init__(self):
        if not (self.init_temperature > 0 and 1 / self.init_temperature <= self.max_logit_scale):
            raise ValueError(f"CLIPConfig.init_temperature={self.init_temperature} must be > 0 and give a scale "
                             f"1 / T <= max_logit_scale={self.max_logit_scale}")


# ---------------------------------------------------------------------------------------------------- losses


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float,
              hard_negatives: torch.Tensor | None = None, hard_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE with in-batch negatives -> per-example loss (B,).

    logits = logit_scale * I T^T (B, B); example i's loss is the mean of the cross-entropy of image i over all texts
    and of text i over all images, the pair (i, i) being the positive. The batch mean is the CLIP loss.

    hard_negatives (B, E) or (B, K, E), optional: one or K extra texts per image (e.g. its own caption with one
    attribute changed) that join only that image's image-to-text softmax, as further wrong answers (NegCLIP,
    Yuksekgonul et al. 2023); entries where hard_mask ((B,) or (B, K) bool) is False are absent. The
    text-to-image direction is unchanged.
    """
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise ValueError(f"clip_loss needs image and text features of the same shape (B, E), got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    logits = logit_scale * image_features @ text_features.T  # (B, B), row i = image i against every text
    labels = torch.arange(logits.shape[0], device=logits.device)
    i2t_logits = logits
    if hard_negatives is not None:
        neg = hard_negatives[:, None] if hard_negatives.ndim == 2 else hard_negatives  # (B, K, E)
        if neg.ndim != 3 or neg.shape[0] != image_features.shape[0] or neg.shape[2] != image_features.shape[1]:
            raise ValueError(f"hard_negatives {tuple(hard_negatives.shape)} must be (B, E) or (B, K, E) with the "
                             f"image features' {tuple(image_features.shape)}: one per image (or K per image)")
        extra = logit_scale * torch.einsum("be,bke->bk", image_features, neg)  # (B, K) image i against its own
        if hard_mask is not None:
            mask = hard_mask.to(torch.bool)
            mask = mask[:, None] if mask.ndim == 1 else mask
            if mask.shape != extra.shape:
                raise ValueError(f"hard_mask {tuple(hard_mask.shape)} does not match hard_negatives "
                                 f"{tuple(hard_negatives.shape)}")
            extra = extra.masked_fill(~mask, float("-inf"))  # exp(-inf) = 0: no such text
        i2t_logits = torch.cat([logits, extra], dim=1)  # (B, B + K)
    image_to_text = F.cross_entropy(i2t_logits, labels, reduction="none")  # (B,)
    text_to_image = F.cross_entropy(logits.T, labels, reduction="none")  # (B,)
    return 0.5 * (image_to_text + text_to_image)


def clip_loss_gathered(image_features: torch.Tensor, text_features: torch.Tensor,
                       all_image_features: torch.Tensor, all_text_features: torch.Tensor, offset: int,
                       logit_scale: torch.Tensor | float, hard_negatives: torch.Tensor | None = None,
                       all_hard_negatives: torch.Tensor | None = None,
                       all_hard_mask: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP loss over the global batch of a distributed job -> per-example loss (N,) for all N = sum of local B.

    `all_*_features` (N, E) are the features all-gathered from every rank (treated as constants; see
    `gather_features`) and `offset` is where this rank's B rows sit in them. The local rows are replaced by the
    local, gradient-carrying features, so negatives span every rank and this rank's loss has the exact gradient with
    respect to its own features. Every rank gets the same loss value; DDP's gradient mean over W ranks then gives
    the towers 1/W of the full-batch gradient and the temperature all of it (as open_clip does; with Adam the
    per-parameter scale is immaterial). Hard negatives (see `clip_loss`) are gathered and spliced the same way:
    local (B, [K,] E), gathered (N, [K,] E) and the gathered mask (N, [K]).
    """
    B, N = image_features.shape[0], all_image_features.shape[0]
    if all_image_features.shape != all_text_features.shape or all_image_features.shape[1:] != image_features.shape[1:]:
        raise ValueError(f"gathered features {tuple(all_image_features.shape)} / {tuple(all_text_features.shape)} "
                         f"do not match local features {tuple(image_features.shape)}")
    if not 0 <= offset <= N - B:
        raise ValueError(f"offset={offset} with local batch {B} does not fit in the gathered batch of {N}")

    def splice(local: torch.Tensor, gathered: torch.Tensor) -> torch.Tensor:
        gathered = gathered.detach()
        return torch.cat([gathered[:offset], local, gathered[offset + B:]])  # (N, E)

    negatives = None if hard_negatives is None else splice(hard_negatives, all_hard_negatives)
    return clip_loss(splice(image_features, all_image_features), splice(text_features, all_text_features),
                     logit_scale, negatives, all_hard_mask)


def gather_features(features: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather (B, ...) features from every rank -> ((W * B, ...) without gradient, this rank's offset).

    Needs the same local batch size on every rank. Without an initialised process group returns (features, 0).
    """

    if not (dist.is_available() and dist.is_initialized()):
        return features.detach(), 0
    parts = [torch.empty_like(features) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, features.detach().contiguous())
    return torch.cat(parts), dist.get_rank() * features.shape[0]


# ----------------------------------------------------------------------------------------------------- model


def _mean_pair_cosine(x: torch.Tensor) -> float:
    """Mean cosine similarity over the distinct pairs of rows of (N, D), N >= 2."""
    u = F.normalize(x.float(), dim=-1)
    n = u.shape[0]
    return ((u.sum(0).square().sum() - n) / (n * (n - 1))).item()


class CLIPModel(nn.Module):
    """Image and text towers with linear projections to a shared unit-norm space and a learned temperature."""

    def __init__(self, config: CLIPConfig, tokenizer: Tokenizer | None = None):
        super().__init__()
        self.config = config
        self.text = TextTransformer(config.text)
        self.vision = ViT(config.vision)
        self.text_proj = nn.Linear(config.text.width, config.embed_dim, bias=False)
        self.image_proj = nn.Linear(config.vision.width, config.embed_dim, bias=False)
        self.log_logit_scale = nn.Parameter(torch.zeros(()))  # log(logit_scale), learned
        self.tokenizer: Tokenizer | None = None
        self.initialize_weights()
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)

    def initialize_weights(self) -> None:
        """Towers initialise themselves; projections get std width^-0.5; temperature starts at init_temperature."""
        nn.init.normal_(self.text_proj.weight, std=self.config.text.width ** -0.5)
        nn.init.normal_(self.image_proj.weight, std=self.config.vision.width ** -0.5)
        with torch.no_grad():
            self.log_logit_scale.fill_(math.log(1.0 / self.config.init_temperature))

    @torch.no_grad()
    def center_(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
        """Data-dependent start: shift each tower's final LayerNorm bias so its pooled vector averages to zero over
        this sample of images and captions. Returns the mean cosine between sample pairs before and after.

        At random initialisation every caption shares most of its pooled vector (the template words, mean pooling
        over ~15 tokens), so two captions differing in one word have cosine ~0.97, and likewise every image looks
        alike to the image tower. The gradient that separates an attribute on one side is proportional to how far
        the other side already separates it, so a fact that neither side sees at the start (the shapes' shape) is
        learned very late. Removing the shared component (pooling is linear in the LayerNorm output, so the shift
        moves the pooled mean exactly) leaves only what differs between examples, and one word then moves the text
        embedding by a large angle. Nothing new is learned or stored: it is the towers' usual bias, started
        elsewhere.
        """
        stats = {}
        for name, tower, pooled in (("image", self.vision, self.vision(images)[0]),
                                    ("text", self.text, self.text(ids, mask)[1])):
            before = _mean_pair_cosine(pooled)
            tower.norm.bias -= pooled.mean(0)
            stats[f"{name}_cosine_before"], stats[f"{name}_cosine_after"] = before, _mean_pair_cosine(
                pooled - pooled.mean(0))
        return stats

    def set_tokenizer(self, tokenizer: Tokenizer) -> None:
        cfg = self.config.text
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"tokenizer vocabulary ({tokenizer.vocab_size}) exceeds text.vocab_size="
                             f"{cfg.vocab_size}; raise text.vocab_size or train a smaller tokenizer")
        if tokenizer.max_length > cfg.max_length:
            raise ValueError(f"tokenizer max_length={tokenizer.max_length} exceeds text.max_length="
                             f"{cfg.max_length}; make them agree")
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return self.log_logit_scale.device

    def logit_scale(self) -> torch.Tensor:
        """exp(log_logit_scale), clamped at max_logit_scale (no gradient beyond the clamp)."""
        return self.log_logit_scale.exp().clamp(max=self.config.max_logit_scale)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Pull the raw parameter back to log(max_logit_scale); call after each optimiser step so it never sticks."""
        self.log_logit_scale.clamp_(max=math.log(self.config.max_logit_scale))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> unit-norm (B, E)."""
        pooled, _ = self.vision(images)  # (B, Dv)
        return F.normalize(self.image_proj(pooled), dim=-1)  # (B, E)

    def image_condition(self, images: torch.Tensor, tokens: bool = False) -> torch.Tensor:
        """What a denoiser prompted by images reads: the unit image embedding (B, E), or with `tokens` the image
        tower's last-layer tokens (B, N, Dv), which keep where things are and not only what they are."""
        return self.vision(images)[1] if tokens else self.encode_image(images)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor | None = None, chunk: int = 256) -> torch.Tensor:
        """Token ids (B, T) + mask -> unit-norm (B, E).

        Padding never changes a row's result (padded keys are masked out), so the padded work is skipped: rows are
        sorted by length and encoded `chunk` at a time, each group cut to its own longest row. With captions of
        mixed lengths (e.g. a few long noisy ones) this saves much of the text tower's cost; the result is the
        same up to float rounding. Groups of 256 rather than 64: at 2 threads the small groups' matrix products
        left the second core idle (628 shapes captions, forward + backward, bf16: 471 ms in groups of 64, 277 ms in
        groups of 256, 326 ms in one group).
        """
        if mask is None or mask.ndim != 2 or mask.shape[0] == 0 or mask.shape != ids.shape:
            _, pooled = self.text(ids, mask)  # (B, Dt); the tower checks the inputs
            return F.normalize(self.text_proj(pooled), dim=-1)
        lengths = mask.sum(1)  # (B,)
        order = torch.argsort(lengths, stable=True) if ids.shape[0] > chunk else None
        rows = torch.arange(ids.shape[0], device=ids.device) if order is None else order
        parts = []
        for group in rows.split(max(chunk, 1)):
            T = max(int(lengths[group].max()), 1)  # trailing all-padding columns of this group
            _, pooled = self.text(ids[group, :T], mask[group, :T])  # (b, Dt)
            parts.append(pooled)
        pooled = torch.cat(parts)  # (B, Dt) in `rows` order
        if order is not None:
            pooled = pooled[torch.argsort(order)]  # back to the input order
        return F.normalize(self.text_proj(pooled), dim=-1)  # (B, E)

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise RuntimeError("this CLIPModel has no tokenizer; pass one to CLIPModel(config, tokenizer) "
                               "or call set_tokenizer(Tokenizer.load('<stage dir>/tokenizer.json'))")
        return self.tokenizer

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self._require_tokenizer()(prompts)
        return ids.to(self.device), mask.to(self.device)

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Strings -> unit-norm (B, E) through the model's tokenizer."""
        return self.encode_text(*self.tokenize(prompts))

    def forward(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None):
        """-> (image features (B, E), text features (B, E), logit_scale ()); feed them to clip_loss."""
        return self.encode_image(images), self.encode_text(ids, mask), self.logit_scale()

    def text_encoder(self) -> "CLIPTextEncoder":
        """A frozen snapshot of the text tower (+ projection and tokenizer) implementing the text-encoder interface."""
        return CLIPTextEncoder(self.text, self.text_proj, self._require_tokenizer())


class CLIPTextEncoder(nn.Module):
    """Frozen CLIP text tower: encode(prompts) -> {"context", "context_mask", "pooled"} (see the module docstring).

    Holds deep copies of the text tower and projection (later CLIP training does not change it), with
    requires_grad=False, permanently in eval mode; encode runs without autograd.
    """

    def __init__(self, text: TextTransformer, text_proj: nn.Linear, tokenizer: Tokenizer):
        super().__init__()
        self.text = copy.deepcopy(text)
        self.text_proj = copy.deepcopy(text_proj)
        self.tokenizer = tokenizer
        self.context_dim = text.config.width
        self.pooled_dim = text_proj.out_features
        self.max_length = tokenizer.max_length
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "CLIPTextEncoder":
        return super().train(False)  # frozen: always in eval mode

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        ids, mask = self.tokenizer(prompts)
        device = self.text_proj.weight.device
        ids, mask = ids.to(device), mask.to(device)
        states, pooled = self.text(ids, mask)  # (B, T, Dt), (B, Dt)
        return {"context": states, "context_mask": mask, "pooled": F.normalize(self.text_proj(pooled), dim=-1)}


# ------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def zero_shot_classifier(model: CLIPModel, class_names: Sequence[str], templates: Sequence[str],
                         fill: Callable[[str, str], str] | None = None) -> torch.Tensor:
    """Class embeddings (C, E) with prompt ensembling (Radford et al. 2021, section 3.1.4).

    Each class's prompts `fill(template, name)` (default `template.format(name)`) are embedded and L2-normalised;
    their mean is renormalised.
    """
    if not templates or not class_names:
        raise ValueError("zero_shot_classifier needs at least one class name and one template")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"templates {bad} have no '{{}}' slot for the class name")
    fill = fill or (lambda template, name: template.format(name))
    rows = []
    for name in class_names:
        emb = model.encode_prompts([fill(t, name) for t in templates])  # (K, E), unit rows
        rows.append(F.normalize(emb.mean(0), dim=-1))  # (E,)
    return torch.stack(rows)  # (C, E)


def _check_images(images: torch.Tensor, n: int, what: str) -> None:
    if not images.is_floating_point():
        raise ValueError(f"images must be float in [-1, 1], got {images.dtype}; convert with dataset.to_float")
    if images.shape[0] != n:
        raise ValueError(f"{images.shape[0]} images but {n} {what}; they must pair one to one")


@torch.no_grad()
def zero_shot_accuracy(model: CLIPModel, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
                       templates: Sequence[str], batch_size: int = 256,
                       fill: Callable[[str, str], str] | None = None) -> float:
    """Top-1 zero-shot accuracy: each image gets the class whose ensembled text embedding is most similar."""
    _check_images(images, labels.shape[0], "labels")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(class_names)):
        raise ValueError(f"labels must lie in [0, {len(class_names)}) to index class_names")
    weights = zero_shot_classifier(model, class_names, templates, fill)  # (C, E)
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        feats = model.encode_image(images[i:i + batch_size].to(model.device))  # (b, E)
        pred = (feats @ weights.T).argmax(1).cpu()  # (b,)
        correct += int((pred == labels[i:i + batch_size].cpu()).sum())
    return correct / max(images.shape[0], 1)


def retrieval_recall(image_feats: torch.Tensor, text_feats: torch.Tensor,
                     ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Recall@k of paired retrieval (image i matches text i) in both directions, as fractions in [0, 1].

    Similarity is the dot product (pass unit-norm features). The rank of the true match counts the candidates that
    score strictly higher, so ties count in its favour. Keys: i2t_r{k} (image -> text), t2i_r{k} (text -> image).
    """
    if image_feats.ndim != 2 or image_feats.shape != text_feats.shape:
        raise ValueError(f"paired features must share one shape (N, E), got {tuple(image_feats.shape)} and "
                         f"{tuple(text_feats.shape)}")
    sim = image_feats.float() @ text_feats.float().T  # (N, N)
    true = sim.diagonal()  # (N,)
    i2t_rank = (sim > true[:, None]).sum(1)  # (N,) texts beating the paired text, per image
    t2i_rank = (sim > true[None, :]).sum(0)  # (N,) images beating the paired image, per text
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = (i2t_rank < k).float().mean().item()
    for k in ks:
        out[f"t2i_r{k}"] = (t2i_rank < k).float().mean().item()
    return out


@torch.no_grad()
def clip_score(model: CLIPModel, images: torch.Tensor, prompts: Sequence[str], batch_size: int = 256) -> float:
    """CLIP score: mean over pairs of 100 * max(cos(image_i, prompt_i), 0) (Hessel et al. 2021, with w = 100)."""
    _check_images(images, len(prompts), "prompts")
    total = 0.0
    for i in range(0, images.shape[0], batch_size):
        img = model.encode_image(images[i:i + batch_size].to(model.device))  # (b, E)
        txt = model.encode_prompts(list(prompts[i:i + batch_size]))  # (b, E)
        total += float((100.0 * (img * txt).sum(-1).clamp_min(0)).sum())
    return total / max(images.shape[0], 1)


PRESETS = {
    "tiny": CLIPConfig(
        text=TextConfig(vocab_size=512, max_length=16, width=32, layers=2, heads=2),
        vision=ViTConfig(image_size=32, channels=1, patch_size=8, width=32, layers=2, heads=2),
        embed_dim=32),
    "fashion-mnist": CLIPConfig(
        text=TextConfig(vocab_size=1024, max_length=32, width=128, layers=3, heads=4),
        vision=ViTConfig(image_size=32, channels=1, patch_size=4, width=128, layers=4, heads=4, pool="mean"),
        embed_dim=128),
    "shapes": CLIPConfig(
        text=TextConfig(vocab_size=1024, max_length=32, width=192, layers=4, heads=6),
        vision=ViTConfig(image_size=32, channels=3, patch_size=4, width=192, layers=6, heads=6, pool="mean"),
        embed_dim=192),
}
