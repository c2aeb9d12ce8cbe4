"""The evaluation classifier: a small Fashion-MNIST CNN whose features replace Inception for FD and precision/recall.

Why no FID. FID (Heusel et al. 2017) is the Frechet distance between Inception-v3 pool features of real and
generated images. Those weights are a download, and this project never downloads weights; Inception was also
trained on ImageNet photographs and says little about 28x28 grey clothing. Instead we train our own classifier
on the Fashion-MNIST training set (a few minutes on a CPU) and measure distances in its penultimate feature space
(the global-average-pooled last conv stage, `EvalClassifier.features`):

- accuracy: how often the classifier agrees with the label a generated image was prompted with;
- fd: the Frechet distance between Gaussians fitted to the features of generated and real test images;
- precision / recall: the k-NN manifold estimate of Kynkaanniemi et al. 2019 in the same space.

These numbers are NOT FID and are not comparable with published FIDs, nor across different classifier weights:
retraining the classifier (another seed, recipe or dataset) changes the feature space and so every FD. They are
comparable between runs scored by the same classifier weights, so the evaluation records the hash of the weights
file next to every score. Because FD and precision/recall are biased by the sample count, `score_images` reports
beside each number its "floor": the value reached by the same number of REAL training images, which is what a
perfect generator would score. The accuracy floor is the classifier's accuracy on real held-out test images
(its training images would overstate it).

Preprocessing lives in the model: pass uint8 images in [0, 255], (N, 28, 28, 1), (N, 1, 28, 28) or (N, 28, 28),
or float images already scaled to [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ldmkit.eval.metrics import frechet_distance, precision_recall


@dataclass(frozen=True)
class EvalClassifierConfig:
    image_size: int = 28  # input height and width (Fashion-MNIST native size)
    in_channels: int = 1  # grey images
    num_classes: int = 10  # Fashion-MNIST classes
    widths: tuple[int, ...] = (24, 48, 96)  # channels per stage; every stage but the last ends in a 2x2 max-pool
    depths: tuple[int, ...] = (2, 2, 2)  # 3x3 conv-BN-ReLU layers per stage (28x28, 14x14, 7x7)
    dropout: float = 0.1  # dropout before the linear head (features are taken before it)
    pixel_mean: float = 0.2860  # Fashion-MNIST training-set mean of x / 255
    pixel_std: float = 0.3530  # Fashion-MNIST training-set std of x / 255
    head: str = "avg"  # "avg": linear head on the global average pool; "flat": on the flattened last feature map
    #                    (keeps where things are: the shapes position judge)


PRESETS = {
    "tiny": EvalClassifierConfig(widths=(8, 16), depths=(1, 1)),
    "fashion": EvalClassifierConfig(),
}


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class EvalClassifier(nn.Module):
    """conv-BN-ReLU stages with max-pooling, global average pooling, dropout and a linear head."""

    def __init__(self, config: EvalClassifierConfig):
        super().__init__()
        self.config = config
        if len(config.widths) != len(config.depths) or min(config.depths, default=0) < 1:
            raise ValueError(f"widths {config.widths} and depths {config.depths} must have one entry per stage, "
                             "each depth >= 1")
        layers, c = [], config.in_channels
        for i, (w, depth) in enumerate(zip(config.widths, config.depths)):
            for _ in range(depth):
                layers.append(conv_bn_relu(c, w))
                c = w
            if i < len(config.widths) - 1:
                layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        if config.head not in ("avg", "flat"):
            raise ValueError(f"head={config.head!r}: use 'avg' or 'flat'")
        self.dropout = nn.Dropout(config.dropout)
        side = config.image_size // 2 ** (len(config.widths) - 1)
        self.head = nn.Linear(c * side * side if config.head == "flat" else c, config.num_classes)
        self.feature_dim = c
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] or float [0, 1] images in NHWC, NCHW or NHW -> normalised float (N, C, H, W)."""
        cfg, s = self.config, self.config.image_size
        if x.ndim == 3:
            x = x[:, None]
        elif x.ndim == 4 and x.shape[1:] == (s, s, cfg.in_channels):
            x = x.permute(0, 3, 1, 2)
        if x.ndim != 4 or x.shape[1:] != (cfg.in_channels, s, s):
            raise ValueError(f"expected images (N, {s}, {s}, {cfg.in_channels}), (N, {cfg.in_channels}, {s}, {s}) "
                             f"or (N, {s}, {s}), got {tuple(x.shape)}; crop 32x32 dataset images with dataset.crop")
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        elif x.is_floating_point():
            lo, hi = x.min().item(), x.max().item()
            if lo < -1e-3 or hi > 1 + 1e-3:
                raise ValueError(f"float images must lie in [0, 1], got range [{lo:.3f}, {hi:.3f}]; "
                                 "map [-1, 1] images with (x + 1) / 2 or pass uint8")
            x = x.float()
        else:
            raise ValueError(f"images must be uint8 or float, got dtype {x.dtype}")
        return (x - cfg.pixel_mean) / cfg.pixel_std  # (N, C, H, W)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, F): global average pool of the last stage, before dropout and the head."""
        return self.logits_and_features(x)[1]

    def logits_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, num_classes), features (N, F)) in one pass."""
        h = self.body(self.preprocess(x))  # (N, F, h, w)
        f = h.mean(dim=(2, 3))  # (N, F)
        return self.head(self.dropout(h.flatten(1) if self.config.head == "flat" else f)), f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_and_features(x)[0]  # (N, num_classes) logits


# ----------------------------------------------------------------------------------------------------------------
# Inputs and predictions


def to_nchw_uint8(images, name: str, channels: int = 1) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.dtype != torch.uint8:
        raise ValueError(f"{name} must be uint8 images, got dtype {x.dtype}")
    if x.ndim == 4 and x.shape[-1] == channels and x.shape[1] != channels:
        x = x.permute(0, 3, 1, 2)
    elif x.ndim == 3 and channels == 1:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{name} must be (N, H, W, {channels}) or (N, {channels}, H, W)"
                         f"{' or (N, H, W)' if channels == 1 else ''}; got {tuple(x.shape)}")
    return x.contiguous()


@torch.no_grad()
def predict(model: EvalClassifier, images, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, K), features (N, F)) of uint8 images in eval mode, batched."""
    was_training = model.training
    model.eval()
    x = torch.as_tensor(images) if not isinstance(images, torch.Tensor) else images
    logits, feats = [], []
    for i in range(0, x.shape[0], batch_size):
        lg, f = model.logits_and_features(x[i:i + batch_size])
        feats.append(f)
        logits.append(lg)
    model.train(was_training)
    return torch.cat(logits), torch.cat(feats)


