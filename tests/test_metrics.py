"""Metrics against closed forms and scikit-image / scipy; the evaluation classifier's shapes and training."""

import gzip
import math
import time

import numpy as np
import pytest
import torch
from conftest import require

from ldmkit.eval.classifier import PRESETS, EvalClassifier, EvalClassifierConfig, score_images
from ldmkit.eval.metrics import PSNR_CAP_DB, frechet_distance, precision_recall, psnr, ssim
from ldmkit.train.eval_classifier import augment, train_eval_classifier


def read_idx(path, offset: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset).copy()


def load_fashion(root, split: str):
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28, 1)
    labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 8).astype(np.int64)
    return images, labels


def random_images(seed, shape=(6, 28, 28, 1)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ------------------------------------------------------------------------------------------------------------ PSNR


def test_psnr_known_mse():
    a = np.full((3, 8, 8, 1), 100, np.uint8)
    b = a.copy()
    b[0] += 10  # MSE 100
    b[1, :4] += 20  # half the pixels off by 20 -> MSE 200
    out = psnr(a, b)
    assert out.shape == (3,)
    np.testing.assert_allclose(out[:2], [10 * math.log10(255**2 / 100), 10 * math.log10(255**2 / 200)], rtol=1e-12)
    assert out[2] == PSNR_CAP_DB
    assert psnr(a, b, cap=None)[2] == np.inf


def test_psnr_rejects_float_and_shape_mismatch():
    a = random_images(0)
    with pytest.raises(ValueError, match="uint8"):
        psnr(a.astype(np.float32), a)
    with pytest.raises(ValueError, match="shape"):
        psnr(a, a[:3])


# ------------------------------------------------------------------------------------------------------------ SSIM


def test_ssim_identical_is_one_and_layouts_agree():
    a, b = random_images(1, (4, 20, 24, 3)), random_images(2, (4, 20, 24, 3))
    np.testing.assert_allclose(ssim(a, a), 1.0, atol=1e-12)
    nhwc = ssim(a, b)
    nchw = ssim(a.transpose(0, 3, 1, 2), b.transpose(0, 3, 1, 2), layout="NCHW")
    np.testing.assert_allclose(nhwc, nchw, atol=1e-12)
    assert np.all(nhwc < 0.2)  # independent noise images are nearly uncorrelated


@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_matches_skimage(channels):
    metrics = require("skimage.metrics")
    a = random_images(3, (5, 28, 31, channels))
    noise = np.random.default_rng(4).normal(0, 25, a.shape)
    b = np.clip(a + noise, 0, 255).astype(np.uint8)
    b[0] = 255 - a[0]  # one strongly anti-correlated pair
    ours = ssim(a, b)
    ref = [metrics.structural_similarity(a[i], b[i], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                         data_range=255, channel_axis=-1) for i in range(len(a))]
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_ssim_rejects_too_small_images():
    with pytest.raises(ValueError, match="window"):
        ssim(random_images(0, (2, 8, 8, 1)), random_images(1, (2, 8, 8, 1)))


# ----------------------------------------------------------------------------------------------- Frechet distance


def gaussian_samples(rng, mean, cov_sqrt, n):
    return mean + rng.standard_normal((n, len(mean))) @ cov_sqrt.T


def whitened(rng, n, dim):
    """n samples whose sample mean is exactly 0 and sample covariance exactly the identity."""
    x = rng.standard_normal((n, dim))
    x -= x.mean(0)
    return x @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T


def test_frechet_distance_diagonal_closed_form():
    # Diagonal covariances: FD = |m1 - m2|^2 + sum (sqrt(s1) - sqrt(s2))^2 (s = variances).
    rng = np.random.default_rng(0)
    m1, m2 = np.array([0, 1, 2, 3, 4.0]), np.array([1, 1, 0, 3, 4.5])
    sd1, sd2 = np.array([1.0, 2.0, 0.5, 3.0, 1.0]), np.array([2.0, 1.0, 0.5, 1.0, 4.0])
    a = whitened(rng, 4000, 5) * sd1 + m1
    b = whitened(rng, 3000, 5) * sd2 + m2
    expected = np.sum((m1 - m2) ** 2) + np.sum((sd1 - sd2) ** 2)
    assert abs(frechet_distance(a, b) - expected) < 1e-8 * expected
    assert abs(frechet_distance(a, a)) < 1e-8


def test_frechet_distance_matches_scipy_sqrtm():
    linalg = require("scipy.linalg")
    rng = np.random.default_rng(1)
    a = gaussian_samples(rng, rng.normal(size=8), rng.normal(size=(8, 8)), 500)
    b = gaussian_samples(rng, rng.normal(size=8), rng.normal(size=(8, 8)), 400)
    m1, m2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    np.testing.assert_allclose(frechet_distance(torch.from_numpy(a).float(), b), expected, rtol=1e-5)


def test_frechet_distance_rejects_bad_features():
    with pytest.raises(ValueError, match="dims differ"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full((5, 3), np.nan), np.zeros((5, 3)))


# ----------------------------------------------------------------------------------------------- precision/recall


def test_precision_recall_identical_and_disjoint():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 16))
    assert precision_recall(x, x.copy(), k=3) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0, k=3) == (0.0, 0.0)


