"""Recommenders over a flat θ [S, N]: ``build_model(kind, embed_dim)``."""
from __future__ import annotations

from .base import FlatRecommender
from .hybrid import HybridRecommender
from .interaction import InteractionRecommender
from .mapping import MappingRecommender

MODELS = {cls.kind: cls for cls in (InteractionRecommender, MappingRecommender, HybridRecommender)}


def build_model(kind: str, embed_dim: int, fused: bool = True) -> FlatRecommender:
    """The recommender named `kind` for embeddings of size `embed_dim`.

    Args:
        kind: "interaction" (the paper's model), "mapping" or "hybrid" (docs/spec.md §2).
        embed_dim: d, the size of the frozen user/item embeddings.
        fused: score through the fused ops (interaction model) instead of their reference twins.
    """
    try:
        cls = MODELS[kind]
    except KeyError:
        raise ValueError(f"unknown recommender kind {kind!r}; valid kinds: {sorted(MODELS)}") from None
    return cls(embed_dim, fused=fused)


__all__ = ["build_model", "FlatRecommender", "InteractionRecommender", "MappingRecommender",
           "HybridRecommender", "MODELS"]
