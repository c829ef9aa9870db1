"""The hybrid recommender (the authors' Taobao config, not in the paper): NeuMF-like."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import FlatRecommender


class HybridRecommender(FlatRecommender):
    """f(u, i) = w · [MLP([e_u, e_i]), e_u ⊙ e_i] + b with MLP 2d → d (ReLU) → d/2 (linear).

    θ holds (W₁, b₁, W₂, b₂, w, b): 6 tensors. The MLP's last layer has no activation, as in the
    authors' ``HybridRecommender`` (``final_activation='none'``).
    """

    kind = "hybrid"

    def __init__(self, embed_dim: int, fused: bool = True):
        if embed_dim < 2 or embed_dim % 2:
            raise ValueError(f"hybrid model: embed_dim must be a positive even number, got {embed_dim}")
        d = embed_dim
        shapes = [(d, 2 * d), (d,), (d // 2, d), (d // 2,), (1, d // 2 + d), (1,)]
        super().__init__(shapes, embed_dim, fused)

    def _features(self, theta: Tensor, users: Tensor, items: Tensor) -> Tensor:
        weights, biases = self.split(theta)
        hidden = torch.cat([users, items], dim=-1) @ weights[0].transpose(-1, -2) + biases[0].unsqueeze(-2)
        mlp = hidden.relu() @ weights[1].transpose(-1, -2) + biases[1].unsqueeze(-2)
        return torch.cat([mlp, users * items], dim=-1)

    def pair_scores(self, theta: Tensor, users: Tensor, items: Tensor) -> Tensor:
        weights, biases = self.split(theta)
        features = self._features(theta, users, items)
        return (features @ weights[2].transpose(-1, -2) + biases[2].unsqueeze(-2)).squeeze(-1)

    def scores(self, theta: Tensor, users: Tensor, items: Tensor) -> Tensor:
        a, b = users.shape[-2], items.shape[-2]
        # broadcast to all pairs and reuse the pairwise path; the hybrid model is small
        u = users.unsqueeze(-2).expand(*users.shape[:-1], b, users.shape[-1]).reshape(users.shape[0], a * b, -1)
        i = items.unsqueeze(-3).expand(items.shape[0], a, b, items.shape[-1]).reshape(items.shape[0], a * b, -1)
        return self.pair_scores(theta, u, i).view(users.shape[0], a, b)