def test_precision_recall_hand_computed():
    # Real points on a line at 0.2, 1, 2, 10; k=1 radii 0.8, 0.8, 1, 8.
    real = np.array([[0.2], [1.0], [2.0], [10.0]])
    # Fakes: 2.5 is 0.5 from 2 (inside), 5 is 5 from 10 (inside the radius-8 ball), 20 is 10 from 10 (outside),
    # -3 is 3.2 from 0.2 (outside). Precision = 2/4.
    # Fake k=1 radii: 2.5 -> 2.5, 5 -> 2.5, 20 -> 15, -3 -> 5.5. Real 0.2 is 3.2 from -3, 1 and 2 are within 2.5 of
    # 2.5, 10 is 10 from 20: all inside. Recall = 1.
    fake = np.array([[2.5], [5.0], [20.0], [-3.0]])
    assert precision_recall(real, fake, k=1) == (0.5, 1.0)
    # Fakes 2.5, 5, 20, 21 have radii 2.5, 2.5, 1, 1: real 10 is 5 from 5 and 10 from 20, outside. Recall = 3/4.
    fake2 = np.array([[2.5], [5.0], [20.0], [21.0]])
    assert precision_recall(real, fake2, k=1)[1] == 0.75


def test_precision_recall_chunking_does_not_change_result():
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(257, 8)), rng.normal(0.3, 1.2, size=(190, 8))
    assert precision_recall(real, fake, k=3, chunk=1000) == precision_recall(real, fake, k=3, chunk=17)


# ------------------------------------------------------------------------------------------------------ classifier


def test_classifier_shapes_layouts_and_deterministic_features():
    torch.manual_seed(0)
    model = EvalClassifier(PRESETS["tiny"]).eval()
    x = torch.from_numpy(random_images(5, (4, 28, 28, 1)))
    logits, feats = model(x), model.features(x)
    assert logits.shape == (4, 10) and feats.shape == (4, model.feature_dim)
    assert torch.equal(model.features(x), feats)
    torch.testing.assert_close(model.features(x.permute(0, 3, 1, 2)), feats)  # NCHW gives the same
    torch.testing.assert_close(model.features(x.float() / 255), feats)  # float in [0, 1] gives the same
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.features(x.float() / 127.5 - 1)
    with pytest.raises(ValueError, match="crop"):
        model.features(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))


