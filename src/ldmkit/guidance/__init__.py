"""Guidance wraps a denoiser: classifier-free guidance and its variants (cfg.py), classifier guidance (classifier.py).

Scale convention: w = 1 is the conditional model, w = 0 the unconditional one (Ho & Salimans write 1 + w).
"""

from ldmkit.guidance.cfg import (APGConfig, GuidedDenoiser, apg_update, cat_cond, cfg, cond_batch,
                                 encode_with_negative, expand_cond, guided_denoiser, project, rescale_guided,
                                 rescale_origin, select_cond, split, unconditional)
from ldmkit.guidance.classifier import (PRESETS, ClassifierConfig, NoisyLatentClassifier, add_noise,
                                        classifier_grad_fn, classifier_guidance, classifier_loss, log_sigma_input)

__all__ = [
    "APGConfig", "GuidedDenoiser", "apg_update", "cat_cond", "cfg", "cond_batch", "encode_with_negative",
    "expand_cond", "guided_denoiser", "project", "rescale_guided", "rescale_origin", "select_cond", "split",
    "unconditional", "PRESETS", "ClassifierConfig", "NoisyLatentClassifier", "add_noise", "classifier_grad_fn",
    "classifier_guidance", "classifier_loss", "log_sigma_input",
]
