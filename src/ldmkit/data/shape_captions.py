"""Captions for the generated shapes: the attribute vocabulary and varied wordings of one scene.

A scene has five attributes (shape, color, size, position, background). Every caption names the shape and the
colour; size, position and background are each named with probability `P_MENTION`, in one of several sentence
shapes and word choices, so the model sees "a small red circle in the top left" as well as
"top-left corner: a red circle, small, on a black background". With rng=None the caption is the canonical one
(all attributes, first wording), which evaluation uses.
"""

from __future__ import annotations

import random

SHAPES = ["circle", "square", "triangle", "diamond", "star", "cross"]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
SIZES = ["small", "medium", "large"]
# 3x3 grid, row-major from the top left; index = row * 3 + col
POSITIONS = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]
BACKGROUNDS = ["black", "white", "gray", "navy"]

P_MENTION = 0.85  # probability that size / position / background is named in a training caption

# Wordings of each attribute value (the first is canonical). Background and size words never contain a colour
# or shape word, so a caption's shape and colour can be read back unambiguously.
SHAPE_WORDS = {"circle": ["circle", "disc"], "square": ["square"], "triangle": ["triangle"],
               "diamond": ["diamond", "rhombus"], "star": ["star"], "cross": ["cross", "plus sign"]}
SIZE_WORDS = {"small": ["small", "little", "tiny"], "medium": ["medium", "medium-sized", "mid-sized"],
              "large": ["large", "big"]}
BACKGROUND_WORDS = {"black": ["black"], "white": ["white"], "gray": ["gray", "grey"], "navy": ["navy"]}
# position -> (phrase after the object, e.g. "in the top left"; label at the start of a sentence)
POSITION_WORDS = {
    "top left": (["in the top left", "in the top-left corner", "at the upper left"], ["top left", "top-left"]),
    "top": (["at the top", "at the top center", "in the upper middle"], ["top", "top center"]),
    "top right": (["in the top right", "in the top-right corner", "at the upper right"], ["top right", "top-right"]),
    "left": (["on the left", "at the middle left", "on the left side"], ["left", "middle left"]),
    "center": (["in the center", "in the middle", "in the centre"], ["center", "middle"]),
    "right": (["on the right", "at the middle right", "on the right side"], ["right", "middle right"]),
    "bottom left": (["in the bottom left", "in the bottom-left corner", "at the lower left"],
                    ["bottom left", "bottom-left"]),
    "bottom": (["at the bottom", "at the bottom center", "in the lower middle"], ["bottom", "bottom center"]),
    "bottom right": (["in the bottom right", "in the bottom-right corner", "at the lower right"],
                     ["bottom right", "bottom-right"]),
}


def _a(word: str) -> str:
    """Indefinite article for the word that follows it."""
    return "an" if word[:1] in "aeiou" else "a"


def _join(*parts: str | None) -> str:
    return " ".join(p for p in parts if p)


def _np(size, color, shape, form: int) -> str:
    """Noun phrase for the object: 'a small red circle', 'a red circle, small,', 'a small circle painted red'."""
    if form == 0 or (form == 1 and size is None):
        head = _join(size, color, shape)
        return f"{_a(head)} {head}"
    if form == 1:
        return f"{_a(color)} {color} {shape}, {size},"
    head = _join(size, shape)
    return f"{_a(head)} {head} {'painted' if form == 2 else 'in'} {color}"


def _sentence(size, color, shape, pos, label, bg, pattern: int) -> str:
    """One of five sentence shapes; missing attributes (None) are left out."""
    on_bg = f"on a {bg} background" if bg else None
    if pattern == 0:  # object first: 'a small red circle in the top left on a black background'
        return _join(_np(size, color, shape, 0), pos, on_bg)
    if pattern == 1:  # position label first: 'top-left: a red circle, small, on a black background'
        text = _join(_np(size, color, shape, 1), on_bg).rstrip(",")
        return f"{label}: {text}" if label else text
    if pattern == 2:  # background first: 'a black background with a small circle painted red in the top left'
        lead = f"{_a(bg)} {bg} background with" if bg else None
        return _join(lead, _np(size, color, shape, 2), pos)
    if pattern == 3:  # 'a small star in orange at the top on a navy background'
        return _join(_np(size, color, shape, 3), pos, on_bg)
    # pattern 4, list style: 'red circle, small, top left, black background'
    return ", ".join(p for p in [f"{color} {shape}", size, label, f"{bg} background" if bg else None] if p)


def shape_caption(shape: int, color: int, size: int, position: int, background: int,
                  rng: random.Random | None = None) -> str:
    """Caption of one scene given its attribute indices; canonical wording when rng is None."""
    s, c = SHAPES[shape], COLORS[color]
    z, p, b = SIZES[size], POSITIONS[position], BACKGROUNDS[background]
    if rng is None:
        return _sentence(z, c, s, POSITION_WORDS[p][0][0], None, b, 0)
    shape_w = rng.choice(SHAPE_WORDS[s])
    size_w = rng.choice(SIZE_WORDS[z]) if rng.random() < P_MENTION else None
    bg_w = rng.choice(BACKGROUND_WORDS[b]) if rng.random() < P_MENTION else None
    phrases, labels = POSITION_WORDS[p]
    with_pos = rng.random() < P_MENTION
    pos_w, label_w = (rng.choice(phrases), rng.choice(labels)) if with_pos else (None, None)
    return _sentence(size_w, c, shape_w, pos_w, label_w, bg_w, rng.randrange(5))
