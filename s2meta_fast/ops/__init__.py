"""Public, typed entry points to the fused ops.

Each function runs the compiled kernel (``torch.ops.s2meta.<op>``) for tensors on a device the
extension serves and the pure-PyTorch twin in :mod:`s2meta_fast.ops.reference` otherwise; the
twin is also the definition of what the kernel computes. ``s2meta_fast.backend()`` says which.
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _extension
from . import reference

if _extension.BACKEND.extension_loaded:
    from . import _registrations  # noqa: F401  (fake + autograd formulas for every op)

_warned_devices: set = set()


def _use_kernel(device: torch.device) -> bool:
    if _extension.kernels_for(device):
        return True
    if _extension.BACKEND.extension_loaded and device.type not in _warned_devices:
        _warned_devices.add(device.type)
        warnings.warn(f"s2meta_fast has no compiled kernels for {device.type} tensors; using the "
                      f"pure-PyTorch reference ops there ({_extension.BACKEND})", RuntimeWarning, stacklevel=3)
    return False


def grad_preprocess(x: Tensor, p: float = 10.0) -> Tensor:
    """Paper Eq. 12 elementwise: ``(log|x|/p, sign x)`` if ``|x| >= e^-p`` else ``(-1, e^p x)``.

    Args:
        x: float32/float64 tensor of any shape.
        p: the preprocessing constant (10 in the paper).

    Returns:
        Tensor of shape ``x.shape + (2,)``.
    """
    if _use_kernel(x.device):
        return torch.ops.s2meta.grad_preprocess(x, p)
    return reference.grad_preprocess(x, p)


def lstm_update(theta: Tensor, grad: Tensor, loss: Tensor, h: Tensor, c: Tensor,
                w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor,
                ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], w_gate: Tensor, b_gate: Tensor,
                p: float = 10.0, clip: float = 1.0) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One coordinatewise-LSTM update of a parameter tensor (docs/spec.md §3).

    Args:
        theta: parameters, any shape (N scalars).
        grad: their loss gradient, theta's shape (treated as a constant: first order).
        loss: the batch loss, a 0-dim tensor.
        h, c: per-coordinate LSTM state, [N, H].
        w_ih, w_hh, b_ih, b_hh: LSTMCell weights [4H, 5], [4H, H], [4H], [4H] in (i, f, g, o) order.
        ln_weight, ln_bias: LayerNorm affine over the H units, [H] each, or both None.
        w_gate, b_gate: gate heads [2, H], [2]; row 0 gives alpha, row 1 beta.
        p: Eq. 12 constant. clip: gradient clamp.

    Returns:
        ``(theta_new, h_new, c_new, alpha, beta)`` with ``theta_new = beta * theta - alpha * clamp(grad)``.
    """
    if _use_kernel(theta.device):
        return torch.ops.s2meta.lstm_update(theta, grad, loss, h, c, w_ih, w_hh, b_ih, b_hh,
                                            ln_weight, ln_bias, w_gate, b_gate, p, clip)
    return reference.lstm_update(theta, grad, loss, h, c, w_ih, w_hh, b_ih, b_hh,
                                  ln_weight, ln_bias, w_gate, b_gate, p, clip)


