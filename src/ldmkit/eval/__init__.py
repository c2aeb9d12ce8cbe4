"""Evaluation: image and distribution metrics, and the Fashion-MNIST evaluation classifier.

`metrics`: psnr, ssim (per image, uint8), frechet_distance, precision_recall (feature sets).
`classifier`: EvalClassifier (its penultimate features are the space for FD and precision/recall) and
score_images; it is trained by `ldmkit.train.eval_classifier`. See `ldmkit.eval.classifier` for why there is no
Inception FID.
"""

from ldmkit.eval.classifier import EvalClassifier, EvalClassifierConfig, score_images
from ldmkit.eval.metrics import frechet_distance, precision_recall, psnr, ssim

__all__ = ["EvalClassifier", "EvalClassifierConfig", "frechet_distance", "precision_recall", "psnr",
           "score_images", "ssim"]
