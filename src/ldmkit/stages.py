"""Load trained stages from their directories: autoencoder, CLIP / text encoder, denoiser, latent classifier.

Every stage directory holds `config.json` (with a "stage" key and the resolved config), `model.safetensors` and
`metrics.json`. The denoiser also records which autoencoder and text encoder it was trained with (weight hashes),
so it never silently runs on another latent space.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from ldmkit.autoencoder import AutoencoderConfig, make_autoencoder
from ldmkit.autoencoder.fast_decoder import FastDecoder, FastDecoderConfig
from ldmkit.checkpoint import file_hash, load_safetensors, read_json
from ldmkit.conditioning import CLIPConfig, CLIPModel, MiniLMTextEncoder, Tokenizer
from ldmkit.config import from_dict
from ldmkit.diffusion.dit import DiT, DiTConfig
from ldmkit.diffusion.objectives import Objective
from ldmkit.diffusion.unet import UNet, UNetConfig
from ldmkit.guidance.classifier import ClassifierConfig, NoisyLatentClassifier


def stage_config(path: str | Path, stage: str) -> dict:
    """config.json of a stage directory, checked to be of the expected stage."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a {stage} stage directory (no config.json); train it with "
                                f"`ldmkit train {stage} --out {path}`")
    cfg = read_json(path / "config.json")
    if cfg.get("stage") != stage:
        raise ValueError(f"{path} holds a {cfg.get('stage')!r} stage, not {stage!r}")
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{path / 'model.safetensors'} missing: the {stage} run has not saved weights yet")
    return cfg


def weights_hash(path: str | Path) -> str:
    return file_hash(Path(path) / "model.safetensors")


CONFIG_FILES = ("config.json", "metrics.json", "tokenizer.json")  # what loading a stage reads besides its weights


def config_hash(path: str | Path) -> str:
    """sha256 (16 hex digits) of the files that say how a stage's weights are read (architecture, objective,
    latent scale, tokenizer): an edit to any of them changes what the weights mean, so a pipeline records it."""
    h = hashlib.sha256()
    for name in CONFIG_FILES:
        f = Path(path) / name
        if f.exists():
            obj = read_json(f)
            h.update(name.encode() + b"\0" + json.dumps(obj, sort_keys=True, separators=(",", ":")).encode() + b"\0")
    return h.hexdigest()[:16]


def stage_entry(root: Path, name: str) -> dict:
    """pipeline.json's record of stage `name` in `root`: its path, weights hash and config hash."""
    return {"path": name, "sha256": weights_hash(root / name), "config_sha256": config_hash(root / name)}