def accuracy(model: EvalClassifier, images, labels, batch_size: int = 500) -> float:
    """Fraction of images whose argmax class equals the label (labels int (N,))."""
    logits, _ = predict(model, images, batch_size)
    y = torch.as_tensor(np.asarray(labels)).long()
    if y.shape != (logits.shape[0],):
        raise ValueError(f"labels must have shape ({logits.shape[0]},) to match the images, got {tuple(y.shape)}")
    return (logits.argmax(1) == y).double().mean().item()


# ----------------------------------------------------------------------------------------------------------------
# Scoring generated images


def score_images(model: EvalClassifier, images, labels, real_test_images, real_train_images,
                 batch_size: int = 500, real_test_labels=None, k: int = 3, seed: int = 0) -> dict:
    """Score uint8 images against the real test set in the classifier's feature space, with real-data floors.

    Returns a dict: n; accuracy (over images whose label >= 0, None when there are none or labels is None);
    fd, precision, recall (k-NN, vs all real test images); fd_floor, precision_floor, recall_floor (the same for
    n random real training images drawn with `seed`); accuracy_floor (accuracy on the real test images when
    `real_test_labels` is given, else None); feature_dim.
    """
    n = len(images)
    if n > len(real_train_images):
        raise ValueError(f"{n} images to score but only {len(real_train_images)} real training images for the floor")
    if n <= k:
        raise ValueError(f"need more than k={k} images for precision/recall, got {n}")
    logits, feats = predict(model, images, batch_size)
    test_logits, test_feats = predict(model, real_test_images, batch_size)
    pick = torch.randperm(len(real_train_images), generator=torch.Generator().manual_seed(seed))[:n]
    _, floor_feats = predict(model, torch.as_tensor(np.asarray(real_train_images))[pick], batch_size)

    out = {"n": n, "feature_dim": int(feats.shape[1]), "accuracy": None, "accuracy_floor": None}
    if labels is not None:
        y = torch.as_tensor(np.asarray(labels)).long()
        if y.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {tuple(y.shape)}")
        known = y >= 0
        if known.any():
            out["accuracy"] = (logits.argmax(1)[known] == y[known]).double().mean().item()
    if real_test_labels is not None:
        yt = torch.as_tensor(np.asarray(real_test_labels)).long()
        out["accuracy_floor"] = (test_logits.argmax(1) == yt).double().mean().item()
    out["fd"] = frechet_distance(feats, test_feats)
    out["fd_floor"] = frechet_distance(floor_feats, test_feats)
    out["precision"], out["recall"] = precision_recall(test_feats, feats, k)
    out["precision_floor"], out["recall_floor"] = precision_recall(test_feats, floor_feats, k)
    return out
