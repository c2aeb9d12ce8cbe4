"""torchrun with 2 CPU processes (gloo) trains every stage like one process at the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ldmkit.cli import main as cli

STEPS = 20


def losses(run: Path, key: str = "loss") -> list[float]:
    return [json.loads(r)[key] for r in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    assert cli(["train", "autoencoder", "--data", "shapes", "--preset", "tiny", "--out", str(root / "ae"),
                "--no-progress"]) == 0
    assert cli(["train", "clip", "--data", "shapes", "--preset", "tiny", "--out", str(root / "clip"),
                "--no-progress"]) == 0
    return root


def ldm_args(stages: Path, out: Path) -> list[str]:
    return ["train", "ldm", "--data", "shapes", "--preset", "tiny", "--autoencoder", str(stages / "ae"),
            "--text-encoder", str(stages / "clip"), "--out", str(out), "--no-progress",
            "--set", f"train.steps={STEPS}", "--set", "train.log_every=1", "--set", "train.batch_size=16",
            "--set", "train.precision=fp32", "--set", "train.ckpt_every=0", "--set", "train.sample_every=0"]


@pytest.mark.slow
def test_torchrun_two_processes_match_one(stages, tmp_path):
    assert cli(ldm_args(stages, tmp_path / "single")) == 0
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "ldmkit.cli",
           *ldm_args(stages, tmp_path / "ddp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, ddp = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert len(single) == len(ddp) == STEPS
    assert ddp == pytest.approx(single, rel=1e-4)
    assert single[-1] != single[0]  # it did train


def stage_args(stage: str, stages: Path, out: Path) -> list[str]:
    """A tiny fp32 run of `stage` at global batch 16 (the other stages train on the fixture's autoencoder)."""
    common = ["--out", str(out), "--no-progress", "--set", f"train.steps={STEPS}", "--set", "train.log_every=1",
              "--set", "train.batch_size=16", "--set", "train.precision=fp32", "--set", "train.ckpt_every=0"]
    if stage == "autoencoder":
        return ["train", "autoencoder", "--data", "shapes", "--preset", "tiny", *common]
    if stage == "classifier":
        return ["train", "classifier", "--data", "shapes", "--preset", "tiny", "--autoencoder", str(stages / "ae"),
                "--set", "label=shape", *common]
    if stage == "fast-decoder":
        return ["train", "fast-decoder", "--data", "shapes", "--preset", "tiny", "--autoencoder",
                str(stages / "ae"), *common]
    raise ValueError(stage)


@pytest.mark.slow
@pytest.mark.parametrize("stage,key", [("autoencoder", "rec"), ("classifier", "loss"), ("fast-decoder", "loss")])
def test_torchrun_two_processes_train_like_one(stages, tmp_path, stage, key):
    """Every stage under torchrun: 2 processes at the same global batch follow one process's loss curve (the logged
    losses are global-batch means; they differ only by the order of floating-point sums in the all-reduce)."""
    assert cli(stage_args(stage, stages, tmp_path / "single")) == 0
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "ldmkit.cli",
                           *stage_args(stage, stages, tmp_path / "ddp")], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, ddp = losses(tmp_path / "single", key), losses(tmp_path / "ddp", key)
    assert len(single) == len(ddp) == STEPS
    assert ddp == pytest.approx(single, rel=2e-3)
    assert single[-1] != single[0]  # it did train
