"""Condition encoders: caption tokenizer, text transformer, ViT, CLIP, and a frozen pretrained MiniLM.

Text encoders (`CLIPModel.text_encoder()`, `MiniLMTextEncoder`) share one interface:
`encode(prompts: list[str]) -> {"context": (B, T, Dc), "context_mask": (B, T) bool, "pooled": (B, Dp)}` with
attributes `context_dim`, `pooled_dim`, `max_length`. The empty prompt "" is the unconditional prompt.
frozen.py imports transformers lazily (inside MiniLMTextEncoder), so this package imports without the extra.
"""

from ldmkit.conditioning.clip import PRESETS as CLIP_PRESETS
from ldmkit.conditioning.clip import (
                                      CLIPConfig,
                                      CLIPModel,
                                      CLIPTextEncoder,
                                      clip_loss,
                                      clip_loss_gathered,
                                      clip_score,
                                      gather_features,
                                      retrieval_recall,
                                      zero_shot_accuracy,
                                      zero_shot_classifier,
)
from ldmkit.conditioning.frozen import MiniLMConfig, MiniLMTextEncoder
from ldmkit.conditioning.text import PRESETS as TEXT_PRESETS
from ldmkit.conditioning.text import TextConfig, TextTransformer
from ldmkit.conditioning.tokenizer import Tokenizer, train_tokenizer
from ldmkit.conditioning.vit import PRESETS as VIT_PRESETS
from ldmkit.conditioning.vit import ViT, ViTConfig

__all__ = [
    "CLIPConfig", "CLIPModel", "CLIPTextEncoder", "CLIP_PRESETS", "MiniLMConfig", "MiniLMTextEncoder",
    "TEXT_PRESETS", "TextConfig", "TextTransformer", "Tokenizer", "VIT_PRESETS", "ViT", "ViTConfig", "clip_loss",
    "clip_loss_gathered", "clip_score", "gather_features", "retrieval_recall", "train_tokenizer",
    "zero_shot_accuracy", "zero_shot_classifier",
]
