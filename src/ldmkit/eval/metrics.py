"""Image and distribution metrics: PSNR, SSIM, Frechet distance, precision/recall.

Every function takes numpy arrays or torch tensors, works in batches on the CPU and returns plain numpy / Python
numbers. Image metrics compare two uint8 batches image by image and return one value per image (N,); the headline
number is the mean of those. Distribution metrics take two feature matrices (N, F) and (M, F), e.g. the penultimate
features of the evaluation classifier (`ldmkit.eval.classifier`).

Conventions:
- PSNR uses peak 255. Identical images have infinite PSNR; `psnr` caps every value at `PSNR_CAP_DB` = 100 dB
  (an MSE of about 6.5e-6 grey levels squared, far below one quantisation step), so means stay finite and a
  perfect reconstruction still counts. Pass `cap=None` to get `inf` instead.
- SSIM follows Wang et al. 2004: 11-tap Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, data range 255,
  population (not sample) local statistics, averaged over the "valid" region (pixels whose whole window lies in
  the image) and then over channels. This matches scikit-image's `structural_similarity(gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=255)`.
- Frechet distance (Dowson & Landau 1982; the statistic behind FID, Heusel et al. 2017) is computed in float64
  with an eigen-decomposition matrix square root, no scipy needed.
- Precision/recall is the k-NN manifold estimate of Kynkaanniemi et al. 2019 ("Improved Precision and Recall
  Metric for Assessing Generative Models").
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PSNR_CAP_DB = 100.0  # value reported for identical images (true PSNR is +inf)


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")


def _check_uint8_pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _as_tensor(a, "a"), _as_tensor(b, "b")
    for name, x in (("a", a), ("b", b)):
        if x.dtype != torch.uint8:
            raise ValueError(f"{name} must be uint8 images in [0, 255], got dtype {x.dtype}; "
                             "convert with ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8) or similar")
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: a {tuple(a.shape)} vs b {tuple(b.shape)}")
    if a.ndim < 2 or a.shape[0] == 0:
        raise ValueError(f"expected a non-empty batch (N, ...), got shape {tuple(a.shape)}")
    return a, b


# ----------------------------------------------------------------------------------------------------------------
# PSNR


def psnr(a, b, cap: float | None = PSNR_CAP_DB, batch_size: int = 1024) -> np.ndarray:
    """Per-image PSNR in dB of two uint8 batches of equal shape (N, ...), any layout; returns float64 (N,).

    PSNR = 10 log10(255^2 / MSE) with the MSE over all pixels and channels of one image. Values above `cap`
    (identical or nearly identical images) are set to `cap`; `cap=None` keeps +inf.
    """
    a, b = _check_uint8_pair(a, b)
    out = []
    for i in range(0, a.shape[0], batch_size):
        d = a[i:i + batch_size].double() - b[i:i + batch_size].double()
        mse = d.flatten(1).pow(2).mean(1)  # (n,)
        with np.errstate(divide="ignore"):
            out.append(10.0 * np.log10(255.0 ** 2 / mse.numpy()))
    values = np.concatenate(out)
    return values if cap is None else np.minimum(values, cap)


# ----------------------------------------------------------------------------------------------------------------
# SSIM


def _gaussian_taps(sigma: float, radius: int) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()  # (2r+1,)


def _to_nchw(x: torch.Tensor, layout: str) -> torch.Tensor:
    if x.ndim == 3:  # (N, H, W) grayscale
        return x[:, None]
    if x.ndim != 4:
        raise ValueError(f"SSIM expects (N, H, W) or 4-d images, got shape {tuple(x.shape)}")
    if layout == "NHWC":
        return x.permute(0, 3, 1, 2)
    if layout == "NCHW":
        return x
    raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")


def ssim(a, b, layout: str = "NHWC", sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03,
         batch_size: int = 256) -> np.ndarray:
    """Per-image SSIM (Wang et al. 2004) of two uint8 batches; returns float64 (N,), mean over channels.

    `layout` names the axis order of 4-d inputs ("NHWC" like sample npz files, "NCHW" like dataset tensors);
    3-d inputs are (N, H, W). Window: Gaussian, radius int(3.5 sigma + 0.5) = 5 taps each side for sigma 1.5.
    """
    a, b = _check_uint8_pair(a, b)
    a, b = _to_nchw(a, layout), _to_nchw(b, layout)
    radius = int(3.5 * sigma + 0.5)
    if min(a.shape[-2:]) < 2 * radius + 1:
        raise ValueError(f"images of size {tuple(a.shape[-2:])} are smaller than the SSIM window "
                         f"{2 * radius + 1}; check `layout` ({layout!r}) or use a smaller sigma")
    g = _gaussian_taps(sigma, radius)
    out = [_ssim_batch(a[i:i + batch_size], b[i:i + batch_size], g, k1, k2)
           for i in range(0, a.shape[0], batch_size)]
    return torch.cat(out).numpy()


def _ssim_batch(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor, k1: float, k2: float) -> torch.Tensor:
    n, c, h, w = a.shape
    x = a.reshape(n * c, 1, h, w).double()
    y = b.reshape(n * c, 1, h, w).double()
    kh, kw = g.view(1, 1, -1, 1), g.view(1, 1, 1, -1)

    def blur(z):  # separable Gaussian, "valid" region only: (nc, 1, h, w) -> (nc, 1, h-2r, w-2r)
        return F.conv2d(F.conv2d(z, kh), kw)

    stacked = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # (nc, 5, h, w)
    stats = blur(stacked.view(-1, 1, h, w))  # (nc * 5, 1, h', w')
    stats = stats.view(n * c, 5, *stats.shape[-2:])
    mu_x, mu_y, e_xx, e_yy, e_xy = stats.unbind(1)  # each (nc, h', w')
    var_x, var_y = e_xx - mu_x ** 2, e_yy - mu_y ** 2  # population variances
    cov = e_xy - mu_x * mu_y
    c1, c2 = (k1 * 255.0) ** 2, (k2 * 255.0) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))  # eq. 13
    return s.flatten(1).mean(1).view(n, c).mean(1)  # (n,)


# ----------------------------------------------------------------------------------------------------------------
# Frechet distance


def _features64(x, name: str) -> np.ndarray:
    f = _as_tensor(x, name).double().numpy()
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"{name} must be a feature matrix (N, F) with N >= 2, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError(f"{name} contains NaN or inf features")
    return f


def sqrtm_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative eigenvalues clipped to 0)."""
    s = 0.5 * (s + s.T)
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """Frechet distance between N(mu1, s1) and N(mu2, s2).

    FD = |mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr((s1 s2)^(1/2)); the last trace equals
    tr((sqrt(s1) s2 sqrt(s1))^(1/2)), a symmetric PSD matrix, so it is the sum of the square roots of its eigenvalues.
    """
    r1 = sqrtm_psd(s1)
    m = r1 @ s2 @ r1  # symmetric PSD, same eigenvalues as s1 s2
    eig = np.linalg.eigvalsh(0.5 * (m + m.T))
    tr_sqrt = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted (mean, unbiased covariance) to two feature sets (N, F), (M, F)."""
    a, b = _features64(feats_a, "feats_a"), _features64(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: feats_a has {a.shape[1]}, feats_b has {b.shape[1]}")
    return frechet_distance_from_stats(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


# ----------------------------------------------------------------------------------------------------------------
# Precision / recall (Kynkaanniemi et al. 2019)


def _features_t(x, name: str) -> torch.Tensor:
    return torch.from_numpy(_features64(x, name))


def knn_radii(feats: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance from each row of `feats` (N, F) to its k-th nearest other row; (N,). Chunked over rows."""
    if not 1 <= k < feats.shape[0]:
        raise ValueError(f"k={k} must be in [1, N-1] for a set of N={feats.shape[0]} features")
    out = []
    for i in range(0, feats.shape[0], chunk):
        d = torch.cdist(feats[i:i + chunk], feats)  # (c, N), includes the self-distance 0
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, k])  # index 0 is the point itself
    return torch.cat(out)


