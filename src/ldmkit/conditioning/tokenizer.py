"""Caption tokenizer: byte-level BPE trained with Hugging Face `tokenizers`, stored as one `tokenizer.json`.

Text is NFKC-normalised and lower-cased, split into byte-level pieces (so any string, any script, any emoji
encodes without an unknown token), wrapped as `[BOS] ... [EOS]`, truncated to `max_length` (with a warning that
names the prompt) and right-padded with `[PAD]`. The empty prompt "" encodes to `[BOS] [EOS]`: that is how the
unconditional prompt is requested. Maximum length, padding and truncation live inside `tokenizer.json`, so the
file alone rebuilds the same tokenizer.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)  # ids 0, 1, 2, 3 in a freshly trained tokenizer
BYTE_ALPHABET = len(pre_tokenizers.ByteLevel.alphabet())  # 256 single-byte symbols


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}: {prompts!r:.80}; "
                        "wrap a single prompt as [prompt]")
    return list(prompts)


class Tokenizer:
    """Fixed-length caption tokenizer around a `tokenizers.Tokenizer` (build with `train_tokenizer` or `load`)."""

    def __init__(self, hf: HFTokenizer, source: str = "<memory>"):
        trunc, pad = hf.truncation, hf.padding
        if trunc is None or pad is None or pad.get("length") is None:
            raise ValueError(f"tokenizer {source} has no fixed-length padding/truncation; "
                             "build it with ldmkit.conditioning.train_tokenizer")
        if trunc["max_length"] != pad["length"]:
            raise ValueError(f"tokenizer {source}: truncation max_length={trunc['max_length']} differs from "
                             f"padding length={pad['length']}; retrain it with train_tokenizer")
        missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer {source} lacks special tokens {missing}; retrain it with train_tokenizer")
        self.hf = hf
        self.max_length: int = trunc["max_length"]
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = (hf.token_to_id(t) for t in SPECIAL_TOKENS)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts -> (ids (B, T) int64, mask (B, T) bool, True = real token), T = max_length."""
        prompts = _check_prompts(prompts)
        encodings = self.hf.encode_batch(prompts)
        for prompt, enc in zip(prompts, encodings):
            if enc.overflowing:
                shown = prompt if len(prompt) <= 80 else prompt[:77] + "..."
                warnings.warn(f"prompt {shown!r} ({len(prompt)} characters) is longer than max_length="
                              f"{self.max_length} tokens "
                              "(including [BOS]/[EOS]); it was truncated", stacklevel=2)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64).reshape(len(prompts), self.max_length)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.bool).reshape(ids.shape)
        return ids, mask

    def decode(self, ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]]) -> str | list[str]:
        """Token ids -> text without special tokens; (T,) gives one string, (B, T) a list."""
        ids = torch.as_tensor(ids)
        if ids.ndim == 1:
            return self.hf.decode(ids.tolist(), skip_special_tokens=True)
        if ids.ndim == 2:
            return self.hf.decode_batch(ids.tolist(), skip_special_tokens=True)
        raise ValueError(f"decode expects ids of shape (T,) or (B, T), got {tuple(ids.shape)}")

    def save(self, path: str | Path) -> None:
        """Write the tokenizer to `path` (a file, conventionally `<stage dir>/tokenizer.json`)."""
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a directory; pass the file path, e.g. {path / 'tokenizer.json'}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(path))

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} not found; train one with train_tokenizer(...).save()")
        return cls(HFTokenizer.from_file(str(path)), source=str(path))


def train_tokenizer(texts: Iterable[str], vocab_size: int, max_length: int) -> Tokenizer:
    """Train a lower-casing byte-level BPE tokenizer on captions.

    vocab_size counts the 256 byte symbols and the 4 special tokens, so it must exceed 260; the trainer may stop
    below it when the captions offer no more merges. max_length counts [BOS] and [EOS].
    """
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("train_tokenizer needs a non-empty list of caption strings")
    if vocab_size <= BYTE_ALPHABET + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} leaves no room for merges; use more than "
                         f"{BYTE_ALPHABET + len(SPECIAL_TOKENS)} (256 bytes + 4 special tokens)")
    if max_length < 2:
        raise ValueError(f"max_length={max_length} cannot hold [BOS] and [EOS]; use at least 2")
    hf = HFTokenizer(models.BPE(unk_token=UNK))
    hf.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(texts, trainer=trainer)
    bos, eos, pad = hf.token_to_id(BOS), hf.token_to_id(EOS), hf.token_to_id(PAD)
    hf.post_processor = processors.TemplateProcessing(single=f"{BOS} $A {EOS}", special_tokens=[(BOS, bos), (EOS, eos)])
    hf.enable_truncation(max_length=max_length)
    hf.enable_padding(direction="right", pad_id=pad, pad_token=PAD, length=max_length)
    return Tokenizer(hf)
