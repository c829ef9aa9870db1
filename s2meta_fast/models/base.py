"""Flat-θ bookkeeping shared by every recommender.

All K adapted tensors of a recommender live in one flat tensor ``theta [S, N]`` (design.md):
controllers and fused ops see only that, and the models look at it through per-tensor views.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

Shape = Tuple[int, ...]


class FlatRecommender:
    """Base of the recommenders: maps a flat θ [S, N] to per-tensor views and back.

    Subclasses set ``param_shapes`` (the order in θ) and implement ``loss`` and ``scores``.
    The adapted tensors are the weights and biases of ``nn.Linear`` layers, listed as
    (weight, bias) pairs, so ``split`` returns them as two lists.
    """

    kind: str = ""

    def __init__(self, param_shapes: Sequence[Shape], embed_dim: int, fused: bool = True):
        self.param_shapes: List[Shape] = [tuple(int(d) for d in shape) for shape in param_shapes]
        self.embed_dim = int(embed_dim)
        self.fused = bool(fused)
        self.offsets: List[int] = [0]
        for shape in self.param_shapes:
            self.offsets.append(self.offsets[-1] + math.prod(shape))

    @property
    def n_params(self) -> int:
        return self.offsets[-1]

    @property
    def n_tensors(self) -> int:
        return len(self.param_shapes)

    def views(self, theta: Tensor) -> List[Tensor]:
        """The K tensors of θ [S, N] as views [S, *shape_k] (no copy: gradients reach θ)."""
        if theta.dim() != 2 or theta.shape[1] != self.n_params:
            raise ValueError(f"theta must be [S, {self.n_params}] for this {self.kind} model, "
                             f"got {tuple(theta.shape)}")
        return [theta[:, lo:hi].view(theta.shape[0], *shape)
                for lo, hi, shape in zip(self.offsets[:-1], self.offsets[1:], self.param_shapes)]

    def split(self, theta: Tensor) -> Tuple[List[Tensor], List[Tensor]]:
        """(weights, biases) views of θ [S, N], each with a leading S dim."""
        tensors = self.views(theta)
        return tensors[0::2], tensors[1::2]

    def init_theta(self, generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> Tensor:
        """A fresh θ [N] with PyTorch's nn.Linear default init (kaiming-uniform weights, fan-in biases)."""
        pieces = []
        for weight_shape, bias_shape in zip(self.param_shapes[0::2], self.param_shapes[1::2]):
            # nn.Linear: kaiming_uniform(a=√5) gives U(±1/√fan_in) for the weight, same bound for the bias
            bound = 1.0 / math.sqrt(weight_shape[1])
            for shape in (weight_shape, bias_shape):
                unit = torch.rand(shape, generator=generator, dtype=dtype, device=device)
                pieces.append((unit * 2.0 - 1.0).mul_(bound).reshape(-1))
        return torch.cat(pieces)

    # -- the recommender itself ------------------------------------------------------------
    def loss(self, theta: Tensor, users: Tensor, pos: Tensor, neg: Tensor,
             margin: float = 1.0) -> Tuple[Tensor, Tensor, Tensor]:
        """Mean hinge loss of n triples per scenario.

        Args:
            theta: [S, N]. users, pos, neg: embeddings [S, n, d].
            margin: hinge margin.

        Returns:
            ``(loss [S], pos_score [S, n], neg_score [S, n])``.
        """
        pos_score = self.pair_scores(theta, users, pos)
        neg_score = self.pair_scores(theta, users, neg)
        count = max(users.shape[-2], 1)
        loss = torch.relu(margin - pos_score + neg_score).sum(dim=-1) / count
        return loss, pos_score, neg_score

    def loss_and_grad(self, theta: Tensor, users: Tensor, pos: Tensor, neg: Tensor,
                      margin: float = 1.0) -> Tuple[Tensor, Tensor]:
        """The inner step's loss [S] and its gradient w.r.t. θ [S, N], as constants (first order)."""
        with torch.enable_grad():
            leaf = theta.detach().requires_grad_(True)
            loss = self.loss(leaf, users, pos, neg, margin)[0]
            (grad,) = torch.autograd.grad(loss.sum(), leaf)
        return loss.detach(), grad

    def pair_scores(self, theta: Tensor, users: Tensor, items: Tensor) -> Tensor:
        """f(u_j, i_j) for aligned pairs: users, items [S, n, d] -> [S, n]."""
        raise NotImplementedError

    def scores(self, theta: Tensor, users: Tensor, items: Tensor) -> Tensor:
        """f(u, i) for every pair: users [S, A, d], items [S, B, d] -> [S, A, B]."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(embed_dim={self.embed_dim}, n_params={self.n_params}, "
                f"shapes={self.param_shapes}, fused={self.fused})")
