"""Pure-PyTorch twins of every fused op.

These functions *define* the semantics of the ops in ``torch.ops.s2meta`` (see
``docs/ops.md``): the kernels are tested against them, they are the fallback when the compiled
extension is missing, and their autograd is the oracle for the fused backward kernels.
They are written for clarity, not speed.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

LAYER_NORM_EPS = 1e-5


def grad_preprocess(x: Tensor, p: float = 10.0) -> Tensor:
    """Paper Eq. 12, elementwise; returns ``x.shape + (2,)``.

    ``x -> (log|x| / p, sign x)`` if ``|x| >= e^-p`` else ``(-1, e^p * x)``.
    NaN takes the small branch (``(-1, NaN)``); ``±inf`` gives ``(inf, ±1)``.
    """
    threshold = math.exp(-p)
    magnitude = x.abs()
    large = magnitude >= threshold
    # clamp keeps log finite on the branch that `where` discards, so its gradient stays finite
    log_part = torch.where(large, torch.log(magnitude.clamp_min(threshold)) / p, torch.full_like(x, -1.0))
    sign_part = torch.where(large, torch.sign(x), x * math.exp(p))
    return torch.stack([log_part, sign_part], dim=-1)


def _lstm_segment(theta: Tensor, grad: Tensor, loss: Tensor, h: Tensor, c: Tensor,
                  w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor,
                  ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                  w_gate: Tensor, b_gate: Tensor, p: float, clip: float):
    """docs/spec.md §3 for coordinates sharing one controller.

    theta, grad: [S, n]; loss: [S]; h, c: [S, n, H]. Returns theta_new, h_new, c_new, alpha, beta.
    """
    hidden = h.shape[-1]
    clamped = grad.detach().clamp(-clip, clip)
    n = theta.shape[-1]
    loss_feature = grad_preprocess(loss.detach(), p)[..., :1]  # [S, 1]
    features = torch.cat([
        grad_preprocess(clamped, p),
        grad_preprocess(theta.detach(), p),
        loss_feature.unsqueeze(-2).expand(*theta.shape[:-1], n, 1),
    ], dim=-1)  # [S, n, 5]
    z = features @ w_ih.t() + b_ih + h @ w_hh.t() + b_hh  # [S, n, 4H] in (i, f, g, o) order
    z_i, z_f, z_g, z_o = z.split(hidden, dim=-1)
    c_new = torch.sigmoid(z_f) * c + torch.sigmoid(z_i) * torch.tanh(z_g)
    h_new = torch.sigmoid(z_o) * torch.tanh(c_new)
    if ln_weight is not None:
        h_new = F.layer_norm(h_new, (hidden,), ln_weight, ln_bias, LAYER_NORM_EPS)
    gates = h_new @ w_gate.t() + b_gate  # [S, n, 2]
    alpha = torch.sigmoid(gates[..., 0])
    beta = torch.sigmoid(gates[..., 1])
    theta_new = beta * theta - alpha * clamped
    return theta_new, h_new, c_new, alpha, beta


def _check_layer_norm_pair(ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], op: str) -> None:
    if (ln_weight is None) != (ln_bias is None):
        raise ValueError(f"{op}: ln_weight and ln_bias must both be tensors or both be None")


def lstm_update(theta: Tensor, grad: Tensor, loss: Tensor, h: Tensor, c: Tensor,
                w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor,
                ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                w_gate: Tensor, b_gate: Tensor, p: float = 10.0, clip: float = 1.0):
    """One update-controller step for a single parameter tensor (docs/spec.md §3).

    theta, grad: any shape (N scalars); loss: 0-dim; h, c: [N, H]. Returns
    ``(theta_new, h_new, c_new, alpha, beta)`` with alpha/beta shaped like theta.
    """
    _check_layer_norm_pair(ln_weight, ln_bias, "lstm_update")
    shape = theta.shape
    out = _lstm_segment(theta.reshape(1, -1), grad.reshape(1, -1), loss.reshape(1), h.unsqueeze(0),
                        c.unsqueeze(0), w_ih, w_hh, b_ih, b_hh, ln_weight, ln_bias, w_gate, b_gate, p, clip)
    theta_new, h_new, c_new, alpha, beta = out
    return (theta_new.reshape(shape), h_new.squeeze(0), c_new.squeeze(0),
            alpha.reshape(shape), beta.reshape(shape))


def lstm_update_multi(theta: Tensor, grad: Tensor, loss: Tensor, h: Tensor, c: Tensor,
                      offsets: Sequence[int], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor,
                      ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                      w_gate: Tensor, b_gate: Tensor, p: float = 10.0, clip: float = 1.0):
    """All K tensors of S scenarios in one call (see ``csrc/s2meta.cpp`` for the layout).

    theta, grad: [S, N]; loss: [S]; h, c: [S, N, H]; coordinates in
    ``[offsets[k], offsets[k+1])`` use controller k (weights stacked over a leading K dim).
    """
    _check_layer_norm_pair(ln_weight, ln_bias, "lstm_update_multi")
    pieces = []
    for k in range(len(offsets) - 1):
        lo, hi = offsets[k], offsets[k + 1]
        pieces.append(_lstm_segment(
            theta[:, lo:hi], grad[:, lo:hi], loss, h[:, lo:hi], c[:, lo:hi],
            w_ih[k], w_hh[k], b_ih[k], b_hh[k],
            None if ln_weight is None else ln_weight[k], None if ln_bias is None else ln_bias[k],
            w_gate[k], b_gate[k], p, clip))
    if not pieces:
        empty = theta.new_empty(theta.shape[0], 0)
        return empty, h.new_empty(*h.shape), c.new_empty(*c.shape), empty.clone(), empty.clone()
    return tuple(torch.cat([piece[j] for piece in pieces], dim=1) for j in range(5))


def mlp_forward(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor]) -> Tensor:
    """ReLU MLP over the last dim of x ([..., N, in]); weights [..., out, in]; drops the final 1."""
    last = len(weights) - 1
    for layer, (weight, bias) in enumerate(zip(weights, biases)):
        x = x @ weight.transpose(-1, -2) + bias.unsqueeze(-2)
        if layer < last:
            x = torch.relu(x)
    return x.squeeze(-1)


def hinge_score(user_emb: Tensor, pos_emb: Tensor, neg_emb: Tensor,
                weights: Sequence[Tensor], biases: Sequence[Tensor], margin: float = 1.0):
    """Mean hinge loss of N (user, pos, neg) triples for the interaction module.

    Embeddings [N, d] (or [S, N, d] with per-scenario weights [S, out, in]). Returns
    ``(loss, pos_score, neg_score)``; the loss of an empty batch is 0.
    """
    pos_score = mlp_forward(torch.cat([user_emb, pos_emb], dim=-1), weights, biases)
    neg_score = mlp_forward(torch.cat([user_emb, neg_emb], dim=-1), weights, biases)
    count = max(user_emb.shape[-2], 1)
    loss = torch.relu(margin - pos_score + neg_score).sum(dim=-1) / count
    return loss, pos_score, neg_score


def hinge_score_grad(user_emb: Tensor, pos_emb: Tensor, neg_emb: Tensor,
                     weights: Sequence[Tensor], biases: Sequence[Tensor], margin: float = 1.0):
    """:func:`hinge_score` plus the gradient of each scenario's loss w.r.t. every weight and bias.

    Returns ``(loss, pos_score, neg_score, d_weights, d_biases)``, all detached: the gradients are
    values for a first-order update, not differentiable outputs.
    """
    layers = len(weights)
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in [*weights, *biases]]
        loss, pos_score, neg_score = hinge_score(user_emb.detach(), pos_emb.detach(), neg_emb.detach(),
                                                 leaves[:layers], leaves[layers:], margin)
        grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
    return loss.detach(), pos_score.detach(), neg_score.detach(), grads[:layers], grads[layers:]


def score_matrix(user_emb: Tensor, item_emb: Tensor,
                 weights: Sequence[Tensor], biases: Sequence[Tensor]) -> Tensor:
    """Scores of every (user, item) pair: [A, d] x [B, d] -> [A, B] (or with a leading S dim)."""
    dim = user_emb.shape[-1]
    first_weight, first_bias = weights[0], biases[0]
    user_part = user_emb @ first_weight[..., :dim].transpose(-1, -2) + first_bias.unsqueeze(-2)
    item_part = item_emb @ first_weight[..., dim:].transpose(-1, -2)
    hidden = user_part.unsqueeze(-2) + item_part.unsqueeze(-3)  # [..., A, B, h1]
    if len(weights) == 1:
        return hidden.squeeze(-1)
    hidden = torch.relu(hidden)
    # The remaining layers act on the last dim; give them the scenario dim they expect.
    rest_w = [w.unsqueeze(-3) for w in weights[1:]]
    rest_b = [b.unsqueeze(-2) for b in biases[1:]]
    return mlp_forward(hidden, rest_w, rest_b)
