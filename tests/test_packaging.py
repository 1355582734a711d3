"""Packaging: dependency bounds, the license metadata, and ``python -m sftrl``."""

from __future__ import annotations

import json
import sys
from importlib.metadata import version

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from conftest import REPO, run_cli

if sys.version_info >= (3, 11):
    import tomllib
else:  # the dev extra brings tomli on 3.10
    import tomli as tomllib

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def requirements(lines: list[str]) -> dict[str, SpecifierSet]:
    parsed = [Requirement(line) for line in lines]
    return {r.name.lower(): r.specifier for r in parsed}


RUNTIME = requirements(PROJECT["dependencies"])


@pytest.mark.parametrize(
    "name, allowed, refused",
    [
        ("gymnasium", ["1.1.0", "1.4.0"], ["1.0.0", "2.0.0"]),  # 1.1: gymnasium.vector.AutoresetMode
        ("ray", ["2.40.0", "2.60.0"], ["2.39.0", "3.0.0"]),
        ("torch", ["2.2.0", "2.13.0+cpu", "2.13.0+cu128"], ["2.1.0", "3.0.0"]),
        ("numpy", ["1.24.0", "2.4.6"], ["3.0.0"]),
    ],
)
def test_dependency_bounds(name, allowed, refused):
    spec = RUNTIME[name]
    for v in allowed:
        assert spec.contains(v), (name, v, str(spec))
    for v in refused:
        assert not spec.contains(v), (name, v, str(spec))


def test_torch_is_bounded_but_not_pinned():
    # The README's install line pins torch; the package must not, or a user's CUDA build is replaced.
    assert all(s.operator in (">=", "<") for s in RUNTIME["torch"]), str(RUNTIME["torch"])


@pytest.mark.parametrize("name", ["torch", "ray", "gymnasium", "numpy"])
def test_the_installed_versions_satisfy_the_bounds(name):
    assert RUNTIME[name].contains(version(name)), (name, version(name), str(RUNTIME[name]))


def test_pytest_is_a_dev_dependency_only():
    assert "pytest" not in RUNTIME
    assert "pytest" in requirements(PROJECT["optional-dependencies"]["dev"])


def test_license_is_an_spdx_expression_with_its_file():
    assert PROJECT["license"] == "Apache-2.0"  # a plain string: the {text = ...} table is deprecated
    assert PROJECT["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    # setuptools refuses a License :: classifier beside a license expression
    assert not [c for c in PROJECT.get("classifiers", []) if c.startswith("License ::")]
    # the SPDX string and license-files need setuptools >= 77 (PEP 639)
    setuptools = requirements(PYPROJECT["build-system"]["requires"])["setuptools"]
    assert not setuptools.contains("76.9") and setuptools.contains("77.0.0")


def test_python_m_sftrl_help_lists_the_commands():
    for args in (["sftrl", "--help"], ["sftrl"]):  # no arguments prints the help too
        result = run_cli(args, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage: sftrl")
        for command in ("run", "pretrain", "sample", "eval", "weights", "schedule"):
            assert f"    {command} " in result.stdout, command


def test_python_m_sftrl_runs_a_command():
    result = run_cli(["sftrl", "schedule", "strided", "--steps", "2", "--json"], timeout=120)
    assert result.returncode == 0, result.stderr
    table = json.loads(result.stdout)
    assert table["name"].startswith("strided") and [row["n"] for row in table["steps"]] == [2, 1]


def test_python_m_sftrl_run_reaches_the_run_command():
    result = run_cli(["sftrl", "run", "no-such-config.yaml"], timeout=120)
    assert result.returncode == 2  # sftrl.run's own one-line error for a missing config
    [line] = result.stderr.splitlines()
    assert line.startswith("error: config file 'no-such-config.yaml' not found")


def test_a_bare_config_gets_a_one_line_hint():
    result = run_cli(["sftrl", "configs/smoke.yaml", "trainer.iterations=2"], timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: sftrl: 'configs/smoke.yaml' is a config, not a command; to fine-tune from it: "
        "python -m sftrl run configs/smoke.yaml trainer.iterations=2"
    ]
