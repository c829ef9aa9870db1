"""The mapping recommender (§5.4, the authors' Amazon model): two towers and a dot product."""
from __future__ import annotations

from typing import List

from torch import Tensor

from .base import FlatRecommender


class MappingRecommender(FlatRecommender):
    """f(u, i) = ⟨g_U(e_u), g_I(e_i)⟩ with towers d → d → d (ReLU between the two layers).

    θ holds the user tower's (W₁, b₁, W₂, b₂) then the item tower's: 8 tensors.
    """

    kind = "mapping"

    def __init__(self, embed_dim: int, fused: bool = True):
        if embed_dim < 1:
            raise ValueError(f"mapping model: embed_dim must be positive, got {embed_dim}")
        d = embed_dim
        tower = [(d, d), (d,), (d, d), (d,)]
        super().__init__(tower + tower, embed_dim, fused)

    def _towers(self, theta: Tensor):
        weights, biases = self.split(theta)
        return (weights[:2], biases[:2]), (weights[2:], biases[2:])

    @staticmethod
    def _tower(x: Tensor, weights: List[Tensor], biases: List[Tensor]) -> Tensor:
        # not reference.mlp_forward: that squeezes a trailing width of 1, which a d = 1 tower would hit
        out = x
        for layer, (weight, bias) in enumerate(zip(weights, biases)):
            out = out @ weight.transpose(-1, -2) + bias.unsqueeze(-2)
            if layer < len(weights) - 1:
                out = out.relu()
        return out

    def pair_scores(self, theta: Tensor, users: Tensor, items: Tensor) -> Tensor:
        (uw, ub), (iw, ib) = self._towers(theta)
        return (self._tower(users, uw, ub) * self._tower(items, iw, ib)).sum(dim=-1)

    def scores(self, theta: Tensor, users: Tensor, items: Tensor) -> Tensor:
        (uw, ub), (iw, ib) = self._towers(theta)
        return self._tower(users, uw, ub) @ self._tower(items, iw, ib).transpose(-1, -2)


__all__ = ["MappingRecommender"]
