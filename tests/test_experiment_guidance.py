"""The guidance and classifier-vs-free experiments in quick mode (the code path, through the CLI): their numbers,
figures and page section, and a second run that reads every memoised point back instead of sampling again."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import require_fashion_mnist

from ldmkit.experiments.classifier_vs_free import matched

PIPELINE = Path(__file__).resolve().parents[1] / "pretrained" / "fashion-mnist"
METRICS = {"accuracy", "fd", "precision", "recall", "diversity", "fd_floor", "recall_floor", "seconds_per_image"}


def _run(name, tmp):
    from ldmkit.cli import main as cli
    assert cli(["experiment", name, "--quick", "--pipeline", str(PIPELINE), "--out", str(tmp),
                "--page", str(tmp / "p.md"), "--work", str(tmp / "w"), "--data-dir", str(require_fashion_mnist()),
                "--no-progress"]) == 0
    return json.loads((tmp / f"{name}.json").read_text())


def _stamps(folder: Path) -> dict:
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def _check_rerun(name, tmp, first, kept):
    """A second run reads every memoised point back: nothing under the kept folders is written again."""
    before = {k: _stamps(tmp / "w" / name / k) for k in kept}
    assert all(before.values())
    again = _run(name, tmp)
    assert {k: _stamps(tmp / "w" / name / k) for k in kept} == before
    assert again["numbers"] == first["numbers"]


def test_guidance_quick(tmp_path):
    res = _run("guidance", tmp_path)
    n = res["numbers"]
    assert res["quick"] and res["name"] == "guidance"
    assert set(n["p_uncond"]) == {"0", "0.1", "0.2", "0.5"}
    assert set(n["variants"]) == {"cfg", "rescale 0.7", "interval (0.3, 5]", "apg"}
    for pts in [*n["p_uncond"].values(), n["variants"]["cfg"]]:
        assert [pt["w"] for pt in pts] == n["scales"] == [1.0, 3.0]
        assert all(METRICS <= set(pt) and 0 <= pt["accuracy"] <= 1 and np.isfinite(pt["fd"]) for pt in pts)
    # at w = 1 nothing is guided, so every variant shares plain CFG's point
    assert len({json.dumps(pts[0], sort_keys=True) for pts in n["variants"].values()}) == 1
    assert {"best_w", "accuracy_w1", "accuracy_best", "diversity_w1", "recall_best", "holds"} <= set(n["claim"])
    assert n["bundled"]["p_uncond"] == 0.1
    assert len(res["figures"]) == 4 and all((tmp_path / f).stat().st_size > 0 for f in res["figures"])
    page = (tmp_path / "p.md").read_text()
    assert '<a id="guidance"></a>' in page and "p_uncond = 0.5" in page and "interval (0.3, 5]" in page
    assert all(f"{p}" in page for p in res["figures"])
    for p in ("0", "0.1", "0.2", "0.5"):
        assert (tmp_path / "w" / "guidance" / f"denoiser-p{p}" / "model.safetensors").exists()
    _check_rerun("guidance", tmp_path, res, ["memo", "samples", "denoiser-p0.1"])


def test_classifier_vs_free_quick(tmp_path):
    res = _run("classifier-vs-free", tmp_path)
    n = res["numbers"]
    assert [p["scale"] for p in n["cfg"]] == [0.0, 1.0, 3.0]
    assert [p["scale"] for p in n["classifier"]] == [0.0, 1.0, 8.0]
    assert n["cfg"][0] == n["classifier"][0]  # both start from the unconditional model
    counts = {"denoiser_per_image", "classifier_forward_per_image", "classifier_backward_per_image"}
    assert all(METRICS | counts <= set(p) for p in n["cfg"] + n["classifier"])
    # CFG evaluates no classifier; classifier guidance runs one forward and backward per guided row and step
    assert all(p["classifier_forward_per_image"] == 0 for p in n["cfg"])
    guided = n["classifier"][1:]
    assert all(p["classifier_backward_per_image"] == p["classifier_forward_per_image"] > 0 for p in guided)
    assert n["cfg"][2]["denoiser_per_image"] >= guided[0]["denoiser_per_image"]
    assert set(n["implicit"]["levels"]) == {"0.25", "1"}
    assert {"implicit_classifier", "noise_aware_classifier"} <= set(n["implicit"]["levels"]["0.25"])
    assert n["params"]["classifier"] > 0
    assert len(res["figures"]) == 2 and all((tmp_path / f).stat().st_size > 0 for f in res["figures"])
    page = (tmp_path / "p.md").read_text()
    assert '<a id="classifier-vs-free"></a>' in page and "noise-aware classifier" in page
    _check_rerun("classifier-vs-free", tmp_path, res, ["memo", "samples"])


def test_matched_accuracy_interpolation():
    def pt(scale, acc, fd, div):
        return {"scale": scale, "accuracy": acc, "fd": fd, "diversity": div, "recall": 0.5, "seconds_per_image": 0.1}
    cfg = [pt(0, 0.1, 4.0, 2.0), pt(1, 0.7, 2.0, 1.0), pt(3, 0.9, 1.0, 0.8)]
    clf = [pt(0, 0.1, 4.0, 2.0), pt(4, 0.5, 3.0, 1.6), pt(16, 0.8, 3.0, 1.0)]
    rows = matched(cfg, clf)
    assert [r["accuracy"] for r in rows] == [0.3, 0.5, 0.7, 0.8]  # the levels both curves reach
    at = {r["accuracy"]: r for r in rows}
    assert at[0.5]["classifier_fd"] == pytest.approx(3.0)
    assert at[0.5]["cfg_fd"] == pytest.approx(4.0 - 2.0 * 4 / 6, abs=1e-4)  # rounded to 4 places
    assert at[0.8]["cfg_fd"] == pytest.approx(1.5) and at[0.8]["cfg_scale"] == pytest.approx(2.0)
    assert at[0.8]["classifier_diversity"] == pytest.approx(1.0)
    assert matched(cfg, [pt(0, 0.95, 1.0, 1.0), pt(1, 0.99, 1.0, 1.0)]) == []  # no common accuracy
