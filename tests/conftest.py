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


# -- algorithm plug-ins (tests/test_plugins.py; tests/test_cluster_examples.py for the README's) ----

EXAMPLE = REPO / "examples" / "plugin"
# The example plug-in's own names (examples/plugin/pyproject.toml).
AWR, AWR_MODULE, AWR_DIST = "sft-awr", "sftrl_awr", "sftrl-awr"


def fake_distribution(site: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """Install by hand what pip would: ``dist``'s metadata with ``entry_points`` in the group
    ``sftrl.algorithms``, and ``modules`` (name -> source) beside it."""
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[sftrl.algorithms]\n{lines}")
    for name, source in modules.items():
        (site / f"{name}.py").write_text(source)


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A directory on ``sys.path`` to install plug-ins into; what they registered and imported
    is forgotten after the test."""
    from sftrl.algos import ALGORITHMS
    from sftrl.algos.base import _entry_points

    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    registered, modules = dict(ALGORITHMS), set(sys.modules)
    _entry_points.cache_clear()
    yield site
    ALGORITHMS.clear()
    ALGORITHMS.update(registered)
    for name in set(sys.modules) - modules:
        if getattr(sys.modules[name], "__file__", "") and str(site) in sys.modules[name].__file__:
            del sys.modules[name]
    _entry_points.cache_clear()


@pytest.fixture
def awr(site):
    """The README's example plug-in, installed in-process."""
    fake_distribution(site, AWR_DIST, {AWR: f"{AWR_MODULE}:AWR"},
                      {AWR_MODULE: (EXAMPLE / f"{AWR_MODULE}.py").read_text()})
    return site
