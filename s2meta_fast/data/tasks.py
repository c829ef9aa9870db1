"""Meta-learning tasks: docs/spec.md §5 training tasks and the docs/spec.md §6 evaluation split.

Everything a draw needs is precomputed once per scenario (item pool, local item indices, a
sorted (user, item) key set for "never touched" tests), so a 64-scenario batch is a few
vectorised numpy calls per scenario.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch

from .errors import EmptyDataError
from .prepared import PreparedData, Scenario
from .scenarios import QUERY_SIZE, SUPPORT_SIZE


@dataclass
class TaskBatch:
    """S scenarios padded to common sizes; all LongTensor. See docs/design.md."""

    support_users: torch.Tensor          # [S, 64] global user ids (D_train)
    support_items: torch.Tensor          # [S, 64] global item ids
    support_item_index: torch.Tensor     # [S, 64] index of support_items[s, j] in pool[s]
    pool: torch.Tensor                   # [S, P] the scenario's item ids, padded with pool[s, 0]
    pool_size: torch.Tensor              # [S] true pool length
    query_users: torch.Tensor | None     # [S, 128] D_test positives ...
    query_pos: torch.Tensor | None       # [S, 128]
    query_neg: torch.Tensor | None       # [S, 128] ... each with a negative the user never touched
    names: list[str]
    query_pos_index: torch.Tensor | None = None   # [S, 128] index of query_pos in pool
    query_neg_index: torch.Tensor | None = None   # [S, 128] index of query_neg in pool

    @property
    def n_scenarios(self) -> int:
        return int(self.support_users.shape[0])

    def to(self, device, non_blocking: bool = False) -> "TaskBatch":
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        return TaskBatch(**kw)


@dataclass
class EvalTask:
    """One test scenario under docs/spec.md §6; numpy int64 arrays of global ids unless noted."""

    name: str
    support_users: np.ndarray      # [64]
    support_items: np.ndarray      # [64]
    items: np.ndarray              # [P] every item of the scenario, sorted: the ranking candidates
    eval_users: np.ndarray         # [A] sorted distinct evaluation users
    eval_indptr: np.ndarray        # [A + 1]
    eval_items: np.ndarray         # eval_items[eval_indptr[a]:eval_indptr[a+1]]: user a's positives
    support_item_index: np.ndarray | None = None   # [64] index of support_items in items
    eval_item_index: np.ndarray | None = None      # like eval_items, as indices into items

    @property
    def n_eval_users(self) -> int:
        return int(self.eval_users.shape[0])

    @property
    def n_eval(self) -> int:
        return int(self.eval_items.shape[0])


class _Index:
    """Per-scenario arrays built once."""

    __slots__ = ("name", "users", "local", "pool", "keys", "saturated")

    def __init__(self, sc: Scenario):
        self.name = sc.name
        self.pool, self.local = np.unique(sc.items, return_inverse=True)
        self.local = self.local.astype(np.int64).reshape(-1)
        self.users = np.ascontiguousarray(sc.users, dtype=np.int64)
        P = self.pool.shape[0]
        self.keys = np.unique(self.users * P + self.local)
        # A user who touched every item of the scenario has no valid negative: never a query row.
        per_user = np.unique(self.keys // P, return_counts=True)
        full = per_user[0][per_user[1] >= P]
        self.saturated = np.isin(self.users, full) if full.size else np.zeros(self.users.shape[0], bool)


_SHIFT = 40   # catalog keys: (scenario << 40) | (user * P + item); user * P stays far below 2**40


class _Catalog:
    """The indexes of one list of training scenarios laid end to end, so a whole batch is drawn
    with a handful of vectorised calls instead of a Python loop of them per scenario."""

    def __init__(self, ixs: list[_Index]):
        self.ixs = ixs
        self.n = np.array([ix.users.shape[0] for ix in ixs], np.int64)
        self.off = np.concatenate([[0], np.cumsum(self.n)]).astype(np.int64)
        self.P = np.array([ix.pool.shape[0] for ix in ixs], np.int64)
        self.pool_off = np.concatenate([[0], np.cumsum(self.P)]).astype(np.int64)
        self.pool = np.concatenate([ix.pool for ix in ixs])
        self.users = np.concatenate([ix.users for ix in ixs])
        self.local = np.concatenate([ix.local for ix in ixs])
        self.sat = np.concatenate([ix.saturated for ix in ixs])
        self.keys = np.concatenate([(np.int64(k) << _SHIFT) | ix.keys for k, ix in enumerate(ixs)])
        self.ok = bool(all(int(ix.keys[-1]) < (1 << _SHIFT) for ix in ixs if ix.keys.size))
        # Share memory with the per-scenario indexes (ML-20M scenarios hold tens of millions of pairs).
        for k, ix in enumerate(ixs):
            a, b = self.off[k], self.off[k + 1]
            ix.users, ix.local, ix.saturated = self.users[a:b], self.local[a:b], self.sat[a:b]


def _stable_hash(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


class TaskSampler:
    """Draws docs/spec.md §5 training tasks and builds the docs/spec.md §6 evaluation split, reproducibly.

    ``train_batch`` advances one numpy Generator seeded by ``seed`` (its state is exposed by
    ``state_dict`` so interrupted training resumes the same stream); ``eval_tasks`` derives a
    fresh generator per scenario from (seed, scenario name), so a scenario's evaluation split does
    not depend on which other scenarios are evaluated or in what order.
    """

    def __init__(self, prepared: PreparedData | None, seed: int = 0, *, support_size: int = SUPPORT_SIZE,
                 query_size: int = QUERY_SIZE):
        self.prepared = prepared
        self.seed = int(seed)
        self.support_size = int(support_size)
        self.query_size = int(query_size)
        self.rng = np.random.default_rng([self.seed, 0x7A5C])
        self._cache: dict[str, _Index] = {}
        self._catalogs: dict[tuple, _Catalog] = {}
        self._by_name = {s.name: s for s in prepared.scenarios()} if prepared is not None else {}

    # -- bookkeeping ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"seed": self.seed, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.rng.bit_generator.state = state["rng"]

    def _index(self, sc: Scenario | str) -> _Index:
        name = sc if isinstance(sc, str) else sc.name
        idx = self._cache.get(name)
        if idx is None:
            if isinstance(sc, str):
                try:
                    sc = self._by_name[sc]
                except KeyError:
                    raise KeyError(f"unknown scenario {sc!r}") from None
            if sc.n_interactions < self.support_size + 1:
                raise EmptyDataError(f"scenario {sc.name!r} has {sc.n_interactions} interactions; a task needs "
                                     f"{self.support_size} support pairs plus evaluation")
            idx = self._cache[name] = _Index(sc)
        return idx

    # -- docs/spec.md §5 -----------------------------------------------------------------------
    def _negatives(self, ix: _Index, users: np.ndarray) -> np.ndarray:
        """Uniform over the pool minus the items each user touched in the scenario (rejection)."""
        P = ix.pool.shape[0]
        neg = self.rng.integers(0, P, users.shape[0])
        todo = np.arange(users.shape[0])
        for _ in range(64):
            k = users[todo] * P + neg[todo]
            pos = np.searchsorted(ix.keys, k)
            hit = ix.keys[np.minimum(pos, ix.keys.shape[0] - 1)] == k
            todo = todo[hit]
            if todo.size == 0:
                return neg
            neg[todo] = self.rng.integers(0, P, todo.size)
        for t in todo:  # users who touched nearly every item: draw from their exact complement
            touched = ix.keys[(ix.keys // P) == users[t]] % P
            free = np.setdiff1d(np.arange(P), touched)
            neg[t] = free[self.rng.integers(0, free.size)]
        return neg

    def _train_task(self, ix: _Index):
        n, ns, nq = ix.users.shape[0], self.support_size, self.query_size
        sel = self.rng.choice(n, min(n, ns + nq + 32), replace=False)
        sup, rest = sel[:ns], sel[ns:]
        rest = rest[~ix.saturated[rest]]
        if rest.shape[0] >= nq:
            q = rest[:nq]
        else:
            # Small scenario: the query comes from all non-support pairs, with replacement if it must.
            mask = ~ix.saturated
            mask[sup] = False
            cand = np.flatnonzero(mask)
            if cand.size == 0:
                raise ValueError(f"scenario {ix.name!r}: no interaction outside the support can be a query")
            q = self.rng.choice(cand, nq, replace=cand.size < nq)
        qu = ix.users[q]
        return sup, q, qu, self._negatives(ix, qu)

    def _catalog(self, scenarios: Sequence[Scenario | str]) -> _Catalog:
        key = tuple(sc if isinstance(sc, str) else sc.name for sc in scenarios)
        cat = self._catalogs.get(key)
        if cat is None:
            cat = self._catalogs[key] = _Catalog([self._index(sc) for sc in scenarios])
        return cat

    def train_batch(self, scenarios: Sequence[Scenario | str], S: int) -> TaskBatch:
        """S scenarios drawn from ``scenarios`` (without replacement when S <= len), one task each."""
        if len(scenarios) == 0:
            raise ValueError("train_batch: no scenarios to draw from")
        cat = self._catalog(scenarios)
        rng, ns, nq = self.rng, self.support_size, self.query_size
        pick = rng.choice(len(scenarios), S, replace=S > len(scenarios))
        take = ns + nq + 32
        n = cat.n[pick]
        sel = np.zeros((S, take), np.int64)
        for r in range(S):
            if n[r] >= take:
                sel[r] = rng.choice(n[r], take, replace=False)
        g = cat.off[pick][:, None] + sel
        sup, rest = g[:, :ns], g[:, ns:]
        # Saturated users (no possible negative) sink to the end of the candidates, order kept.
        sat = cat.sat[rest]
        rest = np.take_along_axis(rest, np.argsort(sat, axis=1, kind="stable"), 1)
        q = rest[:, :nq]
        slow = (n < take) | ((~sat).sum(1) < nq)
        P = cat.P[pick]
        users_q = cat.users[q]
        neg = (rng.random((S, nq)) * P[:, None]).astype(np.int64)
        if cat.ok:
            # Rejection sampling, redrawing only the rows that hit an item the user touched.
            base = np.repeat(pick.astype(np.int64) << _SHIFT, nq)
            uq, Pq, flat = users_q.reshape(-1), np.repeat(P, nq), neg.reshape(-1)
            todo = np.arange(S * nq)
            for _ in range(64):
                k = base[todo] + uq[todo] * Pq[todo] + flat[todo]
                hit = cat.keys[np.minimum(np.searchsorted(cat.keys, k), cat.keys.shape[0] - 1)] == k
                todo = todo[hit]
                if todo.size == 0:
                    break
                flat[todo] = (rng.random(todo.size) * Pq[todo]).astype(np.int64)
            neg = flat.reshape(S, nq)
            if todo.size:
                slow[np.unique(todo // nq)] = True
        else:
            slow[:] = True
        su, sl = cat.users[sup], cat.local[sup]
        ql = cat.local[q]
        for r in np.flatnonzero(slow):   # tiny scenarios or near-saturated users: exact per-row path
            ix = cat.ixs[pick[r]]
            s_, q_, u_, n_ = self._train_task(ix)
            su[r], sl[r], users_q[r], ql[r], neg[r] = ix.users[s_], ix.local[s_], u_, ix.local[q_], n_
        Pmax = int(P.max())
        col = np.arange(Pmax)
        pool = cat.pool[cat.pool_off[pick][:, None] + np.where(col[None, :] < P[:, None], col[None, :], 0)]
        t = torch.from_numpy
        return TaskBatch(support_users=t(su), support_items=t(np.take_along_axis(pool, sl, 1)),
                         support_item_index=t(sl), pool=t(pool), pool_size=t(P.copy()), query_users=t(users_q),
                         query_pos=t(np.take_along_axis(pool, ql, 1)), query_neg=t(np.take_along_axis(pool, neg, 1)),
                         names=[cat.ixs[k].name for k in pick], query_pos_index=t(ql), query_neg_index=t(neg))

    # -- docs/spec.md §6 -----------------------------------------------------------------------
    def eval_task(self, scenario: Scenario | str) -> EvalTask:
        ix = self._index(scenario)
        rng = np.random.default_rng([self.seed, _stable_hash(ix.name), 0xE7A1])
        perm = rng.permutation(ix.users.shape[0])
        sup, rest = perm[:self.support_size], perm[self.support_size:]
        eu, el = ix.users[rest], ix.local[rest]
        order = np.lexsort((el, eu))
        eu, el = eu[order], el[order]
        users, counts = np.unique(eu, return_counts=True)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return EvalTask(name=ix.name, support_users=ix.users[sup].copy(), support_items=ix.pool[ix.local[sup]],
                        items=ix.pool.copy(), eval_users=users.astype(np.int64), eval_indptr=indptr,
                        eval_items=ix.pool[el], support_item_index=ix.local[sup].copy(), eval_item_index=el)

    def eval_tasks(self, scenarios: Sequence[Scenario | str]) -> list[EvalTask]:
        return [self.eval_task(s) for s in scenarios]


def support_batch(tasks: Sequence[EvalTask]) -> TaskBatch:
    """The adaptation input of evaluation tasks: their support pairs and item pools, no query."""
    if len(tasks) == 0:
        raise ValueError("support_batch: no tasks")
    S = len(tasks)
    ns = max(t.support_users.shape[0] for t in tasks)
    if any(t.support_users.shape[0] != ns for t in tasks):
        raise ValueError("support_batch: tasks have different support sizes")
    P = max(t.items.shape[0] for t in tasks)
    su = np.stack([t.support_users for t in tasks]).astype(np.int64)
    si = np.stack([t.support_items for t in tasks]).astype(np.int64)
    pool = np.empty((S, P), np.int64)
    psize = np.empty(S, np.int64)
    sl = np.empty((S, ns), np.int64)
    for s, t in enumerate(tasks):
        n = t.items.shape[0]
        pool[s, :n], pool[s, n:], psize[s] = t.items, t.items[0], n
        sl[s] = t.support_item_index if t.support_item_index is not None else np.searchsorted(t.items, t.support_items)
    f = torch.from_numpy
    return TaskBatch(support_users=f(su), support_items=f(si), support_item_index=f(sl), pool=f(pool),
                     pool_size=f(psize), query_users=None, query_pos=None, query_neg=None,
                     names=[t.name for t in tasks])
