"""Autoguidance (Karras et al. 2024): the guiding branch is a weaker denoiser of the same condition. The combination
is checked exactly on toy denoisers; the pipeline's guide/ stage end to end on the tiny pipeline."""

import shutil

import numpy as np
import pytest
import torch

from ldmkit.guidance.cfg import Guidance, GuidedDenoiser


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread (the shared `one_thread` fixture)."""


def toy(gain, calls):
    """A conditional toy denoiser: x0_hat = gain * x + label, recording how many rows each call had."""
    def denoise(x, sigma, cond):
        calls.append(x.shape[0])
        label = torch.where(cond["drop"], torch.zeros(()), cond["label"])
        return gain * x + label[:, None] + 0.1 * sigma[:, None]
    return denoise


def test_autoguidance_is_weak_plus_w_times_the_gap_and_guides_only_inside_the_interval():
    main_calls, weak_calls = [], []
    main, weak = toy(0.9, main_calls), toy(0.5, weak_calls)
    B = 4
    cond = {"label": torch.arange(B, dtype=torch.float32), "drop": torch.zeros(B, dtype=torch.bool)}
    x, sigma = torch.randn(B, 3), torch.tensor([0.2, 1.0, 3.0, 9.0])
    w = 2.5
    got = Guidance(scale=w, mode="autoguidance").wrap(main, cond, cond, guide=weak)(x, sigma)
    d, d_weak = main(x, sigma, cond), weak(x, sigma, cond)
    torch.testing.assert_close(got, d_weak + w * (d - d_weak))
    # the unconditional branch plays no part: the weak model sees the prompt itself
    uncond = {**cond, "drop": torch.ones(B, dtype=torch.bool)}
    torch.testing.assert_close(Guidance(scale=w, mode="autoguidance").wrap(main, cond, uncond, guide=weak)(x, sigma),
                               got)
    torch.testing.assert_close(Guidance(scale=1.0, mode="autoguidance").wrap(main, cond, cond, guide=weak)(x, sigma),
                               d)
    main_calls.clear(), weak_calls.clear()
    inside = Guidance(scale=w, mode="autoguidance", interval=(0.5, 5.0)).wrap(main, cond, cond, guide=weak)(x, sigma)
    active = (sigma > 0.5) & (sigma <= 5.0)
    torch.testing.assert_close(inside[active], got[active])
    torch.testing.assert_close(inside[~active], d[~active])
    assert main_calls == [B] and weak_calls == [int(active.sum())]  # the weak model only runs where it guides


def test_guide_mix_blends_the_guiding_branches_from_autoguidance_to_cfg():
    main_calls, weak_calls = [], []
    main, weak = toy(0.9, main_calls), toy(0.5, weak_calls)
    B = 3
    cond = {"label": torch.tensor([1.0, -2.0, 0.5]), "drop": torch.zeros(B, dtype=torch.bool)}
    uncond = {**cond, "drop": torch.ones(B, dtype=torch.bool)}
    x, sigma, w = torch.randn(B, 2), torch.tensor([0.5, 1.0, 2.0]), 3.0
    d_c, d_u, d_w = main(x, sigma, cond), main(x, sigma, uncond), weak(x, sigma, cond)
    for lam in (0.0, 0.25, 0.7):
        main_calls.clear(), weak_calls.clear()
        got = Guidance(scale=w, mode="autoguidance", guide_mix=lam).wrap(main, cond, uncond, guide=weak)(x, sigma)
        g = lam * d_w + (1 - lam) * d_u
        torch.testing.assert_close(got, g + w * (d_c - g))
        assert main_calls == [2 * B] and weak_calls == [B]  # cond and uncond in one call, the guide in its own
    cfg = Guidance(scale=w).wrap(main, cond, uncond)(x, sigma)
    torch.testing.assert_close(Guidance(scale=w, mode="autoguidance", guide_mix=0.0).wrap(
        main, cond, uncond, guide=weak)(x, sigma), cfg)
    with pytest.raises(ValueError, match="guide mix"):
        GuidedDenoiser(main, cond, uncond, w, mode="autoguidance", weak=weak, weak_mix=1.5)
    with pytest.raises(ValueError, match="autoguidance only"):
        Guidance(scale=w, guide_mix=0.5).wrap(main, cond, uncond)


def test_autoguidance_needs_a_guide_and_takes_no_negative_prompt():
    main = toy(1.0, [])
    cond = {"label": torch.zeros(2), "drop": torch.zeros(2, dtype=torch.bool)}
    with pytest.raises(ValueError, match="guide/ stage"):
        Guidance(mode="autoguidance").wrap(main, cond, cond)
    with pytest.raises(ValueError, match="negative prompt"):
        Guidance(mode="autoguidance", negative_prompt="x").wrap(main, cond, cond, guide=main)
    Guidance(mode="autoguidance", negative_prompt="x", guide_mix=0.5).wrap(main, cond, cond, guide=main)  # blended
    with pytest.raises(ValueError, match="only autoguidance"):
        GuidedDenoiser(main, cond, cond, 2.0, weak=main)


def test_pipeline_guide_stage_end_to_end(tiny_pipeline, tmp_path, capsys):
    from ldmkit.checkpoint import read_json, write_json
    from ldmkit.cli import main as cli
    from ldmkit.pipeline import Pipeline
    spec = read_json(tiny_pipeline / "pipeline.json")
    assert "guide" in spec["stages"]
    guide_cfg = read_json(tiny_pipeline / "guide" / "config.json")
    assert guide_cfg["train"]["steps"] == 10
    pipe = Pipeline.load(tiny_pipeline)
    assert pipe.guide is not None
    prompts = ["a red circle", "a blue square"]
    auto = pipe(prompts, guidance=2.0, mode="autoguidance", steps=3, seed=1)
    assert np.array_equal(auto, pipe(prompts, guidance=2.0, mode="autoguidance", steps=3, seed=1))
    assert not np.array_equal(auto, pipe(prompts, guidance=2.0, steps=3, seed=1))  # not CFG
    # w = 1: the conditional model alone, whichever guide
    assert np.array_equal(pipe(prompts, guidance=1.0, mode="autoguidance", steps=3, seed=1),
                          pipe(prompts, guidance=1.0, steps=3, seed=1))
    mixed = pipe(prompts, guidance=2.0, mode="autoguidance", guide_mix=0.5, steps=3, seed=1)
    assert not np.array_equal(mixed, auto)
    out = tmp_path / "a.npz"
    assert cli(["sample", str(tiny_pipeline), "--prompt", "a red circle", "--guidance-mode", "autoguidance",
                "--guide-mix", "0.5", "--steps", "3", "--out", str(out), "--no-progress"]) == 0
    # a pipeline without a guide says how to get one, in one line
    copy = tmp_path / "no-guide"
    shutil.copytree(tiny_pipeline, copy)
    spec["stages"].pop("guide")
    write_json(copy / "pipeline.json", spec)
    capsys.readouterr()  # forget the progress bars above
    assert cli(["sample", str(copy), "--prompt", "a red circle", "--guidance-mode", "autoguidance", "--out",
                str(tmp_path / "b.npz"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "guide/ stage" in err and len(err.splitlines()) == 1, err
