"""Shared fixtures: the repository paths, Hydra composition, and tiny synthetic training settings."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# CI (CI=true) replays a fixed example sequence so a submission's result does not depend on which
# random examples a run happens to draw; local runs keep exploring new ones.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CONFIGS = REPO / "configs"

# Overrides that turn any experiment into a seconds-long CPU run on synthetic data.
SMOKE_OVERRIDES = [
    "data=synthetic", "data.num_train=16", "data.num_test=8", "data.batch_size=8",
    "data.eval_batch_size=8", "logger=none", "trainer.max_steps=1", "trainer.progress_bar=false",
    "trainer.threads=1", "device=cpu",
]


def compose_config(overrides: list[str]):
    """The config `python train.py <overrides>` would run, composed with Hydra's compose API."""
    from hydra import compose, initialize_config_dir

    import qat.train.config  # noqa: F401  (registers resolvers)

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture
def compose():
    return compose_config


@pytest.fixture
def smoke_overrides():
    return list(SMOKE_OVERRIDES)


@pytest.fixture
def subprocess_env():
    """Environment for running train.py / torchrun in a subprocess: repo on the path, 1 thread, W&B offline."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", HYDRA_FULL_ERROR="1")
    env.pop("WANDB_API_KEY", None)
    return env


@pytest.fixture
def python():
    return sys.executable


def native_isas() -> list[str]:
    """The native kernels' instruction sets this CPU runs, best first ([] when they are unavailable)."""
    from kernels import native

    return [name for name, runs in native.isas() if runs] if native.available() else []


def pytest_generate_tests(metafunc):
    """A test asking for ``isa`` runs once per instruction set of :func:`native_isas` (the CI machine's
    CPU decides which); the native library is loaded only for such tests."""
    if "isa" in metafunc.fixturenames:
        metafunc.parametrize("isa", native_isas(), indirect=True)


@pytest.fixture
def isa(request):
    """The kernels switched to instruction set ``request.param`` for the test (see pytest_generate_tests)."""
    from kernels import native

    with native.using_isa(request.param):
        yield request.param


@pytest.fixture
def gen():
    """A seeded generator for random test inputs."""
    return torch.Generator().manual_seed(20261203)


def trained_like(model, input_shape):
    """Give BatchNorm non-trivial running statistics, then switch to eval."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, *input_shape))
    return model.eval()
