"""The Table-3 protocol (docs/spec.md §6): adapt on each test scenario's 64 support pairs, rank all of its
items for every evaluation user, pool Recall/NDCG/HitRate@K over (scenario, user) pairs.

Scenarios are grouped into blocks of similar size and padded, so a method adapts a whole block
at once (one batched inner loop) and scores it with one ``[S, A, B]`` scoring call; only a block
whose score tensor would exceed ``max_pairs`` is scored in user chunks (the adaptation is still
done once). Metrics are per-row sums, so grouping never changes the numbers; the random draws of
a stochastic adaptation do depend on the grouping, which is therefore fixed by the task order
and ``block_size`` — the same seed and settings give the same numbers.

Under torchrun the blocks are dealt round-robin to the ranks (``group``); each block keeps its
generator, the per-chunk sums are gathered and pooled in block order on every rank, so a sharded
evaluation gives exactly the single-process numbers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..meta import distributed
from .metrics import DEFAULT_KS, MetricAccumulator, check_ks, topk_metric_sums_by_scenario


@dataclass
class EvalBlock:
    """S scenarios padded to common sizes: who is ranked, over what, and which items are positives."""

    tasks: list
    users: Tensor         # [S, A] global user ids, padding repeats a real id
    user_mask: Tensor     # [S, A] bool
    items: Tensor         # [S, B] candidate item ids (the scenario's items), padding repeats a real id
    item_mask: Tensor     # [S, B] bool
    relevance: Tensor     # [S, A, B] bool: item is an evaluation positive of the user

    def to(self, device) -> "EvalBlock":
        return EvalBlock(self.tasks, *(t.to(device) for t in
                                       (self.users, self.user_mask, self.items, self.item_mask, self.relevance)))


class Method(Protocol):
    """A recommender evaluated by the protocol.

    ``adapt`` sees the block's tasks (their support pairs; never the evaluation positives) and
    returns whatever ``score`` needs; ``score`` gives ``[S, A, B]`` scores for the users and
    candidate items (global ids) of the block's scenarios.
    """

    name: str

    def adapt(self, tasks: Sequence[Any], generator: torch.Generator) -> Any: ...

    def score(self, state: Any, users: Tensor, items: Tensor) -> Tensor: ...


def _pad(rows: List[np.ndarray], width: int) -> tuple:
    out = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=bool)
    for s, row in enumerate(rows):
        out[s, :len(row)] = row
        out[s, len(row):] = row[0] if len(row) else 0
        mask[s, :len(row)] = True
    return out, mask


def make_block(tasks: Sequence[Any]) -> EvalBlock:
    """Pads tasks into an :class:`EvalBlock`; checks each positive is one of its scenario's items."""
    users = [np.asarray(t.eval_users, dtype=np.int64) for t in tasks]
    items = [np.asarray(t.items, dtype=np.int64) for t in tasks]
    user_pad, user_mask = _pad(users, max(len(u) for u in users))
    item_pad, item_mask = _pad(items, max(len(i) for i in items))
    relevance = np.zeros(user_pad.shape + (item_pad.shape[1],), dtype=bool)
    for s, task in enumerate(tasks):
        order = np.argsort(items[s], kind="stable")
        positives = np.asarray(task.eval_items, dtype=np.int64)
        where = np.searchsorted(items[s], positives, sorter=order).clip(max=len(order) - 1)
        column = order[where]
        if not np.array_equal(items[s][column], positives):
            missing = positives[items[s][column] != positives][:5]
            raise ValueError(f"scenario {task.name!r}: evaluation items {missing.tolist()} are not among its items")
        indptr = np.asarray(task.eval_indptr, dtype=np.int64)
        row = np.repeat(np.arange(len(users[s])), np.diff(indptr))
        relevance[s, row, column] = True
    return EvalBlock(list(tasks), torch.from_numpy(user_pad), torch.from_numpy(user_mask),
                     torch.from_numpy(item_pad), torch.from_numpy(item_mask), torch.from_numpy(relevance))


def plan_blocks(tasks: Sequence[Any], block_size: int) -> List[List[Any]]:
    """Groups tasks of similar size (fewer padded pairs), in a deterministic order."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    order = sorted(range(len(tasks)), key=lambda i: (len(tasks[i].items), len(tasks[i].eval_users), tasks[i].name))
    return [[tasks[i] for i in order[start:start + block_size]] for start in range(0, len(order), block_size)]


def block_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed) * 1_000_003 + index)
    return generator


class _Replay:
    """A Method replaying the states fitted once per block, keyed by the block's task names."""

    def __init__(self, name: str, score: Any, states: Dict[tuple, Any]):
        self.name, self.score, self.states = name, score, states

    def adapt(self, tasks: Sequence[Any], generator: torch.Generator) -> Any:
        return self.states[tuple(t.name for t in tasks)]


