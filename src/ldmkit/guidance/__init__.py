"""Guidance wraps a denoiser: classifier-free guidance and its variants (cfg.py, where the scale convention is
stated), classifier guidance (classifier.py); `Guidance` holds the settings of one sampling call."""

from ldmkit.guidance.cfg import (
                                 APGConfig,
                                 Guidance,
                                 GuidedDenoiser,
                                 apg_update,
                                 cat_cond,
                                 cfg,
                                 cond_batch,
                                 encode_with_negative,
                                 expand_cond,
                                 guided_denoiser,
                                 project,
                                 rescale_guided,
                                 rescale_origin,
                                 select_cond,
                                 split,
                                 unconditional,
)
from ldmkit.guidance.classifier import (
                                 PRESETS,
                                 ClassifierConfig,
                                 NoisyLatentClassifier,
                                 add_noise,
                                 classifier_grad_fn,
                                 classifier_guidance,
                                 classifier_loss,
                                 log_sigma_input,
)

__all__ = [
    "APGConfig", "Guidance", "GuidedDenoiser", "apg_update", "cat_cond", "cfg", "cond_batch", "encode_with_negative",
    "expand_cond", "guided_denoiser", "project", "rescale_guided", "rescale_origin", "select_cond", "split",
    "unconditional", "PRESETS", "ClassifierConfig", "NoisyLatentClassifier", "add_noise", "classifier_grad_fn",
    "classifier_guidance", "classifier_loss", "log_sigma_input",
]
