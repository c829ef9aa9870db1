"""The MovieLens-sized workloads that the meta-step and evaluation benchmarks and the studies time.

Recommender: interaction, d = 64 (10,881 adapted scalars); 6,000 users, 4,000 items with random
frozen embeddings. Training batches: 64 support pairs, 128 query triples, a 300-item pool.
Evaluation tasks: 300 items and 300 evaluation users with 10 positives each (90,000 scores per
scenario), 64 support pairs.

Imported as ``workloads`` by ``benchmarks/bench_*.py`` (pytest puts their folder on sys.path)
and by the scripts in ``benchmarks/studies/`` (which add this folder themselves).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import List, Optional

import numpy as np
import torch

from s2meta_fast.data.tasks import EvalTask
from s2meta_fast.meta import MetaConfig, MetaLearner
from s2meta_fast.meta.graphs import GraphedInnerLoop
from s2meta_fast.meta.trainer import TrainConfig, build_optimizer
from s2meta_fast.models import build_model

N_USERS, N_ITEMS, DIM, POOL, SUPPORT, QUERY = 6000, 4000, 64, 300, 64, 128
EVAL_USERS, EVAL_POSITIVES = 300, 10


@dataclass
class Batch:
    """The TaskBatch fields the meta learner reads (docs/design.md)."""

    support_users: torch.Tensor
    support_items: torch.Tensor
    support_item_index: torch.Tensor
    pool: torch.Tensor
    pool_size: torch.Tensor
    query_users: Optional[torch.Tensor]
    query_pos: Optional[torch.Tensor]
    query_neg: Optional[torch.Tensor]

    def to(self, device) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def make_batch(n_scenarios: int, seed: int) -> Batch:
    """A training batch of `n_scenarios` random scenarios."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.stack([torch.randperm(N_ITEMS, generator=gen)[:POOL] for _ in range(n_scenarios)])
    index = torch.randint(POOL, (n_scenarios, SUPPORT), generator=gen)
    q_index = torch.randint(POOL, (n_scenarios, 2, QUERY), generator=gen)
    return Batch(support_users=torch.randint(N_USERS, (n_scenarios, SUPPORT), generator=gen),
                 support_items=pool.gather(1, index), support_item_index=index, pool=pool,
                 pool_size=torch.full((n_scenarios,), POOL),
                 query_users=torch.randint(N_USERS, (n_scenarios, QUERY), generator=gen),
                 query_pos=pool.gather(1, q_index[:, 0]), query_neg=pool.gather(1, q_index[:, 1]))


def make_learner(fused: bool, device: str, t_max: int = 20, dim: int = DIM) -> MetaLearner:
    """A meta learner whose stop controller never stops: every scenario takes all `t_max` updates."""
    torch.manual_seed(0)
    user_emb, item_emb = torch.randn(N_USERS, dim) * 0.3, torch.randn(N_ITEMS, dim) * 0.3
    cfg = MetaConfig(fused=fused, t_max=t_max)
    learner = MetaLearner(build_model("interaction", dim, fused=fused), user_emb, item_emb, cfg).to(device)
    with torch.no_grad():  # p ≈ 0
        learner.stop_controller.head.weight.zero_()
        learner.stop_controller.head.bias.fill_(-30.0)
    return learner


class MetaStep:
    """One meta-training step as the trainer takes it: draws, inner loop, query loss, REINFORCE,
    backward, gradient clip, Adam."""

    def __init__(self, learner: MetaLearner, graphs: bool):
        self.learner = learner
        self.runner = GraphedInnerLoop(learner, "meta_step", enabled=graphs)
        self.optimizer = build_optimizer(learner, TrainConfig())
        self.params = [p for p in learner.parameters() if p.requires_grad]
        self.generator = torch.Generator(device=learner.user_emb.device).manual_seed(0)

    def __call__(self, batch: Batch):
        noise = self.learner.draw_noise(batch, self.generator)
        terms = self.runner(batch, noise)
        torch.nn.utils.clip_grad_value_(self.params, 0.25)
        self.optimizer.step()
        return terms


def make_eval_tasks(n: int, seed: int = 0) -> List[EvalTask]:
    """`n` evaluation scenarios (all users × all items of each are scored)."""
    rng = np.random.default_rng(seed)
    tasks = []
    for s in range(n):
        items = np.sort(rng.choice(N_ITEMS, POOL, replace=False))
        users = np.sort(rng.choice(N_USERS, EVAL_USERS, replace=False))
        positives = np.concatenate([np.sort(rng.choice(items, EVAL_POSITIVES, replace=False)) for _ in users])
        index = rng.integers(0, POOL, SUPPORT)
        tasks.append(EvalTask(f"s{s:05d}", rng.choice(users, SUPPORT), items[index], items, users,
                              np.arange(0, EVAL_USERS * EVAL_POSITIVES + 1, EVAL_POSITIVES), positives, index))
    return tasks


def make_eval_learner(fused: bool, device: str) -> MetaLearner:
    """A meta learner for evaluation timing: 20 fixed inner updates, so every path does the same work."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    user_emb = torch.randn(N_USERS, DIM, generator=gen) * 0.3
    item_emb = torch.randn(N_ITEMS, DIM, generator=gen) * 0.3
    model = build_model("interaction", DIM, fused=fused)
    cfg = MetaConfig(fused=fused, stop="fixed", steps=20)
    return MetaLearner(model, user_emb, item_emb, cfg).to(device)


# --------------------------------------------------------------------------------------------
# serving: one new scenario = 64 support pairs, 1,000 candidates, 100 users to rank them for

CANDIDATES, SERVE_USERS, SERVE_K, SERVE_STEPS = 1000, 100, 20, 20


def make_recommender(fused: bool, device: str):
    """A Recommender over the workload's embeddings, raw ids unlike row numbers (as in data files).

    Untrained (latency does not depend on the weights); ``stop="fixed"`` with 20 steps, the most
    the default inner loop runs, so every path does the same work.
    """
    from s2meta_fast import Recommender

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    user_emb = torch.randn(N_USERS, DIM, generator=gen) * 0.3
    item_emb = torch.randn(N_ITEMS, DIM, generator=gen) * 0.3
    model = build_model("interaction", DIM, fused=fused)
    learner = MetaLearner(model, user_emb, item_emb, MetaConfig(fused=fused, stop="fixed", steps=SERVE_STEPS))
    popularity = torch.randint(0, 100, (N_ITEMS,), generator=gen)
    return Recommender(learner, [1000 + 7 * u for u in range(N_USERS)], [50_000 + 3 * i for i in range(N_ITEMS)],
                       popularity, default_stop="fixed").to(device)


def make_requests(n: int, seed: int = 0) -> list:
    """n (support pairs, candidate ids, user ids) requests in raw ids."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        items = 50_000 + 3 * rng.choice(N_ITEMS, CANDIDATES, replace=False)
        users = 1000 + 7 * rng.choice(N_USERS, SERVE_USERS, replace=False)
        support = list(zip((1000 + 7 * rng.choice(N_USERS, SUPPORT)).tolist(), rng.choice(items, SUPPORT).tolist()))
        out.append((support, items.tolist(), users.tolist()))
    return out


def serve(rec, request, seed: int):
    """One request: adapt to the support pairs, then each user's top-K among the candidates."""
    support, candidates, users = request
    scenario = rec.adapt(support, candidates, seed=seed)
    return scenario, scenario.recommend(users, k=SERVE_K)
