"""Read a diffusers `AutoencoderKL` directory: its config.json mapped onto `AutoencoderConfig`, and its weights.

Only what our architecture can reproduce is accepted: `DownEncoderBlock2D` / `UpDecoderBlock2D` levels and SiLU.
Anything else raises an error naming the key, so a VAE never loads into a model that computes something else.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ldmkit.autoencoder.vae import AutoencoderConfig

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
# diffusers key -> our field (copied as is; tuples for lists)
CONFIG_MAP = {
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "block_out_channels": "block_out_channels",
    "layers_per_block": "layers_per_block",
    "latent_channels": "latent_channels",
    "norm_num_groups": "norm_groups",
    "mid_block_add_attention": "mid_attention",
    "use_quant_conv": "use_quant_conv",
    "use_post_quant_conv": "use_post_quant_conv",
    "scaling_factor": "scaling_factor",
    "shift_factor": "shift_factor",
}
# keys that do not change what the network computes
IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "sample_size",
           "force_upcast", "latents_mean", "latents_std"}
# attention names of checkpoints saved by diffusers < 0.14
LEGACY_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def config_from_diffusers(d: dict) -> AutoencoderConfig:
    """Map a diffusers AutoencoderKL config dict onto `AutoencoderConfig`, refusing what we cannot reproduce."""
    for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        bad = [t for t in d.get(key, [want]) if t != want]
        if bad:
            raise ValueError(f"diffusers config {key} contains {bad}; only {want} levels are supported")
    if d.get("act_fn", "silu") != "silu":
        raise ValueError(f"diffusers config act_fn={d['act_fn']!r} is not supported; only 'silu'")
    unknown = set(d) - set(CONFIG_MAP) - IGNORED - {"down_block_types", "up_block_types", "act_fn"}
    if unknown:
        raise ValueError(f"diffusers config has keys ldmkit cannot map: {sorted(unknown)}")
    kw = {CONFIG_MAP[k]: v for k, v in d.items() if k in CONFIG_MAP}
    if "block_out_channels" in kw:
        kw["block_out_channels"] = tuple(kw["block_out_channels"])
    defaults = {"block_out_channels": (64,), "layers_per_block": 1}  # diffusers' constructor defaults
    return AutoencoderConfig(**{**defaults, **kw})


def _rename_legacy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for old, new in LEGACY_ATTENTION.items():
            k = k.replace(old, new)
        if ".to_" in k and v.ndim == 4:  # old checkpoints stored attention projections as 1x1 convs
            v = v[:, :, 0, 0]
        out[k] = v
    return out


def load_diffusers_autoencoder(directory: str | Path) -> tuple[AutoencoderConfig, dict[str, torch.Tensor]]:
    """(config, float32 state dict) from a diffusers AutoencoderKL directory."""
    directory = Path(directory)
    cfg_path, w_path = directory / "config.json", directory / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.exists():
            raise FileNotFoundError(f"{p} not found; expected a diffusers AutoencoderKL directory "
                                    f"(save_pretrained writes config.json and {WEIGHTS_FILE})")
    cfg = config_from_diffusers(json.loads(cfg_path.read_text()))
    state = {k: v.float() for k, v in load_file(str(w_path)).items()}
    return cfg, _rename_legacy(state)
