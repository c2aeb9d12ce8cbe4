"""Fashion-MNIST captions: class phrases, training and held-out prompt templates, and prompt -> class parsing.

Training captions are `TRAIN_TEMPLATES` filled with a class phrase. `HELDOUT_TEMPLATES` are further wordings
(new templates and paraphrases of the training ones) that no training caption uses; evaluation can prompt with
them to measure whether the text conditioning generalises beyond the exact training sentences.
`parse_class` recovers the class a free-form prompt names (the sampling CLI uses it to fill labels).
"""

from __future__ import annotations

import random
import re

# Fashion-MNIST label order (index = label value in the idx files), as lower-case phrases
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat",
                   "sandal", "shirt", "sneaker", "bag", "ankle boot"]

# Wordings used to caption training images ("{}" = class phrase; "a {}" becomes "an {}" before a vowel)
TRAIN_TEMPLATES = [
    "a photo of a {}",
    "a {}",
    "{}",
    "a picture of a {}",
    "an image of a {}",
    "a black and white photo of a {}",
    "a grayscale image of a {}",
    "a photo of the {}",
    "a close-up photo of a {}",
    "a small photo of a {}",
    "this is a {}",
    "a product photo of a {}",
]

# Never used for training captions. The first five are new sentence shapes, the rest paraphrase training ones.
HELDOUT_TEMPLATES = [
    "a low-resolution catalogue picture showing a {}",
    "someone is selling this {}",
    "the item in the picture is a {}",
    "a {} on a plain black background",
    "a centered thumbnail of a {}",
    "a snapshot of a {}",
    "an illustration of a {}",
    "a monochrome photograph of a {}",
    "here is a {}",
    "a shop photo of one {}",
]

_ARTICLE_BEFORE_SLOT = re.compile(r"(?<![A-Za-z])([Aa]) \{\}")


def fill_template(template: str, phrase: str) -> str:
    """`template.format(phrase)` with the article fixed: "a {}" + "ankle boot" -> "an ankle boot"."""
    if "{}" not in template:
        raise ValueError(f"caption template {template!r} has no '{{}}' slot for the class phrase")
    if phrase[:1].lower() in "aeiou":
        template = _ARTICLE_BEFORE_SLOT.sub(lambda m: m.group(1) + "n {}", template)
    return template.format(phrase)


def fashion_prompt(class_index: int, template: str = TRAIN_TEMPLATES[0]) -> str:
    """The prompt for a Fashion-MNIST class with one template: (9, "a photo of a {}") -> "a photo of an ankle boot"."""
    if not 0 <= int(class_index) < len(FASHION_CLASSES):
        raise ValueError(f"Fashion-MNIST class index must be in 0..9, got {class_index}")
    return fill_template(template, FASHION_CLASSES[int(class_index)])


def captions_for_label(class_index: int, templates: list[str] | None = None) -> list[str]:
    """Every caption of a class under `templates` (default TRAIN_TEMPLATES), in template order."""
    return [fashion_prompt(class_index, t) for t in (TRAIN_TEMPLATES if templates is None else templates)]


def fashion_caption(class_index: int, rng: random.Random | None = None) -> str:
    """A training caption: a random TRAIN_TEMPLATE drawn with rng, or TRAIN_TEMPLATES[0] when rng is None."""
    template = TRAIN_TEMPLATES[0] if rng is None else rng.choice(TRAIN_TEMPLATES)
    return fashion_prompt(class_index, template)


# ----------------------------------------------------------------------------- prompt -> class
# Words naming each class (plurals and a few common synonyms). Longer phrases are tried first, so "t-shirt"
# is never read as "shirt" and "ankle boot" never as a second class.
_CLASS_WORDS = {
    0: ["t-shirt", "t shirt", "tshirt", "tee shirt", "tee"],
    1: ["trouser", "pants", "jeans"],
    2: ["pullover", "sweater", "jumper"],
    3: ["dress"],
    4: ["coat", "jacket"],
    5: ["sandal"],
    6: ["shirt", "blouse"],
    7: ["sneaker", "trainer", "running shoe"],
    8: ["bag", "handbag", "purse"],
    9: ["ankle boot", "boot"],
}


def _plural(word: str) -> str:
    """Regex for a word or phrase with an optional plural ending on its last word."""
    if word.endswith(("s", "sh")):
        return re.escape(word) + "(?:es)?"
    return re.escape(word) + "s?"


_ALTERNATIVES = sorted(((w, c) for c, words in _CLASS_WORDS.items() for w in words), key=lambda wc: -len(wc[0]))
_CLASS_RE = re.compile("|".join(f"(?P<c{i}>{_plural(w)})" for i, (w, _) in enumerate(_ALTERNATIVES)))
_GROUP_CLASS = {f"c{i}": c for i, (_, c) in enumerate(_ALTERNATIVES)}


def parse_class(prompt: str, names: list[str] | None = None) -> int | None:
    """The class index a prompt names, or None if it names no class or more than one. `names`: an image folder's
    class subfolders (whole words, case-insensitive, underscores read as spaces); None: Fashion-MNIST's classes.

    Matching is case-insensitive on whole words, accepts plurals and a few synonyms ("pants", "sweater",
    "tee", "boots"), and reads "t-shirt" as class 0, never as "shirt" (class 6).
    """
    text = prompt.lower()
    if names is not None:
        hits = {k for k, n in enumerate(names)
                if re.search(r"(?<![\w-])" + re.escape(n.replace("_", " ").lower()) + r"(?![\w-])", text)}
        return hits.pop() if len(hits) == 1 else None
    found = set()
    for m in _CLASS_RE.finditer(text):
        before = text[m.start() - 1] if m.start() > 0 else " "
        after = text[m.end()] if m.end() < len(text) else " "
        if before.isalnum() or before == "-" or after.isalnum() or after == "-":
            continue  # part of a longer word ("overcoat", "bagel", "boot-cut")
        found.add(_GROUP_CLASS[m.lastgroup])
    return found.pop() if len(found) == 1 else None