def evaluate_step_counts(name: str, fit: Any, score: Any, tasks: Sequence[Any], steps: Sequence[int],
                         ks: Sequence[int], *, seed: int = 0, device: Optional[torch.device] = None,
                         block_size: int = 16, progress: bool = False) -> Dict[int, Dict[str, Any]]:
    """A grid search's scores for every step count from one training per block.

    ``fit(tasks, generator, steps) -> {step: state}`` trains a block of tasks once, keeping the
    state after each step count; ``score(state, users, items)`` is the method's. Each block gets
    the generator :func:`evaluate` would give it. Returns ``{step: evaluate(...) result}``.
    """
    per_step: Dict[int, Dict[tuple, Any]] = {s: {} for s in steps}
    for index, group in enumerate(plan_blocks(tasks, block_size)):
        snaps = fit(group, block_generator(seed, index, device), steps)
        for s in steps:
            per_step[s][tuple(t.name for t in group)] = snaps[s]
    return {s: evaluate(_Replay(name, score, per_step[s]), tasks, ks, seed=seed, device=device,
                        block_size=block_size, progress=progress) for s in steps}


def evaluate(method: Method, tasks: Sequence[Any], ks: Sequence[int] = DEFAULT_KS, *, seed: int = 0,
             device: str | torch.device = "cpu", block_size: int = 16, max_pairs: int = 4_000_000,
             progress: bool = True, desc: Optional[str] = None,
             group: distributed.Group = distributed.SINGLE) -> Dict[str, Any]:
    """Runs the protocol for one method.

    Args:
        method: the :class:`Method` to evaluate.
        tasks: the evaluation tasks (``EvalTask``: ``name, support_users, support_items, items,
            eval_users, eval_indptr, eval_items``).
        ks: cut-offs for Recall/NDCG/HitRate.
        seed: seeds every random draw of the adaptation (one generator per block).
        device: where adaptation and scoring run.
        block_size: scenarios adapted and scored together.
        max_pairs: largest ``S * A * B`` scored in one call; larger blocks are scored in user chunks.
        progress: show a tqdm bar over scenarios (rank 0's share under torchrun).
        group: a torchrun process group: each rank evaluates every world_size-th block and all
            ranks return the pooled result. Every rank of the group must call this.

    Returns:
        ``{"metrics": {"recall@10": ..., ...}, "n_scenarios", "n_users", "seconds", "per_scenario"}``;
        ``per_scenario[name] = {"count": rows, "sums": {"recall@10": ..., ...}}``: each test
        scenario's metric sums and row count, whose totals give the pooled metrics (what a
        bootstrap over scenarios resamples).
    """
    if not tasks:
        raise ValueError("no evaluation tasks: the split has no test scenario large enough")
    device = torch.device(device)
    acc = MetricAccumulator(check_ks(ks))
    per_scenario = {t.name: MetricAccumulator(acc.ks) for t in tasks}
    start = time.perf_counter()
    blocks = plan_blocks(tasks, block_size)
    mine = distributed.shard_indices(len(blocks), group)
    bar = tqdm(total=sum(len(blocks[i]) for i in mine), desc=desc or f"evaluate {method.name}", unit="scen",
               disable=not progress or not group.is_writer, leave=False)
    sums = []   # (block index, per-chunk metric sums): pooled in block order below
    scenario_sums = []   # (scenario, metric sums of one user chunk), for the per-scenario totals
    for index in mine:
        block = make_block(blocks[index]).to(device)
        state = method.adapt(blocks[index], block_generator(seed, index, device))
        n_scen, n_users, n_items = block.relevance.shape
        chunk = max(1, max_pairs // max(1, n_scen * n_items))
        chunks = []
        with torch.no_grad():
            for lo in range(0, n_users, chunk):
                hi = min(n_users, lo + chunk)
                scores = method.score(state, block.users[:, lo:hi], block.items)
                pooled, by_scenario = topk_metric_sums_by_scenario(
                    scores, block.relevance[:, lo:hi], acc.ks, block.user_mask[:, lo:hi], block.item_mask)
                chunks.append(pooled)
                scenario_sums += [(task.name, sums) for task, sums in zip(blocks[index], by_scenario)]
        sums.append((index, chunks))
        bar.update(len(blocks[index]))
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if group.active:
        gathered = distributed.gather_objects((sums, scenario_sums), group)
        sums = sorted((entry for rank_sums, _ in gathered for entry in rank_sums), key=lambda entry: entry[0])
        scenario_sums = [entry for _, rank_scenarios in gathered for entry in rank_scenarios]
    for name, chunk_sums in scenario_sums:   # a scenario lies in one block, its chunks in order
        per_scenario[name].add_sums(chunk_sums)
    for _, chunks in sums:   # the single-process order of additions: the same floating-point sums
        for chunk_sums in chunks:
            acc.add_sums(chunk_sums)
    # acc.count = (scenario, user) pairs with at least one evaluation positive: the pooled population.
    return {"metrics": acc.result(), "n_scenarios": len(tasks), "n_users": acc.count,
            "seconds": time.perf_counter() - start,
            "per_scenario": {name: {"count": a.count, "sums": dict(a.sums)} for name, a in per_scenario.items()}}
