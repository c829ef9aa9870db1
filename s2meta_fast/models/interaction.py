"""The paper's recommender (§4.1, Appendix A.2): f(u, i) = MLP([e_u, e_i]) with halving widths."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .. import ops
from ..ops import reference
from .base import FlatRecommender


class InteractionRecommender(FlatRecommender):
    """ReLU MLP 2d → d → d/2 → d/4 → 1 over the concatenated embeddings, biases everywhere.

    θ holds (W₁, b₁, …, W₄, b₄) in nn.Linear layout ([out, in], [out]): 8 tensors,
    10,881 scalars for d = 64. Loss and all-pairs scores go through the fused ``hinge_score``
    and ``score_matrix`` ops (or their reference twins when ``fused=False``).
    """

    kind = "interaction"

    def __init__(self, embed_dim: int, fused: bool = True):
        if embed_dim < 4 or embed_dim % 4:
            raise ValueError(f"interaction model: embed_dim must be a positive multiple of 4 "
                             f"(widths d, d/2, d/4), got {embed_dim}")
        widths = [2 * embed_dim, embed_dim, embed_dim // 2, embed_dim // 4, 1]
        shapes = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            shapes += [(fan_out, fan_in), (fan_out,)]
        super().__init__(shapes, embed_dim, fused)

    def loss(self, theta: Tensor, users: Tensor, pos: Tensor, neg: Tensor,
             margin: float = 1.0) -> Tuple[Tensor, Tensor, Tensor]:
        weights, biases = self.split(theta)
        hinge = ops.hinge_score if self.fused else reference.hinge_score
        return hinge(users, pos, neg, weights, biases, margin)

    def loss_and_grad(self, theta: Tensor, users: Tensor, pos: Tensor, neg: Tensor,
                      margin: float = 1.0) -> Tuple[Tensor, Tensor]:
        if not self.fused:
            return super().loss_and_grad(theta, users, pos, neg, margin)
        # one fused pass gives the loss and every tensor's gradient; no autograd graph is built
        weights, biases = self.split(theta.detach())
        loss, _, _, d_weights, d_biases = ops.hinge_score_grad(users, pos, neg, weights, biases, margin)
        per_tensor = [g for pair in zip(d_weights, d_biases) for g in pair]
        return loss, torch.cat([g.reshape(theta.shape[0], -1) for g in per_tensor], dim=1)

    def pair_scores(self, theta: Tensor, users: Tensor, items: Tensor) -> Tensor:
        weights, biases = self.split(theta)
        return reference.mlp_forward(torch.cat([users, items], dim=-1), weights, biases)

    def scores(self, theta: Tensor, users: Tensor, items: Tensor) -> Tensor:
        weights, biases = self.split(theta)
        score = ops.score_matrix if self.fused else reference.score_matrix
        return score(users, items, weights, biases)