def _inside_any_ball(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor,
                     chunk: int = 1024) -> torch.Tensor:
    """Bool (Q,): whether each query lies within radius of at least one centre (distance <= radius)."""
    out = []
    for i in range(0, queries.shape[0], chunk):
        d = torch.cdist(queries[i:i + chunk], centres)  # (c, N)
        out.append((d <= radii[None]).any(dim=1))
    return torch.cat(out)


def precision_recall(real_feats, fake_feats, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN balls; returns (precision, recall).

    Each real point gets a ball whose radius is the distance to its k-th nearest other real point; precision is
    the fraction of fake points inside at least one real ball. Recall swaps the roles: the fraction of real points
    inside at least one ball of the fake set. Distances are float64, computed `chunk` rows at a time, so 10k x 10k
    sets need only chunk x 10k x 8 bytes at once.
    """
    real, fake = _features_t(real_feats, "real_feats"), _features_t(fake_feats, "fake_feats")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: real has {real.shape[1]}, fake has {fake.shape[1]}")
    real_r, fake_r = knn_radii(real, k, chunk), knn_radii(fake, k, chunk)
    precision = _inside_any_ball(fake, real, real_r, chunk).double().mean().item()
    recall = _inside_any_ball(real, fake, fake_r, chunk).double().mean().item()
    return precision, recall


# ----------------------------------------------------------------------------------------------------------------
# Kernel inception distance (Binkowski et al. 2018)


def kernel_distance(feats_a, feats_b, subsets: int = 50, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID: the unbiased estimate of MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over
    `subsets` random subsets of `subset_size` rows from each set (fewer if a set is smaller); returns (mean, std).

    Unlike FD it has no bias at small sample sizes (its expectation is the population value), so it compares fairly
    across sample counts; it can be slightly negative when the sets match."""
    a, b = _features64(feats_a, "feats_a"), _features64(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: feats_a has {a.shape[1]}, feats_b has {b.shape[1]}")
    m = min(subset_size, a.shape[0], b.shape[0])
    rng = np.random.default_rng(seed)
    d = a.shape[1]
    values = []
    for _ in range(subsets):
        x, y = a[rng.choice(a.shape[0], m, replace=False)], b[rng.choice(b.shape[0], m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        values.append((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                      - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))