def _load_weights(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    missing, unexpected = model.load_state_dict(load_safetensors(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path / 'model.safetensors'} does not fit {path / 'config.json'}: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    return model.eval().requires_grad_(False)


def load_autoencoder(path: str | Path):
    """(AutoencoderKL, or PixelSpace for pixel-space diffusion, in eval mode, scale_factor, shift_factor) from an
    autoencoder stage directory."""
    path = Path(path)
    cfg = stage_config(path, "autoencoder")
    model = _load_weights(make_autoencoder(from_dict(AutoencoderConfig, cfg["model"])), path)
    metrics = read_json(path / "metrics.json") if (path / "metrics.json").exists() else {}
    scale = metrics.get("scale_factor", model.cfg.scaling_factor)
    shift = metrics.get("shift_factor", model.cfg.shift_factor) or 0.0
    if scale is None:
        raise ValueError(f"{path} has no latent scale factor yet (metrics.json lacks scale_factor): let the "
                         "autoencoder run finish, it estimates 1/std of the training latents at the end")
    return model, float(scale), float(shift)


def load_fast_decoder(path: str | Path):
    """(FastDecoder in eval mode, config dict) of a fast-decoder stage directory."""
    path = Path(path)
    cfg = stage_config(path, "fast-decoder")
    return _load_weights(FastDecoder(from_dict(FastDecoderConfig, cfg["model"])), path), cfg


def load_distilled(path: str | Path):
    """(guidance-distilled backbone in eval mode, config dict) of a distill stage directory."""
    path = Path(path)
    cfg = stage_config(path, "distill")
    cond = cfg["denoiser"]["conditioning"]
    return _load_weights(build_backbone(cfg["denoiser"], cond["context_dim"], cond["pooled_dim"]), path), cfg


def load_clip(path: str | Path):
    """The CLIPModel (eval mode, with its tokenizer) of a CLIP stage directory."""
    path = Path(path)
    cfg = stage_config(path, "clip")
    model = CLIPModel(from_dict(CLIPConfig, cfg["model"]), Tokenizer.load(path / "tokenizer.json"))
    return _load_weights(model, path)


def load_text_encoder(spec: str | Path):
    """A frozen text encoder: "minilm" (the pretrained all-MiniLM-L6-v2 extra) or a CLIP stage directory.

    Returns (encoder, description dict with kind and weights hash).
    """
    if str(spec) == "minilm":
        return MiniLMTextEncoder(), {"kind": "minilm", "sha256": "all-MiniLM-L6-v2"}
    return load_clip(spec).text_encoder(), {"kind": "clip", "sha256": weights_hash(spec)}


def build_backbone(cfg: dict, context_dim: int, pooled_dim: int):
    """A UNet or DiT from a denoiser config dict, sized for the text encoder's widths (and the image
    embedding's, `conditioning.image_dim` and `image_tokens`, when the denoiser is prompted by images too)."""
    kind = cfg["backbone"]
    cond = cfg.get("conditioning", {})
    widths = dict(context_dim=context_dim, pooled_dim=pooled_dim, image_dim=int(cond.get("image_dim", 0)),
                  image_tokens=int(cond.get("image_tokens", 0)))
    if kind == "unet":
        return UNet(dataclasses.replace(from_dict(UNetConfig, cfg["unet"]), **widths))
    if kind == "dit":
        return DiT(dataclasses.replace(from_dict(DiTConfig, cfg["dit"]), **widths))
    raise ValueError(f"unknown backbone {kind!r}; use unet or dit")


def load_denoiser(path: str | Path, text_encoder=None):
    """(backbone in eval mode, Objective, config dict) of a denoiser stage directory."""
    path = Path(path)
    cfg = stage_config(path, "ldm")
    cond = cfg["conditioning"]
    backbone = build_backbone(cfg, cond["context_dim"], cond["pooled_dim"])
    return _load_weights(backbone, path), from_dict(Objective, cfg["objective"]), cfg


def load_classifier(path: str | Path):
    """(NoisyLatentClassifier in eval mode, config dict) of a latent-classifier stage directory."""
    path = Path(path)
    cfg = stage_config(path, "classifier")
    return _load_weights(NoisyLatentClassifier(from_dict(ClassifierConfig, cfg["model"])), path), cfg


def find_pipeline(name: str) -> Path:
    """`pretrained/NAME` beside the working directory or in the ldmkit checkout; or a path as given."""
    for cand in (Path(name), Path("pretrained") / name, Path(__file__).resolve().parents[2] / "pretrained" / name):
        if (cand / "pipeline.json").is_file():
            return cand
    raise FileNotFoundError(f"no pipeline {name!r}: expected pretrained/{name}/pipeline.json (in the ldmkit "
                            "checkout), or pass a pipeline directory; `ldmkit demo --train` retrains it")


PIPELINE_FORMAT = "ldmkit-pipeline/1"
SPEC_KEYS = {"format", "data", "stages", "latent", "image", "defaults", "provenance", "weights_dtype", "data_options",
             "classes"}
REQUIRED_STAGES = ("autoencoder", "clip", "denoiser")
DEFAULTS_KEYS = {"guidance", "guidance_rescale", "sampler", "steps"}


def check_spec(root: Path, spec: dict) -> None:
    """pipeline.json's format, keys and stage entries, before anything is loaded: a bad file fails naming the key."""
    where = root / "pipeline.json"
    if not isinstance(spec, dict) or spec.get("format") != PIPELINE_FORMAT:
        got = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise ValueError(f"{where}: format {got!r} is not {PIPELINE_FORMAT!r}; this ldmkit reads only that format")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; allowed: {sorted(SPEC_KEYS)}")
    missing = [k for k in ("stages", "latent", "image", "defaults") if not isinstance(spec.get(k), dict)]
    if missing:
        raise ValueError(f"{where}: missing or malformed {missing}; rebuild it with `ldmkit train pipeline`")
    unknown = sorted(set(spec["defaults"]) - DEFAULTS_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown defaults {unknown}; allowed: {sorted(DEFAULTS_KEYS)}")
    stages = spec["stages"]
    for name in REQUIRED_STAGES:
        if name not in stages:
            raise ValueError(f"{where}: no {name!r} stage; a pipeline needs {', '.join(REQUIRED_STAGES)}")
    for name, entry in stages.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or "sha256" not in entry:
            raise ValueError(f"{where}: stage {name!r} needs a 'path' and a 'sha256'")
        target = (root / entry["path"]).resolve()
        if root.resolve() not in target.parents:
            raise ValueError(f"{where}: stage {name!r} path {entry['path']!r} leaves the pipeline folder; stage "
                             "paths are relative and stay inside it")
        if not (target / "model.safetensors").is_file():
            raise FileNotFoundError(f"{where} names stage {name!r} at {root / entry['path']}, which has no "
                                    "model.safetensors; restore that folder or rebuild the pipeline")


def check_hashes(root: Path, spec: dict) -> None:
    """Every stage's weights and config files are the ones pipeline.json recorded."""
    for name, entry in spec["stages"].items():
        got = weights_hash(root / entry["path"])
        if got != entry["sha256"]:
            raise ValueError(f"{root / entry['path']}: weights hash {got} differs from {entry['sha256']} in "
                             f"{root / 'pipeline.json'}; the {name} stage was swapped or retrained. Rebuild the "
                             "pipeline with `ldmkit train pipeline` (or restore the original stage)")
        got = config_hash(root / entry["path"])
        if got != entry.get("config_sha256"):
            what = "records no config hash" if "config_sha256" not in entry else f"has config hash {got}, not " \
                f"{entry['config_sha256']}"
            raise ValueError(f"{root / entry['path']} {what} ({', '.join(CONFIG_FILES)}); the {name} stage's "
                             "config was edited, which changes what its weights mean. Restore it, or rerun "
                             "`ldmkit train pipeline` with the same --out to record the stages as they are")


def _load_bound(root: Path, st: dict, name: str, loader, key: str, parent: str, what: str, fix: str):
    """(module, config) of the optional stage `name`, whose config records in `key` the weight hash of the stage
    `parent` it was made from; None when pipeline.json does not name it."""
    if name not in st:
        return None
    loaded = loader(root / st[name]["path"])
    want = st[parent]["sha256"] if parent in st else None
    if loaded[1][key] != want:
        raise ValueError(f"{what} in {root} was trained for another {parent} (hash {loaded[1][key]}, pipeline has "
                         f"{want}); {fix}")
    return loaded


def load_pipeline_stages(root: Path) -> dict:
    """Every stage a pipeline directory names, checked (format, hashes, which stage was trained on which), as
    `Pipeline`'s keyword arguments."""
    spec = read_json(root / "pipeline.json")
    check_spec(root, spec)
    check_hashes(root, spec)
    st = spec["stages"]
    ae, _, _ = load_autoencoder(root / st["autoencoder"]["path"])
    text, _ = load_text_encoder(root / st["clip"]["path"])
    backbone, objective, dcfg = load_denoiser(root / st["denoiser"]["path"])
    cond = dcfg["conditioning"]
    latent = spec["latent"]
    if list(latent.get("shape", [])) != list(cond["latent_shape"]):
        raise ValueError(f"{root / 'pipeline.json'}: latent shape {latent.get('shape')} differs from the denoiser's "
                         f"{list(cond['latent_shape'])}; restore pipeline.json or rebuild it (`ldmkit train pipeline`)")
    if (latent.get("scale_factor"), latent.get("shift_factor")) != (cond["scale_factor"], cond["shift_factor"]):
        raise ValueError(f"{root / 'pipeline.json'}: latent scale/shift ({latent.get('scale_factor')}, "
                         f"{latent.get('shift_factor')}) differ from the denoiser's ({cond['scale_factor']}, "
                         f"{cond['shift_factor']}); restore pipeline.json or rebuild it with `ldmkit train pipeline`")
    for key, stage in (("autoencoder_sha256", "autoencoder"), ("text_encoder_sha256", "clip")):
        if cond[key] != st[stage]["sha256"]:
            raise ValueError(f"the denoiser in {root} was trained with another {stage} (hash {cond[key]}, "
                             f"pipeline has {st[stage]['sha256']}); retrain the denoiser on this {stage}")
    clf = load_classifier(root / st["classifier"]["path"])[0] if "classifier" in st else None
    guide = _load_guide(root, st, objective, dcfg) if "guide" in st else None
    fast = _load_bound(root, st, "fast-decoder", load_fast_decoder, "autoencoder_sha256", "autoencoder",
                       "the fast decoder", "retrain it with `ldmkit train fast-decoder`")
    distilled = _load_bound(root, st, "distilled", load_distilled, "teacher_sha256", "denoiser",
                            "the distilled denoiser", "distill again with `ldmkit train distill`")
    onestep = _load_bound(root, st, "onestep", load_distilled, "teacher_sha256", "distilled",
                          "the one-step student", "distill it again with `ldmkit train distill --set "
                          "one_step_from=N`")
    return dict(spec=spec, autoencoder=ae, text_encoder=text, backbone=backbone, objective=objective, classifier=clf,
                text_tokens=dcfg.get("text_tokens", True), fast_decoder=None if fast is None else fast[0],
                distilled=distilled, onestep=onestep, guide=guide)


def _load_guide(root: Path, st: dict, objective, dcfg: dict):
    """The autoguidance guide: a denoiser of the same latents, text encoder and objective as the main one."""
    guide, g_objective, gcfg = load_denoiser(root / st["guide"]["path"])
    for key in ("autoencoder_sha256", "text_encoder_sha256", "latent_shape", "scale_factor", "shift_factor"):
        if gcfg["conditioning"][key] != dcfg["conditioning"][key]:
            raise ValueError(f"the guide in {root / st['guide']['path']} was trained on other latents or another "
                             f"text encoder than the denoiser ({key} differs); retrain it with `ldmkit train "
                             "pipeline` on this directory")
    same = ("kind", "schedule", "zero_snr")  # what maps sigma to the network's input and output
    if any(getattr(g_objective, k) != getattr(objective, k) for k in same) or \
            gcfg.get("text_tokens", True) != dcfg.get("text_tokens", True):
        raise ValueError(f"the guide in {root / st['guide']['path']} has another objective or text input than the "
                         "denoiser; train it with the denoiser's (`ldmkit train ldm --preset fashion-mnist-guide`)")
    return guide