def test_augment_shifts_and_flips_with_zero_fill():
    x = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    x[:, :, 10, 5] = 255
    out = augment(x, torch.Generator().manual_seed(0), max_shift=2)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert (out.flatten(1).sum(1) == 255).all()  # one pixel moved, never duplicated or lost (shift <= 2)
    rows, cols = out[:, 0].nonzero()[:, 1], out[:, 0].nonzero()[:, 2]
    assert set(rows.tolist()) <= set(range(8, 13))
    assert any(c >= 20 for c in cols.tolist()) and any(c <= 7 for c in cols.tolist())  # both flipped and not


def test_score_images_on_real_images(fashion_dir):
    xtr, ytr = load_fashion(fashion_dir, "train")
    xte, yte = load_fashion(fashion_dir, "test")
    torch.manual_seed(0)
    model = EvalClassifier(PRESETS["tiny"]).eval()
    fake, fake_labels = xtr[-200:], ytr[-200:].copy()
    fake_labels[:50] = -1
    out = score_images(model, fake, fake_labels, xte[:1000], xtr[:5000], real_test_labels=yte[:1000])
    assert out["n"] == 200 and out["feature_dim"] == model.feature_dim
    assert 0.0 <= out["accuracy"] <= 1.0 and 0.0 <= out["accuracy_floor"] <= 1.0
    # Real images scored as fakes land close to the real floor; noise lands far away.
    noise = score_images(model, random_images(6, (200, 28, 28, 1)), None, xte[:1000], xtr[:5000])
    assert noise["accuracy"] is None and noise["fd"] > 5 * out["fd"]
    assert noise["precision"] < out["precision"]


def test_short_training_reaches_80_percent_on_5k_subset(fashion_dir):
    # A three-stage 16/32/64 net (about 20 s on 2 free cores); chance is 0.1, the full recipe's >= 92% is below.
    xtr, ytr = load_fashion(fashion_dir, "train")
    xte, yte = load_fashion(fashion_dir, "test")
    cfg = EvalClassifierConfig(widths=(16, 32, 64), depths=(1, 1, 1))
    model, acc = train_eval_classifier(xtr[:5000], ytr[:5000], xte[:2000], yte[:2000], steps=600, batch_size=64,
                                       seed=0, progress=False, config=cfg, lr=1e-2)
    assert acc > 0.80, acc
    assert not model.training
    assert all(p.is_contiguous() for p in model.state_dict().values())  # safetensors can save it


@pytest.mark.slow
@pytest.mark.timeout(1500)  # fp32 on AVX2: 23 min on one core shared with another job (more cores: less)
def test_full_recipe_reaches_92_percent(fashion_dir):
    xtr, ytr = load_fashion(fashion_dir, "train")
    xte, yte = load_fashion(fashion_dir, "test")
    start = time.time()
    _, acc = train_eval_classifier(xtr, ytr, xte, yte, seed=0, progress=False)
    print(f"eval classifier: test accuracy {acc:.4f} after {time.time() - start:.0f} s")
    assert acc >= 0.92, acc


def test_kernel_distance_is_the_unbiased_mmd_with_the_cubic_kernel():
    """KID on one subset against the MMD^2 estimator written out pair by pair; near zero for samples of one
    distribution, clearly positive for a shifted one."""
    from ldmkit.eval.metrics import kernel_distance
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(12, 5)), rng.normal(size=(12, 5)) + 0.3

    def k(x, y):
        return (x @ y / 5 + 1) ** 3
    m = 12
    xx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(a[i], b[j]) for i in range(m) for j in range(m)) / (m * m)
    got, std = kernel_distance(a, b, subsets=1, subset_size=12)
    assert got == pytest.approx(xx + yy - 2 * xy, rel=1e-12) and std == 0.0
    same = kernel_distance(rng.normal(size=(400, 8)), rng.normal(size=(400, 8)), subsets=10, subset_size=200)[0]
    shifted = kernel_distance(rng.normal(size=(400, 8)), rng.normal(size=(400, 8)) + 0.5, subsets=10,
                              subset_size=200)[0]
    assert abs(same) < 0.1 and shifted > 0.5  # measured: ~0.03 (std 0.025 over subsets) and ~0.9
