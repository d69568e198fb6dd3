"""Diagnostic report of a trajectory: PNG plots and a Markdown summary.

:mod:`~nextoffline.report.data` gathers the numbers through the pipeline's streaming pass
(inspect, backtest, and each module's trajectory rank-1 coefficients with every predictor's
fit and extrapolation); :mod:`~nextoffline.report.plots` and
:mod:`~nextoffline.report.markdown` only display them; :func:`write_report` writes
``report.md``, ``report.json`` and the figures atomically.
"""

from __future__ import annotations

from pathlib import Path

from nextoffline.io.writer import AtomicOutputDir, write_json, write_text
from nextoffline.report.data import (
    REPORT_METHODS,
    ExtrapolationView,
    ModuleCurves,
    ReportData,
    compute_report,
    read_extrapolation,
    select_modules,
)
from nextoffline.report.markdown import render_markdown
from nextoffline.report.plots import (
    FIGURES,
    MissingDependencyError,
    plot_all_coefficients,
    plot_backtest,
    plot_candidates,
    plot_coefficients,
    plot_energy,
    require_matplotlib,
)

__all__ = [
    "REPORT_METHODS",
    "ExtrapolationView",
    "MissingDependencyError",
    "ModuleCurves",
    "ReportData",
    "compute_report",
    "read_extrapolation",
    "render_markdown",
    "require_matplotlib",
    "select_modules",
    "write_report",
]


def write_report(out_dir: Path, data: ReportData, *, overwrite: bool = False) -> dict[str, Path]:
    """Draw the figures and write ``report.md`` and ``report.json`` atomically; returns the written files.

    The caller checks the output location first (:func:`~nextoffline.io.writer.check_output_location`),
    before computing the report.
    """
    plt = require_matplotlib()
    names = dict(FIGURES)
    if data.backtest is None:
        names.pop("backtest")
    if not (data.extrapolation and data.extrapolation.scored):
        names.pop("candidates")
    with AtomicOutputDir(out_dir, overwrite=overwrite) as tmp:
        plot_energy(plt, data, tmp / names["energy"])
        plot_coefficients(plt, data, tmp / names["coefficients"])
        plot_all_coefficients(plt, data, tmp / names["coefficients_all"])
        if "backtest" in names:
            assert data.backtest is not None
            plot_backtest(plt, data.backtest, tmp / names["backtest"])
        if "candidates" in names:
            plot_candidates(plt, data, tmp / names["candidates"])
        write_text(tmp / "report.md", render_markdown(data, names))
        write_json(tmp / "report.json", data.to_json())
    files = {key: out_dir / name for key, name in names.items()}
    files.update(markdown=out_dir / "report.md", json=out_dir / "report.json")
    return files
