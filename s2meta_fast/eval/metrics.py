"""Top-K ranking metrics over score matrices, pooled over (scenario, user) pairs (docs/spec.md §6).

The protocol feeds padded blocks ``scores [S, A, B]`` (S scenarios, A users, B candidate items)
with a boolean relevance tensor of the same shape and masks for the padding. Every metric is a
*sum* over valid (scenario, user) rows plus a row count, so blocks of any size accumulate into
the same pooled mean: the result does not depend on how scenarios were grouped into calls.

Ties are broken by candidate position (a stable descending sort), so equal scores always rank
the same way whatever the backend, thread count or device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

DEFAULT_KS = (10, 20, 50)
METRIC_NAMES = ("recall", "ndcg", "hit")


def metric_keys(ks: Sequence[int]) -> list:
    """The result keys in report order: ``recall@K`` for every K, then ``ndcg@K``, then ``hit@K``."""
    return [f"{name}@{k}" for name in METRIC_NAMES for k in ks]


def check_ks(ks: Sequence[int]) -> tuple:
    """Validates cut-offs (positive ints, no duplicates) and returns them sorted."""
    ks = tuple(ks)
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty list of positive integers, got {list(ks)}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks must not repeat a cut-off, got {list(ks)}")
    return tuple(sorted(ks))


def topk_metric_sums(scores: Tensor, relevance: Tensor, ks: Sequence[int],
                     user_mask: Optional[Tensor] = None, item_mask: Optional[Tensor] = None) -> Dict[str, float]:
    """Recall@K, NDCG@K and HitRate@K summed over the valid rows of a score block.

    Args:
        scores: ``[A, B]`` or ``[S, A, B]`` float scores, higher ranks first.
        relevance: bool tensor of scores' shape; True where the item is an evaluation positive of
            the user.
        ks: cut-offs.
        user_mask: ``[A]`` / ``[S, A]`` bool, False on padded users (their rows are ignored).
        item_mask: ``[B]`` / ``[S, B]`` bool, False on padded items (they never rank).

    Returns:
        ``{"recall@K": sum, "ndcg@K": sum, "hit@K": sum, ..., "count": n_rows}`` where rows with no
        positive are not counted (recall is undefined there).
    """
    rows, valid = _metric_rows(scores, relevance, ks, user_mask, item_mask)
    return _sums(rows, valid)


def topk_metric_sums_by_scenario(scores: Tensor, relevance: Tensor, ks: Sequence[int],
                                 user_mask: Optional[Tensor] = None,
                                 item_mask: Optional[Tensor] = None) -> Tuple[Dict[str, float], List[Dict[str, float]]]:
    """:func:`topk_metric_sums` of an ``[S, A, B]`` block, and the same sums for each scenario
    ``s`` alone, from one ranking pass (the pooled sums are exactly :func:`topk_metric_sums`'s)."""
    rows, valid = _metric_rows(scores, relevance, ks, user_mask, item_mask)
    return _sums(rows, valid), [_sums({k: v[s] for k, v in rows.items()}, valid[s]) for s in range(valid.shape[0])]


def _metric_rows(scores: Tensor, relevance: Tensor, ks: Sequence[int], user_mask: Optional[Tensor],
                 item_mask: Optional[Tensor]) -> Tuple[Dict[str, Tensor], Tensor]:
    """Every metric of every (scenario, user) row ``[S, A]`` and the rows that count."""
    ks = check_ks(ks)
    if scores.dim() == 2:
        scores, relevance = scores.unsqueeze(0), relevance.unsqueeze(0)
        user_mask = None if user_mask is None else user_mask.unsqueeze(0)
        item_mask = None if item_mask is None else item_mask.unsqueeze(0)
    if scores.shape != relevance.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and relevance {tuple(relevance.shape)} must have one shape")
    relevance = relevance.bool()
    scores = scores.detach().to(torch.float64)
    if item_mask is not None:
        # -inf sorts after every real score; a padded item is never relevant, so it cannot count.
        scores = scores.masked_fill(~item_mask.bool().unsqueeze(-2), float("-inf"))
        relevance = relevance & item_mask.bool().unsqueeze(-2)
    n_pos = relevance.sum(dim=-1)                                   # [S, A]
    valid = n_pos > 0
    if user_mask is not None:
        valid = valid & user_mask.bool()
    depth = min(max(ks), scores.shape[-1])
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :depth]
    hits = torch.gather(relevance, -1, order).to(torch.float64)    # [S, A, depth]
    discount = 1.0 / torch.log2(torch.arange(depth, dtype=torch.float64, device=scores.device) + 2.0)
    ideal_cum = torch.cumsum(discount, 0)                           # IDCG for 1..depth positives
    hits_cum = torch.cumsum(hits, dim=-1)
    dcg_cum = torch.cumsum(hits * discount, dim=-1)
    n_pos_f = n_pos.clamp(min=1).to(torch.float64)
    rows: Dict[str, Tensor] = {}
    for k in ks:
        cut = min(k, depth) - 1
        n_hit = hits_cum[..., cut]
        ideal = ideal_cum[(n_pos.clamp(min=1, max=k) - 1).clamp(max=depth - 1)]
        rows[f"recall@{k}"] = n_hit / n_pos_f
        rows[f"ndcg@{k}"] = dcg_cum[..., cut] / ideal
        rows[f"hit@{k}"] = n_hit > 0
    return rows, valid


def _sums(rows: Dict[str, Tensor], valid: Tensor) -> Dict[str, float]:
    out = {name: float(values[valid].sum()) for name, values in rows.items()}
    out["count"] = int(valid.sum())
    return out




@dataclass
class MetricAccumulator:
    """Pools metric sums over blocks of (scenario, user) rows; ``result()`` gives the means."""

    ks: tuple = DEFAULT_KS
    sums: Dict[str, float] = field(default_factory=dict)
    count: int = 0

    def __post_init__(self) -> None:
        self.ks = check_ks(self.ks)
        self.sums = {key: 0.0 for key in metric_keys(self.ks)}

    def add(self, scores: Tensor, relevance: Tensor, user_mask: Optional[Tensor] = None,
            item_mask: Optional[Tensor] = None) -> None:
        self.add_sums(topk_metric_sums(scores, relevance, self.ks, user_mask, item_mask))

    def add_sums(self, block: Dict[str, float]) -> None:
        """Adds the output of :func:`topk_metric_sums` (e.g. computed by another process)."""
        block = dict(block)
        self.count += block.pop("count")
        for key, value in block.items():
            self.sums[key] += value

    def result(self) -> Dict[str, float]:
        if self.count == 0:
            raise ValueError("no (scenario, user) pair with an evaluation positive was scored")
        return {key: self.sums[key] / self.count for key in metric_keys(self.ks)}


def reference_metrics(ranked: Sequence[int], positives: Sequence[int], k: int) -> Dict[str, float]:
    """Textbook Recall/NDCG/Hit@k of one ranked list: the definition the vectorised code must match."""
    top = list(ranked)[:k]
    pos = set(positives)
    n_hit = sum(1 for item in top if item in pos)
    dcg = sum(1.0 / math.log2(rank + 2) for rank, item in enumerate(top) if item in pos)
    idcg = sum(1.0 / math.log2(rank + 2) for rank in range(min(len(pos), k)))
    return {"recall": n_hit / len(pos), "ndcg": dcg / idcg, "hit": float(n_hit > 0)}
