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
        neg: [T, S, n] one draw per pair of the step's batch: its negative is
            ``pool[(support_item_index + 1 + floor(u (pool_size − 1))) mod pool_size]``.
        stop: [T, S] compared with p⁽ᵗ⁾ for the sampled stop.
        theta0: [S, N] initial parameters for RandInit, else None.
        pick: [T, S, n] which support pair each batch entry is, ``floor(u · n_support)``
            (drawn with replacement), or None when every step uses all support pairs.
    """

    neg: Tensor
    stop: Tensor
    theta0: Optional[Tensor] = None
    pick: Optional[Tensor] = None

    @staticmethod
    def draw(n_steps: int, n_scenarios: int, n_support: int, *, generator: Optional[torch.Generator] = None,
             device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             init_theta=None, batch_size: Optional[int] = None) -> "InnerNoise":
        """Draws neg, stop, (when `batch_size` is given) pick and (when `init_theta` is given: a
        ``generator -> [N]`` callable) theta0. Without the options the draws are those of a plain
        ``neg, stop`` pair, so adding an option never changes the other draws' meaning."""
        width = n_support if batch_size is None else batch_size
        neg = torch.rand(n_steps, n_scenarios, width, generator=generator, device=device, dtype=dtype)
        stop = torch.rand(n_steps, n_scenarios, generator=generator, device=device, dtype=dtype)
        pick = None
        if batch_size is not None:
            pick = torch.rand(n_steps, n_scenarios, batch_size, generator=generator, device=device, dtype=dtype)
        theta0 = None
        if init_theta is not None:
            theta0 = torch.stack([init_theta(generator) for _ in range(n_scenarios)])
        return InnerNoise(neg, stop, theta0, pick)

    def select(self, index: slice | Tensor) -> "InnerNoise":
        """The draws of the scenarios `index` (a slice or index tensor over S)."""
        theta0 = None if self.theta0 is None else self.theta0[index]
        pick = None if self.pick is None else self.pick[:, index]
        return InnerNoise(self.neg[:, index], self.stop[:, index], theta0, pick)

    def tensors(self):
        return [t for t in (self.neg, self.stop, self.theta0, self.pick) if t is not None]
