"""Shared test helpers. Under CI=true a missing required component fails the run instead of skipping."""

import importlib
import os
from pathlib import Path

# OpenMP threads that spin while waiting make a loaded 2-core machine up to 100x slower; yield instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
FASHION_DIR = Path(os.environ.get("LDMKIT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def require(module: str):
    """Import a required test component (e.g. diffusers); skip locally if missing, fail under CI=true."""
    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the machine
        if IN_CI:
            pytest.fail(f"required test component {module!r} is missing under CI=true: {e}")
        pytest.skip(f"{module} not installed")


def require_fashion_mnist() -> Path:
    """Path to the Fashion-MNIST idx files; skip locally if absent, fail under CI=true."""
    if (FASHION_DIR / "train-images-idx3-ubyte.gz").exists():
        return FASHION_DIR
    msg = f"Fashion-MNIST idx files not found in {FASHION_DIR} (apt-get install dataset-fashion-mnist)"
    if IN_CI:
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """The tiny shapes pipeline, every stage trained through the CLI (shared: copy it before changing it)."""
    from ldmkit.cli import main as cli
    out = tmp_path_factory.mktemp("pipe") / "tiny"
    assert cli(["train", "pipeline", "--preset", "tiny", "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture
def fashion_dir() -> Path:
    return require_fashion_mnist()


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread; on a loaded 2-core machine its barriers cost up to ~30x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_fashion_pipeline(tmp_path_factory) -> Path:
    """The tiny Fashion-MNIST pipeline with every stage, including the evaluation classifier and both students."""
    require_fashion_mnist()
    from ldmkit.cli import main as cli
    out = tmp_path_factory.mktemp("pipe") / "tiny-fashion"
    assert cli(["train", "pipeline", "--preset", "tiny-fashion", "--out", str(out), "--no-progress"]) == 0
    return out
