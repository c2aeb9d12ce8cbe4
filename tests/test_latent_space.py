"""The latent space beside the VAE: the plain (deterministic) autoencoder, prior draws and interpolation."""

from dataclasses import replace

import pytest
import torch
from test_autoencoder import SMALL, small_model

from ldmkit.autoencoder import LossConfig, encode_dataset, generator_loss


def test_plain_autoencoder_has_a_point_posterior_and_no_kl():
    from ldmkit.autoencoder import PointPosterior
    from ldmkit.train.latent_cache import draw_latents, split_moments
    cfg = replace(SMALL, variational=False)
    model = small_model(cfg=cfg)
    assert model.encoder.conv_out.out_channels == cfg.latent_channels == cfg.moment_channels
    assert small_model().encoder.conv_out.out_channels == 2 * SMALL.latent_channels
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    post = model.encode(x)
    assert isinstance(post, PointPosterior)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(post.sample(g), post.mode()) and torch.equal(post.std, torch.zeros_like(post.mean))
    assert torch.equal(post.kl(), torch.zeros(3))
    recon, post2 = model(x)  # forward "samples": the same latent every time
    assert torch.equal(recon, model.decode(post.mean))
    # cached moments of a plain autoencoder draw exactly the encoder's output
    moments = encode_dataset(model, x, mode="moments", progress=False)
    drawn = draw_latents(split_moments(moments), torch.arange(3), torch.arange(3), seed=0, scale=1.0, shift=0.0)
    assert torch.equal(drawn, post.mean)
    loss, terms = generator_loss(LossConfig(perceptual="none", kl_weight=1.0, disc_start=10 ** 9), x, recon, post2,
                                 step=0)
    assert float(terms["kl"]) == 0.0 and torch.isfinite(loss)


def test_sample_prior_and_interpolate():
    from ldmkit.autoencoder import interpolate, sample_prior
    z = sample_prior(4, (2, 3, 3), seed=5)
    assert z.shape == (4, 2, 3, 3) and torch.equal(z[1:], sample_prior(4, (2, 3, 3), seed=5)[1:])
    assert torch.equal(sample_prior(2, (2, 3, 3), seed=5), z[:2])  # latent i depends only on (seed, i)
    a, b = z[0], z[1]
    lin = interpolate(a, b, 5)
    assert torch.equal(lin[0], a) and torch.allclose(lin[-1], b) and torch.allclose(lin[2], (a + b) / 2)
    sl = interpolate(a, b, 5, mode="slerp")
    torch.testing.assert_close(sl[0], a)
    torch.testing.assert_close(sl[-1], b)
    # slerp between orthogonal unit vectors stays on the unit sphere; the linear midpoint falls inside it
    e1, e2 = torch.zeros(1, 1, 2), torch.zeros(1, 1, 2)
    e1[0, 0, 0], e2[0, 0, 1] = 1.0, 1.0
    norms = interpolate(e1, e2, 7, mode="slerp").flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(7, dtype=norms.dtype))
    assert interpolate(e1, e2, 3)[1].norm() < 0.71
    with pytest.raises(ValueError, match="steps >= 2"):
        interpolate(a, b, 1)
