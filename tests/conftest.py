"""Shared fixtures: a session-wide pretrained-sampler cache, an in-process Ray, a subprocess runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Pretrained samplers for this test session (never the user's cache)."""
    return tmp_path_factory.mktemp("sftrl-cache")


@pytest.fixture
def local_ray():
    """A fresh in-process Ray instance (2 CPUs), shut down after the test."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def run_cli(args: list[str], *, cwd: Path = REPO, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m <args>`` and capture its output."""
    full_env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def assert_close(actual, expected, rtol=0.0, atol=0.0):
    """|actual - expected| <= atol + rtol |expected| elementwise, compared in float64.

    (torch.testing.assert_close imports torch.distributed on first use, ~2 s per test file.)
    """
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    diff = (actual - expected).abs()
    assert bool((diff <= atol + rtol * expected.abs()).all()), (
        f"max abs diff {diff.max().item():.3e}"
    )
