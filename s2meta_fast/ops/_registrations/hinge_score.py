"""hinge_score: fake shape functions and autograd through the fused backward op.

hinge_score_grad (loss and MLP gradient in one pass, for first-order callers) gets a fake only:
its outputs are gradients used as values, so it has no autograd formula of its own.
"""
from __future__ import annotations

import torch

from ._mlp_checks import check_embedding, check_mlp


def _check_triples(op, user_emb, pos_emb, neg_emb, weights, biases):
    check_mlp(op, user_emb, "user_emb", weights, biases)
    for name, tensor in (("pos_emb", pos_emb), ("neg_emb", neg_emb)):
        check_embedding(op, tensor, name, user_emb, "user_emb")
        torch._check(tensor.shape[-2] == user_emb.shape[-2],
                     lambda: f"{op}: {name} has {tensor.shape[-2]} rows but user_emb has {user_emb.shape[-2]}")


@torch.library.register_fake("s2meta::hinge_score")
def _fake(user_emb, pos_emb, neg_emb, weights, biases, margin=1.0):
    _check_triples("hinge_score", user_emb, pos_emb, neg_emb, weights, biases)
    lead, n = user_emb.shape[:-2], user_emb.shape[-2]
    return user_emb.new_empty(lead), user_emb.new_empty(*lead, n), user_emb.new_empty(*lead, n)


@torch.library.register_fake("s2meta::hinge_score_backward")
def _fake_backward(d_loss, d_pos_score, d_neg_score, user_emb, pos_emb, neg_emb, weights, biases, margin=1.0,
                   emb_grad=True):
    _check_triples("hinge_score_backward", user_emb, pos_emb, neg_emb, weights, biases)
    d_weights = [w.new_empty(w.shape) for w in weights]
    d_biases = [b.new_empty(b.shape) for b in biases]
    if emb_grad:
        embs = [user_emb.new_empty(user_emb.shape) for _ in range(3)]
    else:
        embs = [user_emb.new_empty(0) for _ in range(3)]
    return d_weights, d_biases, *embs


@torch.library.register_fake("s2meta::hinge_score_grad")
def _fake_grad(user_emb, pos_emb, neg_emb, weights, biases, margin=1.0):
    _check_triples("hinge_score_grad", user_emb, pos_emb, neg_emb, weights, biases)  # errors name this op
    loss, pos_score, neg_score = _fake(user_emb, pos_emb, neg_emb, weights, biases, margin)
    return loss, pos_score, neg_score, [w.new_empty(w.shape) for w in weights], [b.new_empty(b.shape) for b in biases]


def _setup_context(ctx, inputs, output):
    user_emb, pos_emb, neg_emb, weights, biases, margin = inputs
    ctx.save_for_backward(user_emb, pos_emb, neg_emb, *weights, *biases)
    ctx.num_layers = len(weights)
    ctx.margin = margin


def _backward(ctx, d_loss, d_pos_score, d_neg_score):
    # Grad mode is on inside a backward only under create_graph=True; the fused backward has no
    # derivative of its own, so say so instead of returning gradients cut from the graph.
    if torch.is_grad_enabled():
        raise RuntimeError("hinge_score: double backward (create_graph=True) is not supported")
    saved = ctx.saved_tensors
    layers = ctx.num_layers
    user_emb, pos_emb, neg_emb = saved[:3]
    weights, biases = list(saved[3:3 + layers]), list(saved[3 + layers:])
    # The inner loop adapts only the MLP: skipping the embedding gradients saves the first layer's
    # input gradient, the widest product of the backward.
    emb_grad = any(ctx.needs_input_grad[:3])
    d_weights, d_biases, d_user, d_pos, d_neg = torch.ops.s2meta.hinge_score_backward(
        d_loss, d_pos_score, d_neg_score, user_emb, pos_emb, neg_emb, weights, biases, ctx.margin, emb_grad)
    if not emb_grad:
        d_user = d_pos = d_neg = None
    grads = (d_user, d_pos, d_neg, list(d_weights), list(d_biases), None)
    # The dispatcher drops trailing arguments equal to their defaults (margin=1.0) before autograd
    # sees them, and for ops with Tensor[] arguments torch < 2.14 wants exactly one gradient per
    # argument it saw, so the margin's None goes when the margin did.
    return grads[:len(ctx.needs_input_grad)]


torch.library.register_autograd("s2meta::hinge_score", _backward, setup_context=_setup_context)
