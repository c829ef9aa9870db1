"""All the randomness of one inner loop, drawn up front.

Drawing it before the loop keeps the loop free of RNG calls, so it can be captured in a CUDA
graph (the draws become static inputs), and lets a test hand the *same* draws to a batched run
and to S single-scenario runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class InnerNoise:
    """Uniform [0, 1) draws for T steps of S scenarios.

    Attributes:
        neg: [T, S, n] one draw per support pair and step: its negative is
            ``pool[(support_item_index + 1 + floor(u (pool_size − 1))) mod pool_size]``.
        stop: [T, S] compared with p⁽ᵗ⁾ for the sampled stop.
        theta0: [S, N] initial parameters for RandInit, else None.
    """

    neg: Tensor
    stop: Tensor
    theta0: Optional[Tensor] = None

    @staticmethod
    def draw(n_steps: int, n_scenarios: int, n_support: int, *, generator: Optional[torch.Generator] = None,
             device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             init_theta=None) -> "InnerNoise":
        """Draws neg, stop and (when `init_theta` is given: a ``generator -> [N]`` callable) theta0."""
        neg = torch.rand(n_steps, n_scenarios, n_support, generator=generator, device=device, dtype=dtype)
        stop = torch.rand(n_steps, n_scenarios, generator=generator, device=device, dtype=dtype)
        theta0 = None
        if init_theta is not None:
            theta0 = torch.stack([init_theta(generator) for _ in range(n_scenarios)])
        return InnerNoise(neg, stop, theta0)

    def select(self, index: slice | Tensor) -> "InnerNoise":
        """The draws of the scenarios `index` (a slice or index tensor over S)."""
        theta0 = None if self.theta0 is None else self.theta0[index]
        return InnerNoise(self.neg[:, index], self.stop[:, index], theta0)

    def tensors(self):
        return [t for t in (self.neg, self.stop, self.theta0) if t is not None]
