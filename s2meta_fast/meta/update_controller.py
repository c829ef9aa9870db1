"""Update controllers: one coordinatewise LSTM per adapted tensor (SPEC §3, paper Eqs. 7-8).

`UpdateController` is the pure-PyTorch implementation; `FastUpdateController` has the same
constructor and parameters and runs the fused `lstm_update_multi` op (one launch per step for
all tensors and all scenarios).
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import ops
from ..ops import _reference

State = Tuple[Tensor, Tensor]


class UpdateController(nn.Module):
    """Coordinatewise-LSTM update rule ``θ' = β ⊙ θ − α ⊙ clamp(∇)`` for a flat θ [S, N].

    Args:
        param_shapes: shapes of the K adapted tensors, in the order they are concatenated in θ.
        hidden_size: H, the LSTM width per coordinate (16 in the paper).
        p: Eq. 12 preprocessing constant.
        clip: gradient clamp; the clamped gradient is also the one used in the update.
        layer_norm: LayerNorm over the H units of the new hidden state (authors' code).
        forget_bias_fix: the authors set ``b_ih[4:8] = 1``, which lies inside the *input*-gate
            block of PyTorch's (i, f, g, o) layout, although a forget-gate bias was almost
            certainly meant. False (default) reproduces their code; True sets the forget-gate
            block ``b_ih[H:2H] = 1`` instead.
    """

    def __init__(self, param_shapes: Sequence[Sequence[int]], hidden_size: int = 16, p: float = 10.0,
                 clip: float = 1.0, layer_norm: bool = True, forget_bias_fix: bool = False):
        super().__init__()
        if len(param_shapes) == 0:
            raise ValueError("param_shapes: need at least one tensor to adapt")
        if hidden_size <= 0:
            raise ValueError(f"hidden_size must be positive, got {hidden_size}")
        if p <= 0 or clip <= 0:
            raise ValueError(f"p and clip must be positive, got p={p}, clip={clip}")
        self.param_shapes = [tuple(int(d) for d in shape) for shape in param_shapes]
        sizes = [math.prod(shape) for shape in self.param_shapes]
        self.offsets: List[int] = [0]
        for size in sizes:
            self.offsets.append(self.offsets[-1] + size)
        self.hidden_size, self.p, self.clip = hidden_size, float(p), float(clip)
        self.forget_bias_fix = forget_bias_fix
        k, h = len(sizes), hidden_size
        self.w_ih = nn.Parameter(torch.empty(k, 4 * h, 5))
        self.w_hh = nn.Parameter(torch.empty(k, 4 * h, h))
        self.b_ih = nn.Parameter(torch.empty(k, 4 * h))
        self.b_hh = nn.Parameter(torch.empty(k, 4 * h))
        if layer_norm:
            self.ln_weight = nn.Parameter(torch.ones(k, h))
            self.ln_bias = nn.Parameter(torch.zeros(k, h))
        else:
            self.register_parameter("ln_weight", None)
            self.register_parameter("ln_bias", None)
        self.w_gate = nn.Parameter(torch.empty(k, 2, h))
        self.b_gate = nn.Parameter(torch.empty(k, 2))
        self.h0 = nn.Parameter(torch.zeros(k, h))
        self.c0 = nn.Parameter(torch.zeros(k, h))
        self.reset_parameters()

    @property
    def n_params(self) -> int:
        return self.offsets[-1]

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)  # nn.LSTMCell's default
        with torch.no_grad():
            for weight in (self.w_ih, self.w_hh, self.b_ih, self.b_hh):
                weight.uniform_(-bound, bound)
            if self.forget_bias_fix:
                self.b_ih[:, self.hidden_size:2 * self.hidden_size] = 1.0
            else:
                self.b_ih[:, 4:8] = 1.0
            for k in range(self.w_gate.shape[0]):
                nn.init.xavier_normal_(self.w_gate[k])
            self.b_gate[:, 0] = 0.0   # α₀ ≈ 0.5
            self.b_gate[:, 1] = 5.0   # β₀ ≈ 0.993: start close to "keep θ"
            self.h0.zero_()
            self.c0.zero_()

    def initial_state(self, n_scenarios: int) -> State:
        """Per-coordinate (h, c) [S, N, H], each coordinate starting from its tensor's h0/c0."""
        counts = torch.tensor([hi - lo for lo, hi in zip(self.offsets[:-1], self.offsets[1:])],
                              device=self.h0.device)
        h = torch.repeat_interleave(self.h0, counts, dim=0, output_size=self.n_params)
        c = torch.repeat_interleave(self.c0, counts, dim=0, output_size=self.n_params)
        return (h.unsqueeze(0).expand(n_scenarios, -1, -1), c.unsqueeze(0).expand(n_scenarios, -1, -1))

    def _update(self, theta: Tensor, grad: Tensor, loss: Tensor, h: Tensor, c: Tensor):
        return _reference.lstm_update_multi(theta, grad, loss, h, c, self.offsets, self.w_ih, self.w_hh,
                                            self.b_ih, self.b_hh, self.ln_weight, self.ln_bias,
                                            self.w_gate, self.b_gate, self.p, self.clip)

    def forward(self, theta: Tensor, grad: Tensor, loss: Tensor, state: State):
        """One update of S scenarios' flat parameters.

        Args:
            theta: [S, N] parameters (gradients flow through β ⊙ θ).
            grad: [S, N] loss gradients (a constant: first-order meta-gradient).
            loss: [S] batch losses.
            state: (h, c), each [S, N, H].

        Returns:
            ``(theta_new, (h_new, c_new), alpha, beta)``; alpha and beta are [S, N].
        """
        if theta.dim() != 2 or theta.shape[1] != self.n_params:
            raise ValueError(f"theta must be [S, {self.n_params}], got {tuple(theta.shape)}")
        if grad.shape != theta.shape:
            raise ValueError(f"grad must match theta's shape {tuple(theta.shape)}, got {tuple(grad.shape)}")
        if loss.shape != theta.shape[:1]:
            raise ValueError(f"loss must be [S] = [{theta.shape[0]}], got {tuple(loss.shape)}")
        h, c = state
        theta_new, h_new, c_new, alpha, beta = self._update(theta, grad.detach(), loss.detach(), h, c)
        return theta_new, (h_new, c_new), alpha, beta


class FastUpdateController(UpdateController):
    """Drop-in for :class:`UpdateController` on the fused ``lstm_update_multi`` op."""

    def _update(self, theta: Tensor, grad: Tensor, loss: Tensor, h: Tensor, c: Tensor):
        return ops.lstm_update_multi(theta, grad, loss, h, c, self.offsets, self.w_ih, self.w_hh,
                                     self.b_ih, self.b_hh, self.ln_weight, self.ln_bias,
                                     self.w_gate, self.b_gate, self.p, self.clip)
