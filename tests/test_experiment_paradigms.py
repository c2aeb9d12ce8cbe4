"""`ldmkit experiment paradigms` and `ldmkit experiment pixel-vs-latent` in quick mode: the whole code path (train,
sample with every sampler, judge, plot, render the page) in seconds, and a rerun that reads everything back."""

import json
from pathlib import Path

import pytest
from conftest import require_fashion_mnist

PIPELINE = Path(__file__).resolve().parents[1] / "pretrained" / "fashion-mnist"


def _run(name: str, tmp: Path) -> dict:
    from ldmkit.cli import main as cli
    data_dir = require_fashion_mnist()
    if not (PIPELINE / "pipeline.json").exists():
        pytest.skip("the bundled pipeline pretrained/fashion-mnist is missing")
    assert cli(["experiment", name, "--quick", "--pipeline", str(PIPELINE), "--out", str(tmp / "out"),
                "--page", str(tmp / "p.md"), "--work", str(tmp / "w"), "--data-dir", str(data_dir),
                "--no-progress"]) == 0
    return json.loads((tmp / "out" / f"{name}.json").read_text())


def _done(work: Path) -> dict:
    """Modification times of everything a rerun must read back rather than redo."""
    files = [*work.glob("memo/*.json"), *work.glob("samples/*.npz"), *work.glob("*/model.safetensors")]
    return {str(p.relative_to(work)): p.stat().st_mtime_ns for p in sorted(files)}


def _check_page_and_figures(res: dict, tmp: Path, name: str) -> None:
    assert res["quick"] and res["name"] == name and res["verdict"]
    for f in res["figures"]:
        assert (tmp / "out" / f).stat().st_size > 0, f
    page = (tmp / "p.md").read_text()
    assert f'<a id="{name}"></a>' in page and f"## {name}:" in page and res["verdict"] in page
    assert all(f"out/{f}" in page for f in res["figures"])


def test_paradigms_quick_trains_three_objectives_and_samples_each_with_every_sampler(tmp_path):
    from ldmkit.experiments.paradigms import KINDS, SAMPLERS
    res = _run("paradigms", tmp_path)
    n = res["numbers"]
    assert {"train_steps", "batch_size", "steps", "samplers", "objectives", "images_per_point", "guidance", "points",
            "trained", "best_fd", "converge_steps", "at_max_steps", "every_sampler_works", "comparable"} <= set(n)
    assert n["steps"] == [2, 4] and n["train_steps"] == 3 and n["images_per_point"] == 20
    assert n["guidance"] == {"scale": 3.0, "rescale": 0.7}  # the bundled pipeline's defaults
    for kind in KINDS:
        cfg = json.loads((tmp_path / "w" / "paradigms" / f"denoiser-{kind}" / "config.json").read_text())
        assert cfg["objective"]["kind"] == kind and cfg["train"]["steps"] == 3
        for sampler in SAMPLERS:
            for steps in n["steps"]:
                p = n["points"][kind][sampler][str(steps)]
                assert 0 <= p["accuracy"] <= 1 and p["fd"] > 0 and p["sample_seconds"] >= 0
                # pc adds a corrector evaluation per finite level; flow starts at sigma = inf, where it has none
                extra = {"pc": steps - (kind == "flow")}.get(sampler, 0)
                assert p["evaluations"] == steps + extra
    assert res["figures"] == ["paradigms-fd-vs-steps.png", "paradigms-samples.png"]
    _check_page_and_figures(res, tmp_path, "paradigms")

    work = tmp_path / "w" / "paradigms"
    before = _done(work)
    assert len([k for k in before if k.startswith("memo/")]) == 3 * 3 * 2 + 1  # every point, and the guidance
    again = _run("paradigms", tmp_path)
    assert _done(work) == before  # nothing trained, sampled or judged again
    assert again["numbers"] == n


def test_pixel_vs_latent_quick_times_trains_and_judges_both_spaces(tmp_path):
    res = _run("pixel-vs-latent", tmp_path)
    n = res["numbers"]
    assert {"cost_32", "cost_64", "budget_seconds", "train_steps", "trained", "quality", "images_per_space",
            "ratio_32", "ratio_64"} <= set(n)
    assert n["cost_32"]["input_values"] == {"latent": 256, "pixels": 1024}
    assert n["cost_64"]["input_values"] == {"latent": 2048, "pixels": 12288}
    for c in ("cost_32", "cost_64"):
        assert all(v > 0 for v in n[c]["ms_per_step"].values())
    assert n["train_steps"] == {"latent": 3, "pixels": 3} and n["images_per_space"] == 20
    for s in ("latent", "pixels"):
        assert 0 <= n["quality"][s]["accuracy"] <= 1 and n["quality"][s]["fd"] > 0
        assert n["trained"][s]["train_seconds"] is not None
    work = tmp_path / "w" / "pixel-vs-latent"
    shapes = {s: json.loads((work / f"denoiser-{s}" / "config.json").read_text()) for s in ("latent", "pixels")}
    assert shapes["latent"]["conditioning"]["latent_shape"] == [4, 8, 8]
    assert shapes["pixels"]["conditioning"]["latent_shape"] == [1, 32, 32]
    a, b = dict(shapes["latent"]["unet"]), dict(shapes["pixels"]["unet"])
    for k in ("in_channels", "out_channels"):
        a.pop(k), b.pop(k)
    assert a == b  # the same denoiser, apart from the channels it reads
    assert any((work.parent / "bundled-autoencoder" / "latents").iterdir())  # the latent cache stays in the work root
    assert res["figures"] == ["pixel-vs-latent-cost.png", "pixel-vs-latent-samples-latent.png",
                              "pixel-vs-latent-samples-pixels.png"]
    _check_page_and_figures(res, tmp_path, "pixel-vs-latent")

    before = _done(work)
    assert {"memo/cost-32.json", "memo/cost-64.json", "memo/samples-latent.json", "memo/samples-pixels.json"} <= set(
        before)
    again = _run("pixel-vs-latent", tmp_path)
    assert _done(work) == before  # timings, training, samples and scores read back
    assert again["numbers"] == n
