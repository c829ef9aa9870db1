"""Sizes the compiled kernels cannot take, checked where a run is configured rather than mid-run.

The numbers mirror constants of the C++ sources, which enforce them again at every op call:
``kMaxLayers`` (csrc/ops/mlp_args.h), ``kMaxHiddenCuda`` (csrc/ops/cuda/lstm_update_kernel.cu),
``kMaxControllersCuda`` (csrc/ops/lstm_update.h) and the grid's y extent for the scenario count of
the CUDA scoring kernels. python_tests/ops/test_limits.py holds the two sides together.
"""
from __future__ import annotations

from typing import Optional

MAX_MLP_LAYERS = 16        # both backends: per-layer pointers travel in fixed-size arrays
CUDA_MAX_HIDDEN = 16       # lstm_update on CUDA: per-coordinate state lives in registers of that size
CUDA_MAX_CONTROLLERS = 64  # lstm_update on CUDA: segment offsets travel by value in the launch
CUDA_MAX_SCENARIOS = 65535  # hinge_score / score_matrix on CUDA: one grid row per scenario


def cuda_limit_errors(hidden_size: Optional[int] = None, controllers: Optional[int] = None,
                      scenarios: Optional[int] = None) -> list:
    """Messages for every given size the CUDA kernels cannot take (empty when all fit)."""
    errors = []
    if hidden_size is not None and hidden_size > CUDA_MAX_HIDDEN:
        errors.append(f"hidden_size = {hidden_size} exceeds the CUDA kernels' limit of {CUDA_MAX_HIDDEN} "
                      f"(CUDA_MAX_HIDDEN); use hidden_size <= {CUDA_MAX_HIDDEN}, the unfused controller "
                      "(fused: false) or the CPU")
    if controllers is not None and controllers > CUDA_MAX_CONTROLLERS:
        errors.append(f"{controllers} parameter tensors exceed the CUDA kernels' limit of {CUDA_MAX_CONTROLLERS} "
                      "controllers per call (CUDA_MAX_CONTROLLERS)")
    if scenarios is not None and scenarios > CUDA_MAX_SCENARIOS:
        errors.append(f"{scenarios} scenarios in one call exceed the CUDA kernels' limit of {CUDA_MAX_SCENARIOS} "
                      "(CUDA_MAX_SCENARIOS)")
    return errors


def check_cuda_limits(where: str, **sizes) -> None:
    """Raises ValueError naming `where` and every CUDA limit that `sizes` exceed."""
    errors = cuda_limit_errors(**sizes)
    if errors:
        raise ValueError(f"{where}: " + "; ".join(errors))
