"""Datasets: Fashion-MNIST, generated captioned shapes, and captioned image folders, behind one `load_dataset`.

    ds = load_dataset("fashion-mnist", split="train")      # 60000 x 1 x 32 x 32 uint8, labels {"class"}
    ds = load_dataset("shapes", split="test", num=500)     # 500 x 3 x 32 x 32, labels shape/color/size/...
    ds = load_dataset("folder:/data/cats", image_size=64)  # x.png + x.txt, *.jsonl, or class folders
    x = ds.to_float(ds.images[:64])                         # float in [-1, 1]
    prompts = [ds.caption(i, rng) for i in range(64)]       # random training wording per draw

Loaded datasets are cached in-process (several stages load the same one), so treat them as read-only;
`clear_cache()` empties the cache.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from ldmkit.data.base import ImageDataset
from ldmkit.data.captions import (
    FASHION_CLASSES,
    HELDOUT_TEMPLATES,
    TRAIN_TEMPLATES,
    captions_for_label,
    fashion_caption,
    fashion_prompt,
    fill_template,
    parse_class,
)
from ldmkit.data.fashion import DEFAULT_FASHION_DIR, fashion_files_present, load_fashion
from ldmkit.data.folder import folder_fingerprint, load_folder
from ldmkit.data.shape_captions import shape_caption
from ldmkit.data.shapes import heldout_pairs, load_shapes
from ldmkit.images import to_float, to_uint8

__all__ = ["ImageDataset", "load_dataset", "load_split", "other_split", "data_options",
           "default_spec", "clear_cache", "to_float", "to_uint8",
           "FASHION_CLASSES", "TRAIN_TEMPLATES", "HELDOUT_TEMPLATES", "fashion_prompt", "fashion_caption",
           "captions_for_label", "fill_template", "parse_class", "shape_caption", "heldout_pairs",
           "DEFAULT_FASHION_DIR", "fashion_files_present", "SPEC_FORMS"]

SPEC_FORMS = ["fashion-mnist", "shapes", "folder:PATH"]
# keyword options each dataset accepts (besides split / data_dir / image_size)
_OPTIONS = {"fashion-mnist": {"num"},
            "shapes": {"num", "seed", "heldout", "heldout_fraction", "heldout_seed"},
            "folder": {"channels", "skip_bad", "background", "template", "holdout_seed"}}


def _freeze(value):
    """Lists (e.g. held-out pairs) -> tuples so the options can key the cache."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _kind(spec: str) -> str:
    if not isinstance(spec, str):
        raise ValueError(f"dataset spec must be a string, one of {SPEC_FORMS}; got {spec!r}")
    if spec in ("fashion-mnist", "shapes"):
        return spec
    if spec.startswith("folder:") and len(spec) > len("folder:"):
        return "folder"
    raise ValueError(f"unknown dataset spec {spec!r}; expected one of {', '.join(SPEC_FORMS)} "
                     f"(e.g. folder:/data/my_images)")


def load_dataset(spec: str, split: str = "train", data_dir: str | os.PathLike | None = None, image_size: int = 32,
                 **kw) -> ImageDataset:
    """Load a dataset by spec: "fashion-mnist" | "shapes" | "folder:PATH" (cached in-process).

    data_dir: folder with the Fashion-MNIST idx files (fashion-mnist only; default DEFAULT_FASHION_DIR).
    kw: fashion-mnist: num (first num images); shapes: num, seed, heldout, heldout_fraction, heldout_seed
    (see ldmkit.data.shapes); folder: channels (3, 1 or "auto"), skip_bad, background ("black" | "white"),
    template (class subfolders' prompt, "a photo of a {}"), holdout_seed (see ldmkit.data.folder).
    """
    kind = _kind(spec)
    unknown = set(kw) - _OPTIONS[kind]
    if unknown:
        raise ValueError(f"dataset {spec!r} does not take option(s) {sorted(unknown)}; "
                         f"it accepts {sorted(_OPTIONS[kind]) or 'none'}")
    if data_dir is not None and kind != "fashion-mnist":
        raise ValueError(f"data_dir / --data-dir ({data_dir}) is only used by fashion-mnist, not {spec!r}; "
                         f"drop it or use --data fashion-mnist")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    frozen = tuple(sorted((k, _freeze(v)) for k, v in kw.items()))
    if kind == "folder":  # the key includes the files' sizes and times, so edited folders are re-read
        stamp = folder_fingerprint(spec[len("folder:"):], split)
    else:
        stamp = str(Path(data_dir).resolve()) if data_dir is not None else None
    ds = _load_cached(spec, split, stamp, image_size, frozen, data_dir)
    ds.meta["source"] = {"spec": spec, "image_size": image_size, **({"data_dir": str(data_dir)} if data_dir else {}),
                         **kw}  # how to load it again: other_split(ds, split)
    return ds


def data_options(ds: ImageDataset) -> dict:
    """How `ds` was loaded besides its spec and data_dir (image_size, folder options): what a stage records."""
    return {k: v for k, v in ds.meta.get("source", {}).items() if k not in ("spec", "data_dir")}


def load_split(spec: str, split: str, options: dict | None = None, data_dir: str | None = None) -> ImageDataset:
    """A split of the dataset a stage recorded (`spec` and `data_options` of its config.json)."""
    kw = dict(options or {})
    if spec == "fashion-mnist":
        kw["data_dir"] = data_dir
    elif data_dir is not None:
        raise ValueError(f"--data-dir {data_dir} only applies to fashion-mnist, not {spec}")
    return load_dataset(spec, split=split, **kw)


def other_split(ds: ImageDataset, split: str) -> ImageDataset:
    """The dataset `ds` came from, another split, loaded the same way (size, options, data_dir)."""
    src = dict(ds.meta["source"])
    return load_dataset(src.pop("spec"), split=split, **src)


@functools.lru_cache(maxsize=8)
def _load_cached(spec, split, stamp, image_size, frozen, data_dir=None) -> ImageDataset:
    kw = dict(frozen)
    if spec == "fashion-mnist":
        return load_fashion(split, data_dir, image_size, **kw)
    if spec == "shapes":
        return load_shapes(split, image_size, **kw)
    return load_folder(spec[len("folder:"):], split, image_size, **kw)


def clear_cache() -> None:
    """Forget every dataset loaded by `load_dataset`."""
    _load_cached.cache_clear()


def default_spec(data_dir: str | os.PathLike | None = None) -> str:
    """"fashion-mnist" when its four idx files are installed (or in data_dir), else the embedded "shapes"."""
    return "fashion-mnist" if fashion_files_present(data_dir) else "shapes"
