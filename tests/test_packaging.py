"""Packaging rules that a fresh machine depends on: one test command, dependency ranges, one version."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import nextoffline

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the package itself supports 3.10

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    block = ROOT.joinpath("README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme_test = _readme_commands()[1]
    ci_lines = [line.strip() for line in ROOT.joinpath(".ci", "run").read_text().splitlines()]
    assert readme_test in ci_lines
    assert "pytest" in readme_test and "ruff check" in readme_test and "ruff format --check" in readme_test


def test_runtime_dependencies_are_ranges_not_pins() -> None:
    project = tomllib.loads(ROOT.joinpath("pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        assert "==" not in requirement and "===" not in requirement, requirement
    torch = next(r for r in project["dependencies"] if re.match(r"torch\b", r))
    assert ">=2.4" in torch, "trainer environments run torch 2.6-2.9: the range must admit them"


def test_version_has_one_source() -> None:
    project = tomllib.loads(ROOT.joinpath("pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    from importlib.metadata import version

    assert version("nextoffline") == nextoffline.__version__