def lstm_update_multi(theta: Tensor, grad: Tensor, loss: Tensor, h: Tensor, c: Tensor,
                      offsets: Sequence[int], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor,
                      ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], w_gate: Tensor, b_gate: Tensor,
                      p: float = 10.0, clip: float = 1.0) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The update of all K parameter tensors of S scenarios in one kernel launch.

    Args:
        theta, grad: [S, N], the K tensors of each scenario flattened and concatenated.
        loss: [S], one batch loss per scenario.
        h, c: [S, N, H].
        offsets: K+1 increasing ints; coordinates ``offsets[k]:offsets[k+1]`` use controller k.
        w_ih .. b_gate: the K controllers' weights stacked on a leading dim
            ([K,4H,5], [K,4H,H], [K,4H], [K,4H], [K,H] or None, [K,H] or None, [K,2,H], [K,2]).

    Returns:
        ``(theta_new [S,N], h_new [S,N,H], c_new [S,N,H], alpha [S,N], beta [S,N])``.
    """
    offsets = [int(o) for o in offsets]
    if _use_kernel(theta.device):
        return torch.ops.s2meta.lstm_update_multi(theta, grad, loss, h, c, offsets, w_ih, w_hh, b_ih, b_hh,
                                                  ln_weight, ln_bias, w_gate, b_gate, p, clip)
    return reference.lstm_update_multi(theta, grad, loss, h, c, offsets, w_ih, w_hh, b_ih, b_hh,
                                        ln_weight, ln_bias, w_gate, b_gate, p, clip)


def hinge_score(user_emb: Tensor, pos_emb: Tensor, neg_emb: Tensor, weights: Sequence[Tensor],
                biases: Sequence[Tensor], margin: float = 1.0) -> Tuple[Tensor, Tensor, Tensor]:
    """Scores N (user, pos, neg) triples with the interaction MLP and their mean hinge loss.

    Args:
        user_emb, pos_emb, neg_emb: [N, d] (or [S, N, d] for S scenarios at once).
        weights, biases: the nn.Linear tensors of the MLP, [out, in] and [out]
            (or [S, out, in], [S, out]); ReLU after every layer but the last, which has out = 1.
        margin: hinge margin.

    Returns:
        ``(loss, pos_score, neg_score)``: loss is ``mean(max(0, margin - pos + neg))`` (0-dim, or [S]),
        scores are [N] (or [S, N]).
    """
    weights, biases = list(weights), list(biases)
    if _use_kernel(user_emb.device):
        return torch.ops.s2meta.hinge_score(user_emb, pos_emb, neg_emb, weights, biases, margin)
    return reference.hinge_score(user_emb, pos_emb, neg_emb, weights, biases, margin)


def hinge_score_grad(user_emb: Tensor, pos_emb: Tensor, neg_emb: Tensor, weights: Sequence[Tensor],
                     biases: Sequence[Tensor], margin: float = 1.0
                     ) -> Tuple[Tensor, Tensor, Tensor, List[Tensor], List[Tensor]]:
    """:func:`hinge_score` and the gradient of its loss w.r.t. the MLP, in one fused pass.

    For a first-order inner loop (docs/spec.md §5), which uses the gradient as a value: cheaper than
    ``hinge_score`` followed by ``torch.autograd.grad`` (one pass instead of two, no autograd
    bookkeeping). The outputs are not differentiable.

    Args:
        user_emb, pos_emb, neg_emb, weights, biases, margin: as in :func:`hinge_score`.

    Returns:
        ``(loss, pos_score, neg_score, d_weights, d_biases)``; with a scenario dim, the gradients
        of scenario s are those of ``loss[s]``.
    """
    weights, biases = list(weights), list(biases)
    if _use_kernel(user_emb.device):
        loss, pos_score, neg_score, d_weights, d_biases = torch.ops.s2meta.hinge_score_grad(
            user_emb, pos_emb, neg_emb, weights, biases, margin)
        return loss, pos_score, neg_score, list(d_weights), list(d_biases)
    return reference.hinge_score_grad(user_emb, pos_emb, neg_emb, weights, biases, margin)


def score_matrix(user_emb: Tensor, item_emb: Tensor, weights: Sequence[Tensor],
                 biases: Sequence[Tensor]) -> Tensor:
    """Scores of every (user, item) pair with the interaction MLP, for ranking.

    Args:
        user_emb: [A, d] (or [S, A, d]). item_emb: [B, d] (or [S, B, d]).
        weights, biases: as in :func:`hinge_score`.

    Returns:
        [A, B] (or [S, A, B]) scores.
    """
    weights, biases = list(weights), list(biases)
    if _use_kernel(user_emb.device):
        return torch.ops.s2meta.score_matrix(user_emb, item_emb, weights, biases)
    return reference.score_matrix(user_emb, item_emb, weights, biases)


__all__ = ["reference", "grad_preprocess", "lstm_update", "lstm_update_multi", "hinge_score", "hinge_score_grad", "score_matrix"]
