"""nextoffline: checkpoint-offline extrapolation of LoRA training trajectories (RLVR)."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "NextOptions",
    "PredictorOptions",
    "RunSettings",
    "__version__",
    "backtest",
    "extrapolate",
    "inspect_trajectory",
    "load_trajectory",
    "save_extrapolation",
]


def __getattr__(name: str):  # lazy: importing the package stays cheap for the CLI's --help
    if name == "load_trajectory":
        from nextoffline.trajectory import load_trajectory

        return load_trajectory
    if name in ("inspect_trajectory", "backtest", "extrapolate", "RunSettings", "PredictorOptions", "NextOptions"):
        from nextoffline import pipeline

        return getattr(pipeline, name)
    if name == "save_extrapolation":
        from nextoffline.output import save_extrapolation

        return save_extrapolation
    raise AttributeError(name)
