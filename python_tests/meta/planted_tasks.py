"""Planted few-shot tasks: each scenario likes the items aligned with its hidden direction."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import List, Optional

import torch
from torch import Tensor

try:  # the data layer's TaskBatch when it has landed, else a twin with the design.md fields
    from s2meta_fast.data.tasks import TaskBatch
except ImportError:  # pragma: no cover - depends on the data layer's progress
    @dataclass
    class TaskBatch:
        support_users: Tensor
        support_items: Tensor
        support_item_index: Tensor
        pool: Tensor
        pool_size: Tensor
        query_users: Optional[Tensor]
        query_pos: Optional[Tensor]
        query_neg: Optional[Tensor]
        names: List[str]

        def to(self, device) -> "TaskBatch":
            moved = {f.name: getattr(self, f.name) for f in fields(self)}
            for key, value in moved.items():
                if isinstance(value, Tensor):
                    moved[key] = value.to(device)
            return TaskBatch(**moved)


def planted_world(n_users=40, n_items=60, dim=8, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    user_emb = torch.randn(n_users, dim, generator=gen, dtype=dtype)
    item_emb = torch.randn(n_items, dim, generator=gen, dtype=dtype)
    return user_emb, item_emb


def planted_batch(item_emb: Tensor, n_users: int, n_scenarios: int, n_support: int = 16, n_query: int = 16,
                  pool_sizes=None, seed: int = 0) -> TaskBatch:
    """S scenarios; each scenario's positives are its pool's items best aligned with a hidden
    direction, negatives the worst aligned, so a good θ is easy to find and share."""
    gen = torch.Generator().manual_seed(seed)
    n_items = item_emb.shape[0]
    pool_sizes = pool_sizes or [12 + (3 * s) % 9 for s in range(n_scenarios)]
    width = max(pool_sizes)
    pools, s_users, s_items, s_index, q_users, q_pos, q_neg = [], [], [], [], [], [], []
    direction = item_emb[:4].mean(0)  # shared across scenarios: meta-learnable
    for s, size in enumerate(pool_sizes):
        pool = torch.randperm(n_items, generator=gen)[:size]
        order = torch.argsort(item_emb[pool] @ direction, descending=True)
        liked, disliked = order[: size // 3], order[-(size // 3):]
        pick = liked[torch.randint(len(liked), (n_support,), generator=gen)]
        s_index.append(pick)
        s_items.append(pool[pick])
        s_users.append(torch.randint(n_users, (n_support,), generator=gen))
        q_users.append(torch.randint(n_users, (n_query,), generator=gen))
        q_pos.append(pool[liked[torch.randint(len(liked), (n_query,), generator=gen)]])
        q_neg.append(pool[disliked[torch.randint(len(disliked), (n_query,), generator=gen)]])
        pools.append(torch.cat([pool, pool[:1].expand(width - size)]))
    return TaskBatch(support_users=torch.stack(s_users), support_items=torch.stack(s_items),
                     support_item_index=torch.stack(s_index), pool=torch.stack(pools),
                     pool_size=torch.tensor(pool_sizes), query_users=torch.stack(q_users),
                     query_pos=torch.stack(q_pos), query_neg=torch.stack(q_neg),
                     names=[f"planted{s}" for s in range(n_scenarios)])


def select(batch: TaskBatch, index: slice) -> TaskBatch:
    """Scenarios `index` of a batch, as their own TaskBatch."""
    moved = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        moved[f.name] = value[index] if isinstance(value, (Tensor, list)) else value
    return type(batch)(**moved)
