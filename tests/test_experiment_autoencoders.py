"""The ae-vs-vae and blur experiments in quick mode (the code path, through the CLI), and the high-frequency
energy ratio the blur verdict rests on, on closed forms."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import require_fashion_mnist

from ldmkit.experiments.blur import (
    busiest_window,
    high_frequency_energy,
    high_frequency_fraction,
    high_frequency_ratio,
)

PIPELINE = Path(__file__).resolve().parents[1] / "pretrained" / "fashion-mnist"


def test_high_frequency_energy_on_closed_forms():
    n = 28
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    constant = np.full((1, n, n), 0.7)
    checker = ((i + j) % 2).astype(np.float64)[None]  # all its variation at (0.5, 0.5) cycles per pixel
    slow = np.cos(2 * np.pi * 2 * i / n)[None]  # 2 cycles across: far below half Nyquist
    assert float(high_frequency_energy(constant)[0]) == pytest.approx(0.0, abs=1e-20)
    assert float(high_frequency_fraction(constant)[0]) == 0.0
    # Parseval: deviations of +-0.5 from the mean over 784 pixels; every bit of it above half Nyquist
    assert float(high_frequency_energy(checker)[0]) == pytest.approx(n * n * 0.25)
    assert float(high_frequency_fraction(checker)[0]) == pytest.approx(1.0)
    assert float(high_frequency_fraction(slow)[0]) == pytest.approx(0.0, abs=1e-12)
    # uint8 reads as /255; (N, H, W) and (N, 1, H, W) agree
    u8 = (checker * 255).astype(np.uint8)
    assert float(high_frequency_energy(u8)[0]) == pytest.approx(float(high_frequency_energy(checker[:, None])[0]))
    assert high_frequency_ratio(constant, checker) == pytest.approx(0.0, abs=1e-20)


def test_blur_lowers_the_high_frequency_ratio():
    x = torch.rand((8, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    box = torch.full((1, 1, 3, 3), 1 / 9, dtype=x.dtype)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), box)
    assert high_frequency_ratio(x, x) == pytest.approx(1.0)
    assert high_frequency_ratio(blurred, x) < 0.5
    assert (high_frequency_fraction(blurred) < high_frequency_fraction(x)).all()
    # the busiest window of an image that is flat but for one textured corner is that corner
    img = np.zeros((28, 28))
    img[14:, 14:] = np.random.default_rng(0).random((14, 14))
    assert busiest_window(img) == (14, 14)


def _run(name, tmp):
    from ldmkit.cli import main as cli
    assert cli(["experiment", name, "--quick", "--pipeline", str(PIPELINE), "--out", str(tmp),
                "--page", str(tmp / "p.md"), "--work", str(tmp / "w"), "--no-progress"]) == 0
    return json.loads((tmp / f"{name}.json").read_text())


def _check_page_and_figures(res, name, tmp):
    assert res["quick"] and res["verdict"]
    for fig in res["figures"]:
        assert (tmp / fig).stat().st_size > 1000
    page = (tmp / "p.md").read_text()
    assert f'<a id="{name}"></a>' in page and f"## {name}:" in page
    assert all(f"/{fig})" in page for fig in res["figures"])


def _forbid_new_work(monkeypatch):
    """A rerun must read its trained stages and measurements back: training or sampling again fails it."""
    def fail(*a, **k):
        raise AssertionError("a memoised part was computed again")
    from ldmkit.experiments import common
    from ldmkit.pipeline import Pipeline
    from ldmkit.train import autoencoder, ldm
    monkeypatch.setattr(autoencoder, "train", fail)
    monkeypatch.setattr(ldm, "train", fail)
    monkeypatch.setattr(Pipeline, "generate", fail)
    monkeypatch.setattr(common.Judge, "__init__", fail)


def test_ae_vs_vae_quick(tmp_path, monkeypatch):
    require_fashion_mnist()
    res = _run("ae-vs-vae", tmp_path)
    n = res["numbers"]
    assert [p["kl_weight"] for p in n["points"]] == [0.0, 1e-6, 1e-4, 1e-2]
    for p in n["points"]:
        for key in ("psnr", "latent_mean", "latent_std", "mean_per_channel", "std_per_channel",
                    "fitted_kl_per_channel", "prior_confidence", "prior_entropy", "interp_mean_step",
                    "interp_max_step", "scale_factor"):
            assert p[key] is not None, key
        assert 0.1 <= p["prior_confidence"] <= 1 and 0 <= p["prior_entropy"] <= np.log(10) + 1e-6
        assert p["interp_max_step"] >= p["interp_mean_step"] > 0
        assert len(p["fitted_kl_per_channel"]) == 4 and min(p["fitted_kl_per_channel"]) >= 0
        assert {"accuracy", "fd", "precision", "recall", "diversity"} <= set(p["samples"])
    assert n["points"][0]["posterior_kl_per_channel"] is None  # plain: a point posterior
    assert len(n["points"][1]["posterior_kl_per_channel"]) == 4
    assert 0 < n["real_confidence"] <= 1
    assert res["figures"] == ["ae-vs-vae-tradeoff.png", "ae-vs-vae-latents.png"]
    _check_page_and_figures(res, "ae-vs-vae", tmp_path)

    _forbid_new_work(monkeypatch)
    again = _run("ae-vs-vae", tmp_path)
    assert again["numbers"] == n and again["verdict"] == res["verdict"]


def test_blur_quick(tmp_path, monkeypatch):
    require_fashion_mnist()
    res = _run("blur", tmp_path)
    n = res["numbers"]
    assert [v["variant"] for v in n["variants"]] == ["l2", "l2-lpips", "l2-lpips-gan"]
    for v in n["variants"]:
        for key in ("psnr", "ssim", "lpips", "fd", "hf_ratio", "hf_fraction"):
            assert isinstance(v[key], float), key
        assert v["hf_ratio"] > 0 and v["fd"] >= -1e-6
    assert isinstance(n["sharper"], bool) and isinstance(n["closer"], bool)
    holds = n["sharper"] and n["closer"]
    assert res["verdict"].startswith("holds" if holds else "does not hold")
    assert res["figures"] == ["blur-zoom.png"]
    _check_page_and_figures(res, "blur", tmp_path)
    cfg = json.loads((tmp_path / "w" / "blur" / "autoencoder-l2-lpips-gan" / "config.json").read_text())
    assert cfg["loss"]["rec"] == "l2" and cfg["loss"]["disc_weight"] > 0 and cfg["loss"]["disc_start"] <= 3

    _forbid_new_work(monkeypatch)
    again = _run("blur", tmp_path)
    assert again["numbers"] == n and again["verdict"] == res["verdict"]
