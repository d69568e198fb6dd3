"""``nextoffline report``: figures are valid PNGs, the Markdown references them, data is right."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from nextoffline.cli import main
from nextoffline.pipeline import NextOptions, PredictorOptions, RunSettings
from nextoffline.report import compute_report, select_modules
from nextoffline.trajectory import load_trajectory
from tests.conftest import make_trajectory

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_valid_png(path: Path, min_size: tuple[int, int] = (400, 250)) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= min_size[0] and image.size[1] >= min_size[1], image.size
        pixels = torch.tensor(list(image.convert("L").getdata()), dtype=torch.float32)
    assert pixels.std() > 5, f"{path.name} looks blank"
    import matplotlib.image

    assert matplotlib.image.imread(path).ndim == 3


def markdown_images(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


@pytest.fixture
def scored_sweep(tmp_path: Path, sqrt_run: Path) -> Path:
    out = tmp_path / "sweep"
    result = run_cli(
        "extrapolate",
        sqrt_run,
        "--coef",
        "1,2",
        "--to-step",
        "100",
        "--method",
        "power",
        "--out",
        out,
        "--eval-cmd",
        'echo "score $(echo "$NEXTOFFLINE_COEF" | cut -c1-3)" # {adapter}',
        "-q",
    )
    assert result.exit_code == 0, result.output
    return out


def test_report_writes_readable_pngs_and_markdown(tmp_path: Path, sqrt_run: Path, scored_sweep: Path) -> None:
    out = tmp_path / "report"
    result = run_cli("report", sqrt_run, "--out", out, "--extrapolation", scored_sweep, "--next-epochs", "5", "-q")
    assert result.exit_code == 0, result.output
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["backtest.png", "candidates.png", "coefficients.png", "coefficients_all.png", "energy.png"]
    for name in pngs:
        assert_valid_png(out / name)
    markdown = (out / "report.md").read_text()
    assert sorted(markdown_images(markdown)) == pngs
    assert "auto would choose: `power" in markdown  # the sqrt law is a power law
    assert "| `coef_2` |" in markdown and "**selected**" in markdown
    data = json.loads((out / "report.json").read_text())
    assert data["inspect"]["steps"] == list(range(10, 90, 10)) and len(data["modules"]) == 9
    assert len(data["all_modules"]) == 14 and data["backtest"]["best"].startswith("power")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # atomic: no temporary folder left


def test_report_without_backtest_or_candidates(tmp_path: Path) -> None:
    run = make_trajectory(tmp_path / "short", law="linear", steps=[10, 20, 30, 40])
    out = tmp_path / "report"
    result = run_cli("report", run, "--out", out, "--methods", "linear,power", "--modules", "q_proj", "-q")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.png")) == ["coefficients.png", "coefficients_all.png", "energy.png"]
    for png in out.glob("*.png"):
        assert_valid_png(png, min_size=(300, 250))
    markdown = (out / "report.md").read_text()
    assert "no backtest" in markdown and "## Candidates" not in markdown
    assert set(markdown_images(markdown)) == {"energy.png", "coefficients.png", "coefficients_all.png"}
    data = json.loads((out / "report.json").read_text())
    assert [m["name"].split(".", 2)[-1] for m in data["modules"]] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_report_of_a_plain_sweep_lists_its_candidates(tmp_path: Path, linear_run: Path) -> None:
    sweep = tmp_path / "sweep"
    assert run_cli("extrapolate", linear_run, "--coef", "0.5,1", "--method", "linear", "--out", sweep, "-q").exit_code == 0
    out = tmp_path / "report"
    result = run_cli(
        "report", linear_run, "--out", out, "--extrapolation", sweep, "--methods", "linear", "--backtest-methods", "linear", "-q"
    )
    assert result.exit_code == 0, result.output
    markdown = (out / "report.md").read_text()
    assert "| `coef_0.5` |" in markdown and "| `coef_1` |" in markdown and not (out / "candidates.png").exists()


def test_curves_on_a_linear_law(tmp_path: Path) -> None:
    run = make_trajectory(tmp_path / "run", law="linear")
    trajectory = load_trajectory(run)
    settings = RunSettings(progress=False, predictors=PredictorOptions(next=NextOptions(epochs=5)))
    data = compute_report(trajectory, settings, methods=["linear", "next"], backtest_methods=["linear"], max_modules=3, end_step=140)
    assert len(data.modules) == 3 and data.end_step == 140
    for curve in data.modules:
        steps = torch.tensor(curve.steps)
        coefficients = torch.tensor(curve.coefficients)
        torch.testing.assert_close(coefficients / coefficients[-1], steps / steps[-1], rtol=1e-6, atol=1e-6)  # c(t) proportional to t
        grid = torch.tensor(curve.grid)
        linear = torch.tensor(curve.predictions["linear"], dtype=torch.float64)
        torch.testing.assert_close(linear, coefficients[-1].double() * grid.double() / 80, rtol=1e-6, atol=1e-6)  # exact on a linear law
        nxt = curve.predictions["next"]
        assert all(v is None for v, s in zip(nxt, curve.grid) if s < 80) and nxt[curve.grid.index(80.0)] == pytest.approx(
            curve.coefficients[-1]
        )
    for series in data.all_normalised:
        assert series[-1] == pytest.approx(1.0) and series[0] == pytest.approx(10 / 80, rel=1e-6)
    assert data.backtest is not None and data.backtest.errors["linear"] < 1e-6


def test_select_modules_spreads_and_filters() -> None:
    names = [f"base_model.model.model.layers.{i}.self_attn.{p}" for i in range(12) for p in ("q_proj", "v_proj")]
    picked = select_modules(names, limit=4)
    assert len(picked) == 4 and picked[0].endswith("layers.0.self_attn.q_proj") and picked[-1].endswith("layers.11.self_attn.v_proj")
    assert all("v_proj" in n for n in select_modules(names, pattern="v_proj$", limit=30))
    from nextoffline.errors import UsageError

    with pytest.raises(UsageError):
        select_modules(names, pattern="nothing")


def test_missing_matplotlib_is_one_clear_line(tmp_path: Path, linear_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "report"
    result = run_cli("report", linear_run, "--out", out, "-q")
    assert result.exit_code == 1
    assert result.output.strip().startswith("error:") and "pip install 'nextoffline[report]'" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_report_refuses_unsafe_outputs(tmp_path: Path, linear_run: Path) -> None:
    result = run_cli("report", linear_run, "--out", linear_run / "report", "-q")
    assert result.exit_code != 0 and "overlaps the source" in result.output
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    result = run_cli("report", linear_run, "--out", existing, "-q")
    assert result.exit_code != 0 and "--overwrite" in result.output and (existing / "keep.txt").exists()


def test_report_help() -> None:
    result = run_cli("report", "--help")
    assert result.exit_code == 0 and "--extrapolation" in result.output
