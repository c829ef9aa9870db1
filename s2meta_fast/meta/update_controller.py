"""The update controller of s²Meta (docs/spec.md §3): one coordinatewise LSTM per adapted tensor.

Every scalar of the recommender's flat parameters θ ``[S, N]`` carries its own LSTM state
``(h, c)``; the K tensors (segments of θ, see :attr:`offsets`) each have their own controller
weights, stacked on a leading K dim. One step computes input/forget gates α, β per scalar and
``θ' = β ⊙ θ − α ⊙ clamp(∇)``.

:class:`UpdateController` runs the pure-PyTorch reference (a loop over the K tensors);
:class:`FastUpdateController` runs the fused ``lstm_update_multi`` op (one kernel launch for all
tensors and scenarios). They share constructor, parameters and ``state_dict``, so either can load
the other's checkpoint and they compute the same numbers.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import ops
from ..ops import reference
from ..ops.limits import check_cuda_limits
from .meta_config import STATE_INITS

State = Tuple[Tensor, Tensor]


class _UpdateControllerBase(nn.Module):
    """Parameters, initialisation and argument checks shared by both controllers.

    Args:
        param_shapes: shapes of the K adapted tensors, in the order they are concatenated in θ.
        hidden_size: LSTM hidden size H (16 in the paper).
        p: the Eq. 12 preprocessing constant.
        clip: gradients are clamped to ``[-clip, clip]`` before the update and as a feature.
        layer_norm: apply a learned LayerNorm to the hidden state (the authors' code does).
        forget_bias_fix: where to put the authors' +1 LSTM bias. The authors' code sets the
            bias slice ``[4:8]`` to 1, which with PyTorch's (i, f, g, o) gate order lies inside
            the *input*-gate block (almost certainly meant as the usual forget-gate bias). The
            default ``False`` reproduces that faithfully; ``True`` sets the forget-gate block
            ``b_ih[:, H:2H]`` to 1 instead.
        zero_hh_bias: also zero ``b_hh`` on the slice that gets the +1, as the authors' code
            does, so that slice's total bias is exactly 1. Default ``False``: ``b_hh`` keeps
            LSTMCell's uniform init there too (docs/method.md, departures).
        state_init: the learned initial state's starting value: "zeros" (default) or "normal"
            (N(0, 1) from torch's global RNG, the authors' code).

    Parameters (all stacked over the K tensors): ``w_ih [K,4H,5]``, ``w_hh [K,4H,H]``,
    ``b_ih [K,4H]``, ``b_hh [K,4H]``, ``ln_weight [K,H]``, ``ln_bias [K,H]`` (only with
    ``layer_norm``), ``w_gate [K,2,H]`` (row 0 → α, row 1 → β), ``b_gate [K,2]``, and the learned
    initial state ``h0 [K,H]``, ``c0 [K,H]``.
    """

    def __init__(self, param_shapes: Sequence[Sequence[int]], hidden_size: int = 16, p: float = 10.0,
                 clip: float = 1.0, layer_norm: bool = True, forget_bias_fix: bool = False,
                 zero_hh_bias: bool = False, state_init: str = "zeros") -> None:
        super().__init__()
        shapes = [tuple(int(d) for d in shape) for shape in param_shapes]
        if not shapes:
            raise ValueError("param_shapes must name at least one tensor, got an empty list")
        if any(d < 0 for shape in shapes for d in shape):
            raise ValueError(f"param_shapes must have non-negative sizes, got {shapes}")
        if int(hidden_size) <= 0:
            raise ValueError(f"hidden_size must be positive, got {hidden_size}")
        if not p > 0:
            raise ValueError(f"p must be positive, got {p}")
        if not clip >= 0:
            raise ValueError(f"clip must be non-negative, got {clip}")
        if state_init not in STATE_INITS:
            raise ValueError(f"state_init must be one of {STATE_INITS}, got {state_init!r}")
        self.param_shapes: List[Tuple[int, ...]] = shapes
        self.hidden_size = H = int(hidden_size)
        self.p, self.clip = float(p), float(clip)
        self.layer_norm, self.forget_bias_fix = bool(layer_norm), bool(forget_bias_fix)
        self.zero_hh_bias, self.state_init = bool(zero_hh_bias), state_init
        offsets = [0]
        for shape in shapes:
            offsets.append(offsets[-1] + math.prod(shape))
        self.offsets: List[int] = offsets
        K = len(shapes)

        self.w_ih = nn.Parameter(torch.empty(K, 4 * H, 5))
        self.w_hh = nn.Parameter(torch.empty(K, 4 * H, H))
        self.b_ih = nn.Parameter(torch.empty(K, 4 * H))
        self.b_hh = nn.Parameter(torch.empty(K, 4 * H))
        if self.layer_norm:
            self.ln_weight = nn.Parameter(torch.ones(K, H))
            self.ln_bias = nn.Parameter(torch.zeros(K, H))
        else:
            self.register_parameter("ln_weight", None)
            self.register_parameter("ln_bias", None)
        self.w_gate = nn.Parameter(torch.empty(K, 2, H))
        self.b_gate = nn.Parameter(torch.empty(K, 2))
        self.h0 = nn.Parameter(torch.zeros(K, H))
        self.c0 = nn.Parameter(torch.zeros(K, H))
        # Which controller each coordinate uses; derived from param_shapes, so not saved.
        segment = torch.repeat_interleave(torch.arange(K), torch.tensor([o1 - o0 for o0, o1 in zip(offsets, offsets[1:])]))
        self.register_buffer("segment_index", segment, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """docs/spec.md §3 initialisation (the authors' code), including their bias quirk."""
        H = self.hidden_size
        bound = 1.0 / math.sqrt(H)  # nn.LSTMCell's default
        with torch.no_grad():
            for weight in (self.w_ih, self.w_hh, self.b_ih, self.b_hh):
                weight.uniform_(-bound, bound)
            one = slice(H, 2 * H) if self.forget_bias_fix else slice(4, 8)
            self.b_ih[:, one] = 1.0
            if self.zero_hh_bias:
                self.b_hh[:, one] = 0.0
            for k in range(self.w_gate.shape[0]):
                nn.init.xavier_normal_(self.w_gate[k])
            self.b_gate[:, 0] = 0.0  # α₀ ≈ 0.5
            self.b_gate[:, 1] = 5.0  # β₀ ≈ 0.993
            if self.layer_norm:
                self.ln_weight.fill_(1.0)
                self.ln_bias.zero_()
            if self.state_init == "normal":
                self.h0.normal_()
                self.c0.normal_()
            else:
                self.h0.zero_()
                self.c0.zero_()

    @property
    def n_params(self) -> int:
        """N, the number of scalars in θ."""
        return self.offsets[-1]

    def initial_state(self, num_scenarios: int = 1) -> State:
        """The learned initial ``(h, c)``, ``[S, N, H]`` each (differentiable in h0, c0)."""
        if int(num_scenarios) < 1:
            raise ValueError(f"num_scenarios must be >= 1, got {num_scenarios}")
        shape = (int(num_scenarios), self.n_params, self.hidden_size)
        return self.h0[self.segment_index].expand(shape), self.c0[self.segment_index].expand(shape)

    def _check(self, theta: Tensor, grad: Tensor, loss: Tensor, state: State) -> Tuple[Tensor, Tensor, Tensor]:
        if theta.dim() != 2 or theta.shape[1] != self.n_params:
            raise ValueError(f"theta must have shape [S, {self.n_params}], got {tuple(theta.shape)}")
        if grad.shape != theta.shape:
            raise ValueError(f"grad must have theta's shape {tuple(theta.shape)}, got {tuple(grad.shape)}")
        if loss.dim() == 0 and theta.shape[0] == 1:
            loss = loss.reshape(1)
        if loss.shape != (theta.shape[0],):
            raise ValueError(f"loss must have shape [{theta.shape[0]}] (one per scenario), got {tuple(loss.shape)}")
        if len(state) != 2:
            raise ValueError(f"state must be a pair (h, c), got {len(state)} items")
        h, c = state
        expected = (theta.shape[0], self.n_params, self.hidden_size)
        for name, t in (("h", h), ("c", c)):
            if tuple(t.shape) != expected:
                raise ValueError(f"{name} must have shape {list(expected)}, got {tuple(t.shape)}")
        return loss, h, c

    def _weights(self):
        return (self.w_ih, self.w_hh, self.b_ih, self.b_hh, self.ln_weight, self.ln_bias, self.w_gate, self.b_gate)

    def forward(self, theta: Tensor, grad: Tensor, loss: Tensor, state: State) -> Tuple[Tensor, State, Tensor, Tensor]:
        """One update of θ.

        Args:
            theta: ``[S, N]`` current parameters (differentiable: the meta-gradient flows through β ⊙ θ).
            grad: ``[S, N]`` their loss gradient (treated as a constant: first order).
            loss: ``[S]`` batch loss per scenario (a constant feature).
            state: ``(h, c)``, ``[S, N, H]`` each, from :meth:`initial_state` or the previous step.

        Returns:
            ``(theta_new, (h_new, c_new), alpha, beta)``; alpha and beta are ``[S, N]``.
        """
        loss, h, c = self._check(theta, grad, loss, state)
        theta_new, h_new, c_new, alpha, beta = self._step(theta, grad, loss, h, c, self.offsets, *self._weights(),
                                                          self.p, self.clip)
        return theta_new, (h_new, c_new), alpha, beta

    def extra_repr(self) -> str:
        return (f"tensors={len(self.param_shapes)}, n_params={self.n_params}, hidden_size={self.hidden_size}, "
                f"p={self.p}, clip={self.clip}, layer_norm={self.layer_norm}, "
                f"forget_bias_fix={self.forget_bias_fix}, zero_hh_bias={self.zero_hh_bias}, "
                f"state_init={self.state_init}")


class UpdateController(_UpdateControllerBase):
    """Pure-PyTorch update controller: the reference math, one segment of θ at a time."""

    @staticmethod
    def _step(*args):
        return reference.lstm_update_multi(*args)


class FastUpdateController(_UpdateControllerBase):
    """Fused update controller: all tensors and scenarios in one ``lstm_update_multi`` launch.

    Same constructor, parameters and ``state_dict`` as :class:`UpdateController`.
    """

    @staticmethod
    def _step(*args):
        return ops.lstm_update_multi(*args)

    def check_device(self, device: torch.device) -> None:
        """Raises ValueError if the fused kernels cannot run this controller on `device`."""
        if torch.device(device).type == "cuda":
            check_cuda_limits("FastUpdateController", hidden_size=self.hidden_size,
                              controllers=len(self.param_shapes))

    def _apply(self, fn, recurse=True):
        # Fail where the controller is placed on a GPU, not at its first step (maybe inside a
        # CUDA graph being captured).
        module = super()._apply(fn, recurse)
        self.check_device(self.w_ih.device)
        return module

    def forward(self, theta: Tensor, grad: Tensor, loss: Tensor, state: State) -> Tuple[Tensor, State, Tensor, Tensor]:
        self.check_device(theta.device)
        return super().forward(theta, grad, loss, state)


__all__ = ["UpdateController", "FastUpdateController"]
