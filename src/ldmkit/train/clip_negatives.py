"""Shapes captions that contrast one fact: hard negatives (NegCLIP-style), exhaustive negatives, shape twins.

Each rewrites a generated shapes scene's caption from its attribute labels in the positive's wording (the caption
rng's state before the positive was drawn), and never names a held-out shape-colour pair where noted.
"""

from __future__ import annotations

import random

from ldmkit.data.shape_captions import shape_caption

HARD_NEGATIVE_ATTRIBUTES = ("shape", "color", "position")  # the attributes a hard-negative caption changes


def hard_negative(ds, i: int, state: tuple, rng: random.Random, p: float, positive: str,
                  weights: tuple[float, ...] = (1.0, 1.0, 1.0)) -> str | None:
    """With probability p, a caption of example i's scene with its shape, colour or position changed (chosen with
    the relative odds `weights`), else None.

    `state` is the state the caption rng had before it drew the positive caption, so the negative repeats the
    positive's wording wherever the changed word allows (Python's choice among a different number of synonyms can
    shift later draws). Shape and colour are always named, so those negatives are always false for the image; a
    position negative equals the positive when the caption left the position out, and is then dropped (None).
    Contrasting an image with its own caption with one fact changed (NegCLIP, Yuksekgonul et al. 2023) puts the
    whole weight of that term on the changed fact, where random in-batch negatives mostly differ in the easy ones
    (colour, background). It does not replace a ViT that can see position (`ViTConfig.pos_init`).
    """
    if p <= 0 or rng.random() >= p:
        return None
    attribute = rng.choices(HARD_NEGATIVE_ATTRIBUTES, weights=weights)[0]
    choices = [v for v in range(len(ds.label_names[attribute])) if v != int(ds.labels[attribute][i])]
    negative = recaption(ds, i, state, **{attribute: rng.choice(choices)})
    return None if negative == positive else negative


def recaption(ds, i: int, state: tuple, **changes: int) -> str:
    """Example i's caption with some attribute values replaced, in the wording the caption rng `state` gives."""
    values = {k: int(ds.labels[k][i]) for k in ("shape", "color", "size", "position", "background")}
    values.update(changes)
    wording = random.Random()
    wording.setstate(state)
    return shape_caption(**values, rng=wording)


def exhaustive_negatives(ds, i: int, state: tuple, attributes: tuple[str, ...], allowed: set) -> list[str]:
    """Example i's caption once with every other value of each listed attribute, in the positive's wording: the
    image-to-text softmax then holds every alternative of that fact, as a supervised classifier's would, so the
    image tower gets the full-strength gradient for it from the first step. A single random hard negative
    contrasts one alternative at a time, and in-batch negatives almost never differ in that fact alone.

    Captions naming a held-out (shape, colour) pair are left out (`allowed`: training_pairs), so training text
    never puts those words together either; the list is shorter for such examples (masked in the loss).
    """
    out = []
    for a in attributes:
        for v in range(len(ds.label_names[a])):
            if v == int(ds.labels[a][i]):
                continue
            pair = {"shape": int(ds.labels["shape"][i]), "color": int(ds.labels["color"][i]), a: v}
            if (pair["shape"], pair["color"]) in allowed:
                out.append(recaption(ds, i, state, **{a: v}))
    return out


def training_pairs(ds) -> set[tuple[int, int]]:
    """(shape, colour) index pairs the training split may show: all but the held-out ones."""
    shapes, colors = ds.label_names["shape"], ds.label_names["color"]
    held = {(shapes.index(a), colors.index(b)) for a, b in ds.meta.get("heldout", [])}
    return {(a, b) for a in range(len(shapes)) for b in range(len(colors))} - held


def shape_twin(ds, i: int, state: tuple, rng: random.Random, allowed: set) -> tuple[dict, str]:
    """Example i's scene with another shape (another colour when its colour has no other training shape), never a
    held-out pair: (attribute values, caption in the positive's wording, from the caption rng `state`).

    Unlike a text-only hard negative, whose pull on the image tower is the difference between two text embeddings
    (near zero while the text tower cannot tell the shape words apart), a redrawn twin in the batch asks the image
    tower directly to embed two images that differ only in shape apart: its caption has to pick its own image.
    """
    values = {k: int(ds.labels[k][i]) for k in ("shape", "color", "size", "position", "background")}
    s0, c0 = values["shape"], values["color"]
    shapes = [s for s in range(len(ds.label_names["shape"])) if s != s0 and (s, c0) in allowed]
    if shapes:
        values["shape"] = rng.choice(shapes)
    else:
        values["color"] = rng.choice([c for c in range(len(ds.label_names["color"])) if c != c0 and (s0, c) in allowed])
    return values, recaption(ds, i, state, **values)
