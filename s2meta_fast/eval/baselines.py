"""The methods of Table 3 as :class:`~s2meta_fast.eval.protocol.Method` adapters.

- :class:`ItemPop` — scenario popularity in D_train (the 64 support pairs).
- :class:`GlobalModel` — the same recommender, one θ trained on all meta-train scenario
  interactions (+ the source domain when the data exposes it) with the hinge loss; no adaptation.
- :class:`Finetune` — the global θ fine-tuned per test scenario on its 64 support pairs with
  plain SGD; lr and steps chosen on the meta-validation scenarios (:func:`select_finetune`).
- :class:`S2Meta` — a trained ``MetaLearner`` adapting on the support pairs.

Every learned method scores with ``model.scores`` (the fused ``score_matrix`` op for the
interaction module): all users × all items of every scenario of a block in one call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import trange

from .protocol import evaluate, evaluate_step_counts


# --------------------------------------------------------------------------------------------
# ItemPop


class ItemPop:
    """Ranks a scenario's items by their count among its support pairs.

    Ties (most items of a scenario never appear among 64 support pairs) are broken by global
    popularity — interactions in the data the method is allowed to see (meta-train scenarios +
    source domain), given as ``global_counts`` — and then by position in the scenario's item
    list (the metrics' stable sort). Without ``global_counts`` only the position breaks ties.
    """

    name = "itempop"

    def __init__(self, global_counts: Optional[np.ndarray] = None, device: str | torch.device = "cpu"):
        self.global_counts = None
        if global_counts is not None:
            counts = torch.as_tensor(np.asarray(global_counts), dtype=torch.float64, device=device)
            # Scaled into [0, 1): can reorder items of equal support count, never across counts.
            self.global_counts = counts / (counts.max().clamp(min=0) + 1.0)

    def adapt(self, tasks: Sequence[Any], generator: torch.Generator) -> Dict[int, Tensor]:
        return {s: torch.as_tensor(np.asarray(t.support_items, dtype=np.int64)) for s, t in enumerate(tasks)}

    def score(self, state: Dict[int, Tensor], users: Tensor, items: Tensor) -> Tensor:
        scores = torch.zeros(items.shape, dtype=torch.float64, device=items.device)
        for s, support in state.items():
            support = support.to(items.device)
            scores[s] = (items[s].unsqueeze(1) == support.unsqueeze(0)).sum(dim=1).to(torch.float64)
        if self.global_counts is not None:
            scores = scores + self.global_counts[items]
        return scores.unsqueeze(1).expand(items.shape[0], users.shape[1], items.shape[1])


def global_item_counts(prepared: Any) -> np.ndarray:
    """Interactions per item over the meta-train scenarios and the source domain (if any)."""
    counts = np.zeros(prepared.item_emb.shape[0], dtype=np.int64)
    for scenario in prepared.train:
        np.add.at(counts, np.asarray(scenario.items, dtype=np.int64), 1)
    source = _source_pairs(prepared)
    if source is not None:
        np.add.at(counts, source[1], 1)
    return counts


# --------------------------------------------------------------------------------------------
# Models with a θ: Global, Finetune, s²Meta


class _ThetaScorer:
    """Scores a block with ``model.scores`` and per-scenario θ ``[S, N]``."""

    def __init__(self, model: Any, user_emb: Tensor, item_emb: Tensor):
        self.model, self.user_emb, self.item_emb = model, user_emb, item_emb

    def score(self, theta: Tensor, users: Tensor, items: Tensor) -> Tensor:
        return self.model.scores(theta, self.user_emb[users], self.item_emb[items])


def _source_pairs(prepared: Any) -> Optional[tuple]:
    """(users, items) of the source domain (``PreparedData.source_users/items``), None when empty."""
    users = getattr(prepared, "source_users", None)
    items = getattr(prepared, "source_items", None)
    if users is None or items is None or len(users) == 0:
        return None
    return np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64)


@dataclass(frozen=True)
class GlobalTrainConfig:
    """Hyper-parameters of the Global baseline (fixed, not tuned: see docs/evaluation.md)."""

    steps: int = 2000
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.0
    use_source: bool = True
    use_scenarios: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"GlobalTrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"GlobalTrainConfig.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"GlobalTrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if not (self.use_scenarios or self.use_source):
            raise ValueError("GlobalTrainConfig: use_scenarios and use_source are both off: nothing to train on")


class _PairPool:
    """Positive pairs with their negative pools in CSR form, for device-side negative sampling.

    Pair j belongs to group g[j] (a scenario, or the source domain); its negative is drawn
    uniformly from group g[j]'s items other than the positive — the same rule as the inner loop.
    """

    def __init__(self, groups: Sequence[tuple], device: torch.device):
        users, items, pos_index, group_of, pools, offsets = [], [], [], [], [], [0]
        for g, (u, i) in enumerate(groups):
            pool, inverse = np.unique(i, return_inverse=True)
            users.append(u)
            items.append(i)
            pos_index.append(inverse)
            group_of.append(np.full(len(u), g, dtype=np.int64))
            pools.append(pool)
            offsets.append(offsets[-1] + len(pool))
        cat = lambda parts: torch.as_tensor(np.concatenate(parts), dtype=torch.long, device=device)  # noqa: E731
        self.users, self.items, self.pos_index = cat(users), cat(items), cat(pos_index)
        self.group = cat(group_of)
        self.pool = cat(pools)
        self.offsets = torch.as_tensor(offsets, dtype=torch.long, device=device)
        self.size = self.offsets[1:] - self.offsets[:-1]

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def batch(self, n: int, generator: torch.Generator) -> tuple:
        device = self.users.device
        j = torch.randint(len(self), (n,), generator=generator, device=device)
        g, size = self.group[j], self.size[self.group[j]]
        u = torch.rand(n, generator=generator, device=device)
        shift = 1 + torch.floor(u * (size - 1).clamp(min=0)).long()
        neg_index = (self.pos_index[j] + shift) % size.clamp(min=1)
        return self.users[j], self.items[j], self.pool[self.offsets[g] + neg_index]


def train_global(model: Any, user_emb: Tensor, item_emb: Tensor, prepared: Any, cfg: GlobalTrainConfig,
                 seed: int = 0, progress: bool = True) -> Tensor:
    """Trains one θ ``[N]`` of ``model`` on all meta-train scenario pairs (+ source domain; either
    one alone with ``cfg.use_source`` / ``cfg.use_scenarios`` off).

    Each batch draws positives uniformly over the union of pairs; a scenario pair's negative comes
    from its scenario's items (what the test ranks among), a source pair's from the source items.
    """
    device = user_emb.device
    groups = [(np.asarray(s.users, dtype=np.int64), np.asarray(s.items, dtype=np.int64))
              for s in (prepared.train if cfg.use_scenarios else [])]
    source = _source_pairs(prepared) if cfg.use_source else None
    if source is not None:
        groups.append(source)
    groups = [g for g in groups if len(g[0]) > 1]
    if not groups:
        what = " or ".join(name for name, used in (("meta-train scenario", cfg.use_scenarios),
                                                    ("source-domain interaction", cfg.use_source)) if used)
        raise ValueError(f"the Global baseline has no training interactions (no {what})")
    pairs = _PairPool(groups, device)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    cpu_gen = torch.Generator().manual_seed(int(seed))
    theta = torch.nn.Parameter(model.init_theta(cpu_gen).to(device=device, dtype=user_emb.dtype).unsqueeze(0))
    optimiser = torch.optim.Adam([theta], lr=cfg.lr, weight_decay=cfg.weight_decay)
    for _ in trange(cfg.steps, desc="train global", unit="step", disable=not progress, leave=False):
        u, pos, neg = pairs.batch(cfg.batch_size, generator)
        loss = model.loss(theta, user_emb[u].unsqueeze(0), item_emb[pos].unsqueeze(0),
                          item_emb[neg].unsqueeze(0))[0].sum()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return theta.detach()[0]


class GlobalModel(_ThetaScorer):
    """One θ for every scenario: the non-scenario-aware baseline (NeuMF's role in Table 3)."""

    name = "global"

    def __init__(self, model: Any, theta: Tensor, user_emb: Tensor, item_emb: Tensor):
        super().__init__(model, user_emb, item_emb)
        self.theta = theta

    def adapt(self, tasks: Sequence[Any], generator: torch.Generator) -> Tensor:
        return self.theta.unsqueeze(0).expand(len(tasks), -1)


# --------------------------------------------------------------------------------------------
# Finetune


def _support_tensors(tasks: Sequence[Any], device: torch.device) -> tuple:
    """Padded support users/items, each positive's index in its scenario pool, pools, pool sizes."""
    n_sup = max(len(t.support_users) for t in tasks)
    width = max(len(t.items) for t in tasks)
    users = np.zeros((len(tasks), n_sup), dtype=np.int64)
    items = np.zeros_like(users)
    index = np.zeros_like(users)
    weight = np.zeros(users.shape, dtype=np.float64)
    pool = np.zeros((len(tasks), width), dtype=np.int64)
    size = np.zeros(len(tasks), dtype=np.int64)
    for s, t in enumerate(tasks):
        k = len(t.support_users)
        scenario_items = np.unique(np.asarray(t.items, dtype=np.int64))
        pool[s, :len(scenario_items)] = scenario_items
        size[s] = len(scenario_items)
        users[s, :k] = t.support_users
        items[s, :k] = t.support_items
        index[s, :k] = np.searchsorted(scenario_items, items[s, :k])
        weight[s, :k] = 1.0 / k
    as_t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
    return as_t(users), as_t(items), as_t(index), as_t(pool), as_t(size), as_t(weight)


class Finetune(_ThetaScorer):
    """The global θ fine-tuned on each test scenario's support pairs by plain SGD.

    Every step uses all support pairs, each with a fresh negative drawn uniformly from the
    scenario's other items (the inner-loop rule), and the mean hinge loss.
    """

    name = "finetune"

    def __init__(self, model: Any, theta: Tensor, user_emb: Tensor, item_emb: Tensor, lr: float, steps: int):
        super().__init__(model, user_emb, item_emb)
        if not lr > 0 or steps < 0:
            raise ValueError(f"Finetune needs lr > 0 and steps >= 0, got lr={lr}, steps={steps}")
        self.theta, self.lr, self.steps = theta, float(lr), int(steps)

    def trajectory(self, tasks: Sequence[Any], generator: torch.Generator, snapshots: Sequence[int]) -> Dict[int, Tensor]:
        """θ ``[S, N]`` after each step count in ``snapshots`` (one SGD run serves a whole grid)."""
        device = self.theta.device
        users, items, index, pool, size, weight = _support_tensors(tasks, device)
        weight = weight.to(self.theta.dtype)
        u_emb, p_emb = self.user_emb[users], self.item_emb[items]
        theta = self.theta.unsqueeze(0).repeat(len(tasks), 1)
        wanted, out = set(snapshots), {}
        for step in range(max(snapshots, default=0) + 1):
            if step in wanted:
                out[step] = theta.detach().clone()
            if step == max(snapshots):
                break
            draw = torch.rand(users.shape, generator=generator, device=device, dtype=self.theta.dtype)
            shift = 1 + torch.floor(draw * (size - 1).clamp(min=0).unsqueeze(1)).long()
            neg = torch.gather(pool, 1, (index + shift) % size.clamp(min=1).unsqueeze(1))
            with torch.enable_grad():
                theta = theta.detach().requires_grad_(True)
                _, pos_score, neg_score = self.model.loss(theta, u_emb, p_emb, self.item_emb[neg])
                # Per-pair hinge with padding weights: padded support rows contribute nothing.
                loss = (torch.relu(1.0 - pos_score + neg_score) * weight).sum()
                (grad,) = torch.autograd.grad(loss, theta)
            theta = theta.detach() - self.lr * grad
        return out

    def adapt(self, tasks: Sequence[Any], generator: torch.Generator) -> Tensor:
        return self.trajectory(tasks, generator, [self.steps])[self.steps]


@dataclass(frozen=True)
class FinetuneGrid:
    """The search space for the fine-tuning baseline (chosen on meta-validation Recall@20)."""

    lrs: tuple = (0.001, 0.01, 0.1, 1.0)
    steps: tuple = (5, 10, 20, 50, 100)
    metric: str = "recall@20"

    def __post_init__(self) -> None:
        if not self.lrs or any(not lr > 0 for lr in self.lrs):
            raise ValueError(f"FinetuneGrid.lrs must be positive numbers, got {list(self.lrs)}")
        if not self.steps or any(int(s) < 1 for s in self.steps):
            raise ValueError(f"FinetuneGrid.steps must be positive integers, got {list(self.steps)}")


def select_finetune(model: Any, theta: Tensor, user_emb: Tensor, item_emb: Tensor, valid_tasks: Sequence[Any],
                    grid: FinetuneGrid = FinetuneGrid(), ks: Sequence[int] = (20,), seed: int = 0,
                    block_size: int = 16, progress: bool = False) -> Dict[str, Any]:
    """Picks (lr, steps) for :class:`Finetune` by the validation metric; one SGD run per lr.

    Returns ``{"lr", "steps", "score", "table": {(lr, steps): score}}``. Ties prefer fewer steps,
    then the smaller lr (the cheaper, more conservative choice).
    """
    if not valid_tasks:
        raise ValueError("select_finetune needs meta-validation tasks")
    ks = tuple(sorted(set(ks) | {int(grid.metric.split("@")[1])}))
    device = theta.device
    table: Dict[tuple, float] = {}
    steps = sorted(int(s) for s in grid.steps)
    for lr in grid.lrs:
        tuner = Finetune(model, theta, user_emb, item_emb, lr, steps[-1])
        results = evaluate_step_counts("finetune-grid", tuner.trajectory, tuner.score, valid_tasks, steps, ks,
                                       seed=seed, device=device, block_size=block_size, progress=progress)
        for s, result in results.items():
            table[(lr, s)] = result["metrics"][grid.metric]
    best = max(table, key=lambda key: (table[key], -key[1], -key[0]))
    return {"lr": best[0], "steps": best[1], "score": table[best],
            "table": {f"lr={lr},steps={s}": v for (lr, s), v in table.items()}}


# --------------------------------------------------------------------------------------------
# s²Meta


class S2Meta(_ThetaScorer):
    """A trained ``MetaLearner``: learned init, update and stop controllers adapt each scenario.

    The inner loop runs through the meta engineer's ``GraphedInnerLoop`` in "adapt" mode: one
    CUDA-graph replay per block on a GPU, the same code eagerly elsewhere (identical numbers:
    the random draws are made up front with the block's generator either way).
    """

    name = "s2meta"

    def __init__(self, learner: Any, stop: str = "sample", support_batch: Any = None, cuda_graphs: bool = True):
        super().__init__(learner.model, learner.user_emb, learner.item_emb)
        if support_batch is None:
            from ..data.tasks import support_batch
        from ..meta.graphs import GraphedInnerLoop

        self.learner, self.stop, self._support_batch = learner, stop, support_batch
        self.runner = GraphedInnerLoop(learner, "adapt", stop=stop, enabled=cuda_graphs)

    def adapt(self, tasks: Sequence[Any], generator: torch.Generator) -> Tensor:
        batch = self._support_batch(list(tasks)).to(self.user_emb.device)
        noise = self.learner.draw_noise(batch, generator, self.stop)
        # No meta-graph at test time; the learner enables grad itself for the support-loss gradient.
        with torch.no_grad():
            out = self.runner(batch, noise)
        return out.theta.detach()


__all__ = ["ItemPop", "GlobalModel", "GlobalTrainConfig", "Finetune", "FinetuneGrid", "S2Meta",
           "global_item_counts", "select_finetune", "train_global"]
