"""The committed synthetic fixtures are exactly what their script makes, and read as expected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from nextoffline.trajectory import load_trajectory
from tests.conftest import FIXTURES, tree_hashes


def test_synthetic_fixtures_are_reproducible(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(FIXTURES / "make_synthetic_fixtures.py"), "--out", str(tmp_path)], check=True, capture_output=True)
    for name in ("synthetic_linear", "synthetic_sqrt"):
        assert tree_hashes(tmp_path / name) == tree_hashes(FIXTURES / name)


def test_synthetic_fixture_layout() -> None:
    trajectory = load_trajectory(FIXTURES / "synthetic_linear")
    assert trajectory.format_name == "peft" and trajectory.step_numbers == list(range(10, 90, 10))
    assert len(trajectory.modules) == 14 and {m.rank for m in trajectory.modules} == {4}
    assert trajectory.modules[0].scaling == 2.0
