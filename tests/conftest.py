"""Shared fixtures: a session-wide pretrained-sampler cache and a subprocess runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Pretrained samplers for this test session (never the user's cache)."""
    return tmp_path_factory.mktemp("sftrl-cache")


def run_cli(args: list[str], *, cwd: Path = REPO, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m <args>`` and capture its output."""
    full_env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )
