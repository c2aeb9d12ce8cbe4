"""CFG's implicit classifier against closed forms: Gaussian classes with their exact conditional denoisers."""

import torch

from ldmkit.eval.implicit_classifier import implicit_log_posterior


def gaussian_classes(k: int = 3, d: int = 6, s: float = 0.5, seed: int = 0):
    """Class c: x0 ~ N(mu_c, s^2 I); the exact denoiser E[x0 | x0 + sigma eps = x, c] = mu_c + r (x - mu_c),
    r = s^2 / (s^2 + sigma^2)."""
    g = torch.Generator().manual_seed(seed)
    mu = 2.0 * torch.randn(k, d, generator=g, dtype=torch.float64)

    def denoise(x, sigma, cond):
        r = s ** 2 / (s ** 2 + sigma.double() ** 2)
        m = mu[cond["c"]]
        return m + r[:, None] * (x - m)
    return mu, denoise, {"c": torch.arange(k)}


def test_matches_the_closed_form_denoising_error():
    """||x0 - D_c||^2 = ||(1 - r)(x0 - mu_c) - r sigma eps||^2 for each class, draw and image, divided by 2 sigma^2."""
    s, sigma = 0.5, 0.7
    mu, denoise, cond = gaussian_classes(s=s)
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 1, 2, 2, 1])
    x0 = mu[labels] + s * torch.randn(5, mu.shape[1], generator=g, dtype=torch.float64)
    noise = torch.randn(3, 5, mu.shape[1], generator=g, dtype=torch.float64)
    got = implicit_log_posterior(denoise, x0, sigma, cond, noise, micro=4)
    r = s ** 2 / (s ** 2 + sigma ** 2)
    diff = (1 - r) * (x0[None, :, None] - mu[None, None]) - r * sigma * noise[:, :, None]  # (D, N, K, d)
    want = -diff.square().sum(-1).mean(0) / (2 * sigma ** 2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_with_many_draws_it_is_the_bayes_classifier():
    """E_eps of the error is (1 - r)^2 ||x0 - mu_c||^2 + const: the implicit classifier picks the nearest class
    mean, which is Bayes' rule for equal isotropic Gaussians with equal priors."""
    s = 1.0
    mu, denoise, cond = gaussian_classes(k=4, d=4, s=s, seed=3)
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(4).repeat(50)
    x0 = mu[labels] + s * torch.randn(200, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(400, 200, 4, generator=g, dtype=torch.float64)
    pred = implicit_log_posterior(denoise, x0, 0.3, cond, noise).argmax(1)
    bayes = (x0[:, None] - mu[None]).square().sum(-1).argmin(1)
    assert (pred == bayes).float().mean() >= 0.98
    # and the Bayes classifier is far above chance here, so agreeing with it is not trivial
    assert (bayes == labels).float().mean() > 0.6
