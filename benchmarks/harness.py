"""What every pytest-benchmark comparison in ``benchmarks/bench_*.py`` shares: the devices a row
runs on, the synchronisation that ends a timed CUDA call, and the compiled reference."""
from __future__ import annotations

from typing import Callable

import pytest
import torch

# Every CUDA row is always collected (the collection check counts them) and skipped without a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA device"))]


def sync(device: str) -> None:
    """Waits for the GPU, so that a timed call includes its kernels."""
    if device == "cuda":
        torch.cuda.synchronize()


def compile_reference(fn: Callable, device: str) -> Callable:
    """torch.compile of a reference function, with CUDA graphs on the GPU (mode="reduce-overhead").

    Dynamo's cache belongs to the reference's code objects, shared by every case: without a reset,
    later cases hit the recompile limit and silently run (or thrash) in eager mode.
    """
    torch._dynamo.reset()
    return torch.compile(fn, mode="reduce-overhead" if device == "cuda" else None, dynamic=False)
