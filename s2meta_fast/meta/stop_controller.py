"""Stop controller (docs/spec.md §4, paper Eq. 9): an LSTM over the step's loss and gradient norms."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn

from .. import ops
from ..ops import reference

State = Tuple[Tensor, Tensor]


class StopController(nn.Module):
    """p⁽ᵗ⁾ = σ(w · h⁽ᵗ⁾ + b) with h⁽ᵗ⁾ from an LSTMCell(K+1 → 2(K+1)), batched over S scenarios.

    Inputs per step are the K per-tensor L2 norms of the *unclamped* gradient and the batch loss,
    each reduced to the log-magnitude half of Eq. 12 (``log|x|/p``, or -1 below e^-p), as the
    authors' ``smooth(inputs)[0]``.

    Args:
        n_tensors: K, the number of adapted tensors.
        p: Eq. 12 constant.
        fused: preprocess with the compiled ``grad_preprocess`` op instead of its reference twin.
    """

    def __init__(self, n_tensors: int, p: float = 10.0, fused: bool = True):
        super().__init__()
        if n_tensors <= 0:
            raise ValueError(f"n_tensors must be positive, got {n_tensors}")
        if p <= 0:
            raise ValueError(f"p must be positive, got {p}")
        self.n_inputs = n_tensors + 1
        self.hidden_size = 2 * self.n_inputs
        self.p, self.fused = float(p), fused
        self.lstm = nn.LSTMCell(self.n_inputs, self.hidden_size)
        self.head = nn.Linear(self.hidden_size, 1)
        # the authors draw h0, c0 from N(0, 1) and learn them; the head's bias starts at 0 (p ≈ 0.5)
        self.h0 = nn.Parameter(torch.randn(self.hidden_size))
        self.c0 = nn.Parameter(torch.randn(self.hidden_size))
        with torch.no_grad():
            self.head.bias.zero_()

    def initial_state(self, n_scenarios: int) -> State:
        return (self.h0.unsqueeze(0).expand(n_scenarios, -1), self.c0.unsqueeze(0).expand(n_scenarios, -1))

    def features(self, grad_norms: Tensor, loss: Tensor) -> Tensor:
        """[S, K] norms and [S] losses → [S, K+1] log-magnitude features (stop-gradient)."""
        raw = torch.cat([grad_norms.detach(), loss.detach().unsqueeze(-1)], dim=-1)
        preprocess = ops.grad_preprocess if self.fused else reference.grad_preprocess
        return preprocess(raw.contiguous(), self.p)[..., 0]

    def forward(self, grad_norms: Tensor, loss: Tensor, state: State) -> Tuple[Tensor, State]:
        """One step for S scenarios.

        Args:
            grad_norms: [S, K] L2 norm of each tensor's unclamped gradient.
            loss: [S] batch loss.
            state: (h, c), each [S, 2(K+1)].

        Returns:
            ``(logit [S], (h, c))``; p = sigmoid(logit). The logit, not p, is returned so that
            log(1 − p) = logsigmoid(−logit) stays finite when p saturates.
        """
        if grad_norms.shape[-1] != self.n_inputs - 1:
            raise ValueError(f"grad_norms must be [S, {self.n_inputs - 1}], got {tuple(grad_norms.shape)}")
        h, c = self.lstm(self.features(grad_norms, loss), state)
        return self.head(h).squeeze(-1), (h, c)
