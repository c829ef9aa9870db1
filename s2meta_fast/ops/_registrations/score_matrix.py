"""score_matrix: fake shape function and autograd.

The backward differentiates the pure-PyTorch twin: ranking (docs/spec.md §6) needs no gradients, so the
only callers of this backward are tests and occasional analysis, where clarity beats a kernel.
"""
from __future__ import annotations

import torch

from .. import reference
from ._mlp_checks import check_embedding, check_mlp


@torch.library.register_fake("s2meta::score_matrix")
def _fake(user_emb, item_emb, weights, biases):
    check_mlp("score_matrix", user_emb, "user_emb", weights, biases)
    check_embedding("score_matrix", item_emb, "item_emb", user_emb, "user_emb")
    return user_emb.new_empty(*user_emb.shape[:-2], user_emb.shape[-2], item_emb.shape[-2])


def _setup_context(ctx, inputs, output):
    user_emb, item_emb, weights, biases = inputs
    ctx.save_for_backward(user_emb, item_emb, *weights, *biases)
    ctx.num_layers = len(weights)


def _backward(ctx, grad):
    # The recomputation below starts from detached inputs, so under create_graph=True its result
    # would be cut from the caller's graph: refuse rather than return a wrong second derivative.
    if torch.is_grad_enabled():
        raise RuntimeError("score_matrix: double backward (create_graph=True) is not supported")
    saved = ctx.saved_tensors
    layers = ctx.num_layers
    needs = ctx.needs_input_grad
    flags = [needs[0], needs[1], *needs[2], *needs[3]]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(flag) for t, flag in zip(saved, flags)]
        user_emb, item_emb = leaves[:2]
        weights, biases = leaves[2:2 + layers], leaves[2 + layers:]
        scores = reference.score_matrix(user_emb, item_emb, weights, biases)
        wanted = [t for t in leaves if t.requires_grad]
        found = iter(torch.autograd.grad(scores, wanted, grad, allow_unused=True)) if wanted else iter(())
    grads = [next(found) if t.requires_grad else None for t in leaves]
    return grads[0], grads[1], grads[2:2 + layers], grads[2 + layers:]


torch.library.register_autograd("s2meta::score_matrix", _backward, setup_context=_setup_context)
