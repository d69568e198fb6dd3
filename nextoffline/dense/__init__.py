"""Full-parameter trajectories: probing, slab-streamed temporal Grams, HF model folder output, torchrun.

Example:
    >>> from nextoffline.dense import load_dense_trajectory, run_dense_extrapolate
    >>> trajectory = load_dense_trajectory(Path("runs/grpo-full"))
    >>> run_dense_extrapolate(trajectory, device=torch.device("cpu"), chunk_bytes=64 << 20, out_dir=Path("next"), coefs=[1.0])
"""

from nextoffline.dense.layout import DenseTrajectory, is_dense_source, is_full_parameter_run, load_dense_trajectory
from nextoffline.dense.output import run_dense_extrapolate

__all__ = ["DenseTrajectory", "is_dense_source", "is_full_parameter_run", "load_dense_trajectory", "run_dense_extrapolate"]
