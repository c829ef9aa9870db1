"""The general-domain and cross-domain baselines of Table 3: NeuMF, CDCF, CMF, EMCDR, CoNet.

Training data (paper Appendix A.4). Each meta-test scenario c is a target domain; a cross-domain
baseline trains, for c, on

- the source domain: ``PreparedData.source_users/items`` (the pairs the embeddings were trained
  on; they hold no interaction of any scenario's shared users),
- the 64 support pairs D_train of c,
- the scenario-only users' interactions on c's items (the source pairs whose item is one of c's:
  scenario items only carry source pairs of scenario-only users).

Meta-train scenarios are *not* used by the cross-domain baselines: each is another target domain
whose users (with the default user-disjoint split) never appear in a meta-test scenario, so it
could only add cost. NeuMF, the general-domain baseline, trains one model over everything it may
see: the source domain, the meta-train scenarios and the support pairs of every evaluated
scenario. Nothing reads a scenario's evaluation positives or the meta-valid / meta-test
:class:`~s2meta_fast.data.Scenario` lists.

Batching. CDCF, CMF, EMCDR and CoNet train one model per target scenario; the models of a block
of S scenarios are trained together as one problem whose parameters carry a leading ``[S]``
dimension and whose loss is the *sum* of the S scenarios' losses. Adam is elementwise, so this is
exactly S independent trainings, done with batched tensor ops (no Python loop over scenarios or
users). Memory per block is ``O(S · (users + items) · factors)``.

Objective. All five learn from implicit feedback with the pointwise log loss (each positive with
uniformly drawn negatives: from the scenario's items for a target pair, from the source items
for a source pair), optimised by Adam with full-batch steps over the target pairs plus a
``source_batch`` sample of source pairs per step; "steps" in the grids are these Adam steps.
Hyper-parameters come from the paper's grids (A.3.2), chosen on the meta-validation scenarios by
Recall@20 (:func:`select_cross_domain`).
"""
from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm, trange

from .baselines import _source_pairs
from .protocol import evaluate_step_counts


# --------------------------------------------------------------------------------------------
# data


@dataclass
class Domains:
    """The source domain every cross-domain model may train on, on one device."""

    n_users: int
    n_items: int
    users: Tensor        # [M] source-domain pairs (incl. scenario-only users' pairs)
    items: Tensor        # [M]
    item_pool: Tensor    # [P] distinct source items: negatives of source pairs
    cache: Dict[Any, Any] = field(default_factory=dict)   # fits of the source alone, by settings

    def source_mf(self, factors: int, steps: int = 200, lr: float = 0.03, seed: int = 0) -> Dict[str, Tensor]:
        """An MF (user, item factors, item bias) of the source domain alone, by full-batch Adam on
        the log loss with one uniform negative per pair; fitted once per settings and cached."""
        key = ("mf", factors, steps, lr, seed)
        if key not in self.cache:
            dev = self.users.device
            gen = torch.Generator(device=dev).manual_seed(int(seed))
            p = {"U": torch.randn(self.n_users, factors, generator=gen, device=dev) * 0.1,
                 "V": torch.randn(self.n_items, factors, generator=gen, device=dev) * 0.1,
                 "b": torch.zeros(self.n_items, device=dev)}
            p = {k: v.requires_grad_(True) for k, v in p.items()}
            optimiser = torch.optim.Adam(list(p.values()), lr=lr)
            for _ in range(steps):
                neg = self.item_pool[torch.randint(self.item_pool.shape[0], self.items.shape, generator=gen,
                                                   device=dev)]
                with torch.enable_grad():
                    u = p["U"][self.users]
                    loss = _log_loss((u * p["V"][self.items]).sum(-1) + p["b"][self.items],
                                     ((u * p["V"][neg]).sum(-1) + p["b"][neg]).unsqueeze(-1)).mean()
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                optimiser.step()
            self.cache[key] = {k: v.detach() for k, v in p.items()}
        return self.cache[key]


def build_domains(prepared: Any, device: str | torch.device = "cpu") -> Domains:
    """The source domain of ``prepared`` (``source_users/items``); an error when it has none."""
    source = _source_pairs(prepared)
    if source is None:
        raise ValueError(f"{getattr(prepared, 'name', 'the data')}: no source-domain interactions; the cross-domain "
                         f"baselines (cdcf, cmf, emcdr, conet) need them")
    device = torch.device(device)
    users = torch.as_tensor(source[0], device=device)
    items = torch.as_tensor(source[1], device=device)
    return Domains(int(prepared.user_emb.shape[0]), int(prepared.item_emb.shape[0]), users, items,
                   torch.unique(items))


@dataclass
class TargetBlock:
    """The target-domain training pairs of S scenarios, padded to a common length T."""

    users: Tensor     # [S, T]
    items: Tensor     # [S, T]
    weight: Tensor    # [S, T] 1/n_s on the scenario's pairs, 0 on padding
    count: Tensor     # [S] n_s, the scenario's number of pairs
    pool: Tensor      # [S, P] the scenario's items (negatives), padding repeats a real one
    size: Tensor      # [S]
    in_target: Tensor  # [S, n_items] bool: item is one of the scenario's


def target_block(tasks: Sequence[Any], domains: Domains) -> TargetBlock:
    """D_train of each task plus the scenario-only pairs on its items; reads no evaluation positive."""
    device = domains.users.device
    src_users, src_items = domains.users.cpu().numpy(), domains.items.cpu().numpy()
    pairs, pools = [], []
    for t in tasks:
        items = np.unique(np.asarray(t.items, dtype=np.int64))
        only = np.isin(src_items, items)
        pairs.append((np.concatenate([np.asarray(t.support_users, np.int64), src_users[only]]),
                      np.concatenate([np.asarray(t.support_items, np.int64), src_items[only]])))
        pools.append(items)
    S, T, P = len(tasks), max(len(u) for u, _ in pairs), max(len(p) for p in pools)
    users, items = np.zeros((S, T), np.int64), np.zeros((S, T), np.int64)
    weight = np.zeros((S, T), np.float32)
    pool, size = np.zeros((S, P), np.int64), np.zeros(S, np.int64)
    in_target = np.zeros((S, domains.n_items), bool)
    for s, ((u, i), p) in enumerate(zip(pairs, pools)):
        users[s, :len(u)], items[s, :len(u)], weight[s, :len(u)] = u, i, 1.0 / len(u)
        pool[s, :len(p)], pool[s, len(p):], size[s] = p, p[0], len(p)
        in_target[s, p] = True
    f = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
    count = np.array([len(u) for u, _ in pairs], np.int64)
    return TargetBlock(f(users), f(items), f(weight), f(count), f(pool), f(size), f(in_target))


def _log_loss(pos: Tensor, neg: Tensor) -> Tensor:
    """Pointwise log loss of positive logits ``[...]`` and negative logits ``[..., n_neg]``."""
    return F.softplus(-pos) + F.softplus(neg).sum(-1)


def _rows(table: Tensor, index: Tensor) -> Tensor:
    """``table[s, index[s, ...]]`` for a per-scenario table ``[S, N, ...]`` and ids ``[S, ...]``."""
    S = table.shape[0]
    flat = index.reshape(S, -1)
    out = table[torch.arange(S, device=table.device).unsqueeze(1), flat]
    return out.reshape(index.shape + table.shape[2:])


def _uniform(shape: Tuple[int, ...], fan_in: int, generator: torch.Generator, device: torch.device) -> Tensor:
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=generator, device=device) * 2 - 1) * bound


# --------------------------------------------------------------------------------------------
# the per-scenario models


class _CrossDomain:
    """A batch of per-target-scenario models trained by Adam; subclasses give init, loss, score.

    ``hp`` holds the hyper-parameters: ``lr``, ``steps`` and the model's own (``factors``, ``l1``).
    """

    name = ""
    GRID: Dict[str, tuple] = {}
    uses_source = True
    n_neg = 1

    def __init__(self, domains: Domains, user_emb: Tensor, item_emb: Tensor, hp: Mapping[str, Any],
                 source_batch: int = 1024, target_batch: int = 1024):
        self.domains, self.user_emb, self.item_emb = domains, user_emb, item_emb
        self.hp = dict(hp)
        self.source_batch, self.target_batch = int(source_batch), int(target_batch)
        if not self.hp.get("lr", 0) > 0 or int(self.hp.get("steps", -1)) < 0:
            raise ValueError(f"{self.name} needs lr > 0 and steps >= 0, got {self.hp}")

    # subclasses -------------------------------------------------------------------------
    def init(self, S: int, target: TargetBlock, generator: torch.Generator) -> Dict[str, Tensor]:
        raise NotImplementedError

    def context(self, p: Dict[str, Tensor], target: TargetBlock) -> Any:
        """What :meth:`logits` needs beyond the parameters, computed once per step."""
        return target

    def logits(self, p: Dict[str, Tensor], ctx: Any, users: Tensor, items: Tensor, tower: str) -> Tensor:
        """Training logits of (users, items) ``[S, ...]`` pairs of the "target" or the "source" domain."""
        raise NotImplementedError

    def score(self, state: tuple, users: Tensor, items: Tensor) -> Tensor:
        """``[S, A, B]`` target scores of users ``[S, A]`` for items ``[S, B]``."""
        raise NotImplementedError

    def extra_loss(self, p: Dict[str, Tensor], target: TargetBlock) -> Tensor:
        return p[next(iter(p))].new_zeros(())

    # training ---------------------------------------------------------------------------
    def _negatives(self, pool: Tensor, size: Tensor, shape: Tuple[int, ...], generator: torch.Generator) -> Tensor:
        draw = torch.rand(shape, generator=generator, device=pool.device)
        index = torch.floor(draw * size.view((-1,) + (1,) * (len(shape) - 1))).long()
        return torch.gather(pool, 1, index.reshape(shape[0], -1)).reshape(shape)

    def target_pairs(self, target: TargetBlock, generator: torch.Generator) -> tuple:
        """This step's target pairs and weights: all of them, or a uniform sample of
        ``target_batch`` per scenario when a scenario has more (the same expected loss)."""
        S, T = target.users.shape
        if T <= self.target_batch:
            return target.users, target.items, target.weight
        draw = torch.rand((S, self.target_batch), generator=generator, device=target.users.device)
        index = torch.floor(draw * target.count.unsqueeze(1)).long()
        weight = torch.full(index.shape, 1.0 / self.target_batch, device=index.device)
        return torch.gather(target.users, 1, index), torch.gather(target.items, 1, index), weight

    def loss(self, p: Dict[str, Tensor], target: TargetBlock, generator: torch.Generator) -> Tensor:
        users, items, weight = self.target_pairs(target, generator)
        S, T = users.shape
        ctx = self.context(p, target)
        neg = self._negatives(target.pool, target.size, (S, T, self.n_neg), generator)
        pos_logit = self.logits(p, ctx, users, items, "target")
        neg_logit = self.logits(p, ctx, users.unsqueeze(-1).expand_as(neg), neg, "target")
        total = (_log_loss(pos_logit, neg_logit) * weight).sum()
        if self.uses_source:
            d = self.domains
            j = torch.randint(d.users.shape[0], (S, self.source_batch), generator=generator, device=d.users.device)
            su, si = d.users[j], d.items[j]
            sn = d.item_pool[torch.randint(d.item_pool.shape[0], (S, self.source_batch, self.n_neg),
                                           generator=generator, device=d.users.device)]
            src = _log_loss(self.logits(p, ctx, su, si, "source"),
                            self.logits(p, ctx, su.unsqueeze(-1).expand_as(sn), sn, "source"))
            total = total + src.mean(dim=1).sum()
        return total + self.extra_loss(p, target)

    def fit(self, tasks: Sequence[Any], generator: torch.Generator, snapshots: Sequence[int]) -> Dict[int, tuple]:
        """Trains the block's models; ``{steps: (params, target)}`` after each step count asked for."""
        target = target_block(tasks, self.domains)
        params = {k: v.requires_grad_(True) for k, v in self.init(len(tasks), target, generator).items()}
        optimiser = torch.optim.Adam(list(params.values()), lr=float(self.hp["lr"]))
        wanted, last, out = set(int(s) for s in snapshots), max(int(s) for s in snapshots), {}
        for step in range(last + 1):
            if step in wanted:
                out[step] = ({k: v.detach().clone() for k, v in params.items()}, target)
            if step == last:
                break
            with torch.enable_grad():
                loss = self.loss(params, target, generator)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
            optimiser.step()
        return out

    # Method protocol ---------------------------------------------------------------------
    def adapt(self, tasks: Sequence[Any], generator: torch.Generator) -> tuple:
        steps = int(self.hp["steps"])
        return self.fit(tasks, generator, [steps])[steps]


class CMF(_CrossDomain):
    """Collective matrix factorisation (Singh & Gordon 2008): the source matrix and the target
    scenario's matrix share the user factors U; each has its own item factors and biases.
    A logit is ``U[u] · V[i] + b[i]`` with (V, b) of the pair's domain.

    The joint objective starts from an MF of the source matrix alone (:meth:`Domains.source_mf`,
    fitted once: it does not depend on the target), so the grid's steps go to the coupled
    problem rather than to re-learning the source for every scenario.
    """

    name = "cmf"
    GRID = {"lr": (0.1, 0.03, 0.001), "steps": (10, 100, 200), "factors": (8, 16, 32)}

    def init(self, S, target, generator):
        k, d, dev = int(self.hp["factors"]), self.domains, self.domains.users.device
        source = d.source_mf(k)
        return {"U": source["U"].expand(S, -1, -1).clone(), "Vs": source["V"].expand(S, -1, -1).clone(),
                "bs": source["b"].expand(S, -1).clone(),
                "Vt": torch.randn(S, d.n_items, k, generator=generator, device=dev) * 0.1,
                "bt": torch.zeros(S, d.n_items, device=dev)}

    def logits(self, p, ctx, users, items, tower):
        V, b = (p["Vt"], p["bt"]) if tower == "target" else (p["Vs"], p["bs"])
        return (_rows(p["U"], users) * _rows(V, items)).sum(-1) + _rows(b, items)

    def score(self, state, users, items):
        p, _ = state
        return (torch.bmm(_rows(p["U"], users), _rows(p["Vt"], items).transpose(1, 2))
                + _rows(p["bt"], items).unsqueeze(1))


class CDCF(_CrossDomain):
    """Cross-domain CF with a factorisation machine (Loni et al. 2014).

    Features of a target pair: the user, the item, and the user's interactions in the other
    domains (the user's source pairs outside the target scenario's items, weights 1/|N(u)|). The
    FM is trained on the target pairs; the source pairs enter only as features. A logit is the
    FM's ``w0 + Σ w_f x_f + ½[(Σ v_f x_f)² − Σ v_f² x_f²]``.
    """

    name = "cdcf"
    GRID = {"lr": (0.1, 0.03, 0.001), "steps": (10, 100, 200), "factors": (8, 16, 32)}
    uses_source = False
    reg = 0.01

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        d = self.domains
        counts = torch.bincount(d.users, minlength=d.n_users).clamp(min=1).to(torch.float32)
        index = torch.stack([d.users, d.items])
        value = 1.0 / counts[d.users]
        self.X = torch.sparse_coo_tensor(index, value, (d.n_users, d.n_items), check_invariants=True).coalesce()
        self.X2 = torch.sparse_coo_tensor(self.X.indices(), self.X.values() ** 2, self.X.shape,
                                          check_invariants=True).coalesce()

    def init(self, S, target, generator):
        k, d, dev = int(self.hp["factors"]), self.domains, self.domains.users.device
        return {"w0": torch.zeros(S, device=dev), "wu": torch.zeros(S, d.n_users, device=dev),
                "wi": torch.zeros(S, d.n_items, device=dev), "wa": torch.zeros(S, d.n_items, device=dev),
                "vu": torch.randn(S, d.n_users, k, generator=generator, device=dev) * 0.01,
                "vi": torch.randn(S, d.n_items, k, generator=generator, device=dev) * 0.01,
                "va": torch.randn(S, d.n_items, k, generator=generator, device=dev) * 0.01}

    def context(self, p, target):
        """Per user: Σ x_j v_j, Σ x_j² |v_j|², Σ x_j w_j over the auxiliary features ``[S, U, ...]``."""
        keep = (~target.in_target).to(p["va"].dtype)               # the target's own items are no feature
        va, wa = p["va"] * keep.unsqueeze(-1), p["wa"] * keep
        S, n_items, k = va.shape
        a = torch.sparse.mm(self.X, va.permute(1, 0, 2).reshape(n_items, S * k)).reshape(-1, S, k).permute(1, 0, 2)
        q = torch.sparse.mm(self.X2, (va ** 2).sum(-1).T).T
        lin = torch.sparse.mm(self.X, wa.T).T
        return a, q, lin

    def _user(self, p, ctx, users):
        """The FM terms without the item, and the user's factor sum ``v_u + Σ x_j v_j``."""
        a, q, lin = ctx
        vu, au = _rows(p["vu"], users), _rows(a, users)
        part = (p["w0"].view((-1,) + (1,) * (users.dim() - 1)) + _rows(p["wu"], users) + _rows(lin, users)
                + (vu * au).sum(-1) + 0.5 * ((au ** 2).sum(-1) - _rows(q, users)))
        return part, vu + au

    def logits(self, p, ctx, users, items, tower):
        part, factor = self._user(p, ctx, users)
        return part + _rows(p["wi"], items) + (factor * _rows(p["vi"], items)).sum(-1)

    def extra_loss(self, p, target):
        # L2 on the factors of the pairs' users and items (libFM's SGD regularisation): without it
        # the free user factors of the few target users absorb what the auxiliary features should carry.
        reg = (_rows(p["vu"], target.users) ** 2).sum(-1) + (_rows(p["vi"], target.items) ** 2).sum(-1)
        return self.reg * (reg * target.weight).sum()

    def score(self, state, users, items):
        p, target = state
        part, factor = self._user(p, self.context(p, target), users)        # [S, A], [S, A, k]
        return (part.unsqueeze(2) + _rows(p["wi"], items).unsqueeze(1)
                + torch.bmm(factor, _rows(p["vi"], items).transpose(1, 2)))


class EMCDR(_CrossDomain):
    """Embedding and mapping (Man et al. 2017).

    Source factors: the frozen user embeddings, an MF of the source domain. Target factors:
    an MF (U_t, V_t, item bias) of the target pairs. The mapping: an MLP (tanh, one hidden layer
    of twice the factors) from source to target user factors, fitted by squared error on the
    users with target pairs. Target scores: ``mlp(source[u]) · V_t[i] + b[i]``. MF and mapping are
    trained in the same steps (the mapping against the detached target factors).
    """

    name = "emcdr"
    GRID = {"lr": (0.1, 0.01, 0.001, 0.0001), "steps": (10, 100, 1000)}
    uses_source = False
    factors = 16

    def init(self, S, target, generator):
        d, dev, k, e = self.domains, self.domains.users.device, self.factors, self.user_emb.shape[1]
        return {"Ut": torch.randn(S, d.n_users, k, generator=generator, device=dev) * 0.1,
                "Vt": torch.randn(S, d.n_items, k, generator=generator, device=dev) * 0.1,
                "bt": torch.zeros(S, d.n_items, device=dev),
                "W1": _uniform((S, e, 2 * k), e, generator, dev), "b1": torch.zeros(S, 1, 2 * k, device=dev),
                "W2": _uniform((S, 2 * k, k), 2 * k, generator, dev), "b2": torch.zeros(S, 1, k, device=dev)}

    def _map(self, p, users):
        S = users.shape[0]
        x = self.user_emb[users].reshape(S, -1, self.user_emb.shape[1])
        h = torch.tanh(torch.baddbmm(p["b1"], x, p["W1"]))
        return torch.baddbmm(p["b2"], h, p["W2"]).reshape(users.shape + (self.factors,))

    def logits(self, p, ctx, users, items, tower):
        # Training fits the target MF; scores (below) use the mapped source factors instead.
        return (_rows(p["Ut"], users) * _rows(p["Vt"], items)).sum(-1) + _rows(p["bt"], items)

    def loss(self, p, target, generator):
        mf = super().loss(p, target, generator)
        users, _, weight = self.target_pairs(target, generator)
        err = ((self._map(p, users) - _rows(p["Ut"], users).detach()) ** 2).sum(-1)
        return mf + (err * weight).sum()

    def score(self, state, users, items):
        params, target = state
        S, A, B = users.shape[0], users.shape[1], items.shape[1]
        u = self._map(params, users)                                    # [S, A, k]
        return torch.bmm(u, _rows(params["Vt"], items).transpose(1, 2)) + _rows(params["bt"], items).unsqueeze(1)


class CoNet(_CrossDomain):
    """Collaborative cross networks (Hu et al. 2018).

    Two MLP towers, source and target, on the frozen (user, item) embeddings, layers
    [64, 32, 16] then a logit; between consecutive hidden layers a cross matrix H (shared by both
    directions, as in the paper) adds the other tower's activations:
    ``h_t' = relu(W_t h_t + H h_s)``, ``h_s' = relu(W_s h_s + H h_t)``. The source tower's logit
    is trained on source pairs, the target tower's on target pairs, plus ``l1 · Σ|H|``
    (the sparsity penalty). Both towers read the same pair (a simplification of the paper's
    pairing of a user's source and target items, which has no test-time counterpart here).
    """

    name = "conet"
    GRID = {"lr": (0.01, 0.001), "steps": (10, 50, 100, 500), "l1": (0.1, 0.01, 0.001)}
    LAYERS = (64, 32, 16)

    def init(self, S, target, generator):
        dev, e = self.domains.users.device, self.user_emb.shape[1]
        p: Dict[str, Tensor] = {}
        for t in ("s", "t"):
            p[f"{t}u0"] = _uniform((S, e, self.LAYERS[0]), 2 * e, generator, dev)
            p[f"{t}i0"] = _uniform((S, e, self.LAYERS[0]), 2 * e, generator, dev)
            p[f"{t}b0"] = torch.zeros(S, 1, self.LAYERS[0], device=dev)
            for l in range(1, len(self.LAYERS)):
                p[f"{t}W{l}"] = _uniform((S, self.LAYERS[l - 1], self.LAYERS[l]), self.LAYERS[l - 1], generator, dev)
                p[f"{t}b{l}"] = torch.zeros(S, 1, self.LAYERS[l], device=dev)
            p[f"{t}o"] = _uniform((S, self.LAYERS[-1], 1), self.LAYERS[-1], generator, dev)
        for l in range(1, len(self.LAYERS)):
            p[f"H{l}"] = _uniform((S, self.LAYERS[l - 1], self.LAYERS[l]), self.LAYERS[l - 1], generator, dev)
        return p

    def _towers(self, p, hu: Dict[str, Tensor], hi: Dict[str, Tensor], tower: str) -> Tensor:
        """hu / hi: per tower, the first layer's user / item parts, broadcastable to ``[S, ..., 64]``."""
        S = next(iter(hu.values())).shape[0]
        h = {t: torch.relu(hu[t] + hi[t]) for t in ("s", "t")}
        shape = torch.broadcast_shapes(h["s"].shape, h["t"].shape)
        h = {t: v.expand(shape).reshape(S, -1, shape[-1]) for t, v in h.items()}
        for l in range(1, len(self.LAYERS)):
            h = {"s": torch.relu(torch.baddbmm(p[f"sb{l}"], h["s"], p[f"sW{l}"]) + torch.bmm(h["t"], p[f"H{l}"])),
                 "t": torch.relu(torch.baddbmm(p[f"tb{l}"], h["t"], p[f"tW{l}"]) + torch.bmm(h["s"], p[f"H{l}"]))}
        t = "t" if tower == "target" else "s"
        return torch.bmm(h[t], p[f"{t}o"]).reshape(shape[:-1])

    def _first(self, p, users, items):
        S = users.shape[0]
        ue = self.user_emb[users.reshape(S, -1)]
        ie = self.item_emb[items.reshape(S, -1)]
        hu = {t: torch.baddbmm(p[f"{t}b0"], ue, p[f"{t}u0"]).reshape(users.shape + (-1,)) for t in ("s", "t")}
        hi = {t: torch.bmm(ie, p[f"{t}i0"]).reshape(items.shape + (-1,)) for t in ("s", "t")}
        return hu, hi

    def logits(self, p, ctx, users, items, tower):
        hu, hi = self._first(p, users, items)
        return self._towers(p, hu, hi, tower)

    def extra_loss(self, p, target):
        return float(self.hp["l1"]) * sum(p[f"H{l}"].abs().sum() for l in range(1, len(self.LAYERS)))

    def score(self, state, users, items):
        params, target = state
        S, A, B = users.shape[0], users.shape[1], items.shape[1]
        hu, hi = self._first(params, users, items)                  # [S, A, 64], [S, B, 64]
        # [S, a, B, 64] activations per user chunk: bounded memory for any block.
        chunk = max(1, 2_000_000 // max(1, S * B * self.LAYERS[0]))
        out = []
        for lo in range(0, A, chunk):
            cu = {t: v[:, lo:lo + chunk].unsqueeze(2) for t, v in hu.items()}
            ci = {t: v.unsqueeze(1) for t, v in hi.items()}
            out.append(self._towers(params, cu, ci, "target"))
        return torch.cat(out, dim=1)


# --------------------------------------------------------------------------------------------
# NeuMF: one model over all scenarios


@dataclass(frozen=True)
class NeuMFConfig:
    """NeuMF's settings (He et al. 2017, as the paper uses them): MF embedding 8, MLP layers
    [64, 32, 16, 8]; GMF and MLP pre-trained with Adam, then fused (α = 0.5) and trained further.
    Four negatives per positive, as the authors' code."""

    mf_dim: int = 8
    layers: tuple = (64, 32, 16, 8)
    pretrain_steps: int = 1500
    fused_steps: int = 1000
    batch_size: int = 1024
    lr: float = 1e-3
    fused_lr: float = 1e-4
    n_neg: int = 4
    alpha: float = 0.5


class NeuMF:
    """Neural collaborative filtering with its own user/item embeddings, not scenario-aware.

    Trained once on the source domain, the meta-train scenarios and the 64 support pairs of every
    scenario it will be asked to rank (:meth:`fit`); ``adapt`` only checks a block was among them.
    A pair's negatives come from its own group's items (its scenario, or the source items).
    """

    name = "neumf"

    def __init__(self, n_users: int, n_items: int, cfg: NeuMFConfig = NeuMFConfig(),
                 device: str | torch.device = "cpu"):
        self.n_users, self.n_items, self.cfg, self.device = n_users, n_items, cfg, torch.device(device)
        self.params: Optional[Dict[str, Tensor]] = None
        self.fitted: set = set()

    def _init(self, generator: torch.Generator) -> Dict[str, Tensor]:
        c, dev = self.cfg, self.device
        half = c.layers[0] // 2
        p = {"Pg": torch.randn(self.n_users, c.mf_dim, generator=generator, device=dev) * 0.01,
             "Qg": torch.randn(self.n_items, c.mf_dim, generator=generator, device=dev) * 0.01,
             "Pm": torch.randn(self.n_users, half, generator=generator, device=dev) * 0.01,
             "Qm": torch.randn(self.n_items, half, generator=generator, device=dev) * 0.01,
             "hg": _uniform((c.mf_dim,), c.mf_dim, generator, dev), "hm": _uniform((c.layers[-1],), c.layers[-1],
                                                                                    generator, dev),
             "b": torch.zeros((), device=dev)}
        for l in range(1, len(c.layers)):
            p[f"W{l}"] = _uniform((c.layers[l - 1], c.layers[l]), c.layers[l - 1], generator, dev)
            p[f"b{l}"] = torch.zeros(c.layers[l], device=dev)
        return p

    def _parts(self, p, users, items):
        gmf = p["Pg"][users] * p["Qg"][items]
        h = torch.cat([p["Pm"][users], p["Qm"][items]], -1)
        for l in range(1, len(self.cfg.layers)):
            h = torch.relu(h @ p[f"W{l}"] + p[f"b{l}"])
        return gmf, h

    def _logit(self, p, users, items, part: str):
        gmf, mlp = self._parts(p, users, items)
        if part == "gmf":
            return gmf @ p["hg"] + p["b"]
        if part == "mlp":
            return mlp @ p["hm"] + p["b"]
        return self.cfg.alpha * (gmf @ p["hg"]) + (1 - self.cfg.alpha) * (mlp @ p["hm"]) + p["b"]

    def fit(self, prepared: Any, tasks: Sequence[Any], seed: int = 0, progress: bool = False) -> "NeuMF":
        """Pre-trains GMF and MLP, then trains the fused model, on the source domain, the
        meta-train scenarios and the support pairs of `tasks` (their evaluation positives are not read)."""
        groups: List[tuple] = []
        source = _source_pairs(prepared)
        if source is not None:
            groups.append((source[0], source[1], None))
        groups += [(np.asarray(s.users, np.int64), np.asarray(s.items, np.int64), None) for s in prepared.train]
        # A support pair's negatives come from its scenario's items, like every other method's.
        groups += [(np.asarray(t.support_users, np.int64), np.asarray(t.support_items, np.int64),
                    np.asarray(t.items, np.int64)) for t in tasks]
        groups = [g for g in groups if len(g[0]) > 0]
        if not groups:
            raise ValueError("NeuMF has no training interactions")
        pool = _NegPool(groups, self.device)
        generator = torch.Generator(device=self.device).manual_seed(int(seed))
        p = {k: v.requires_grad_(True) for k, v in self._init(generator).items()}
        c = self.cfg
        gmf_keys = ["Pg", "Qg", "hg", "b"]
        mlp_keys = ["Pm", "Qm", "hm", "b"] + [k for k in p if k[0] in "Wb" and k != "b"]
        # The authors' fusion: the fused output layer is [α h_gmf, (1 − α) h_mlp] of the two
        # pre-trained output layers (see _logit), then everything trains at a smaller rate.
        stages = (("gmf", gmf_keys, c.pretrain_steps, c.lr), ("mlp", mlp_keys, c.pretrain_steps, c.lr),
                  ("fused", list(p), c.fused_steps, c.fused_lr))
        with _deterministic(self.device):
            for part, keys, steps, lr in stages:
                optimiser = torch.optim.Adam([p[k] for k in keys], lr=lr)
                for _ in trange(steps, desc=f"train neumf ({part})", unit="step", disable=not progress,
                                leave=False):
                    u, pos, neg = pool.batch(c.batch_size, c.n_neg, generator)
                    with torch.enable_grad():
                        loss = _log_loss(self._logit(p, u, pos, part),
                                         self._logit(p, u.unsqueeze(-1).expand_as(neg), neg, part)).mean()
                        optimiser.zero_grad(set_to_none=True)
                        loss.backward()
                    optimiser.step()
        self.params = {k: v.detach() for k, v in p.items()}
        self.fitted = {t.name for t in tasks}
        return self

    def adapt(self, tasks: Sequence[Any], generator: torch.Generator) -> Dict[str, Tensor]:
        missing = [t.name for t in tasks if t.name not in self.fitted]
        if self.params is None or missing:
            raise ValueError(f"NeuMF was not fitted with the support pairs of {missing or 'any scenario'}; call fit")
        return self.params

    def score(self, state: Dict[str, Tensor], users: Tensor, items: Tensor) -> Tensor:
        S, A, B = users.shape[0], users.shape[1], items.shape[1]
        chunk = max(1, 2_000_000 // max(1, S * B * self.cfg.layers[0]))
        out = []
        for lo in range(0, A, chunk):
            u = users[:, lo:lo + chunk].unsqueeze(2).expand(-1, -1, B)
            out.append(self._logit(state, u, items.unsqueeze(1).expand_as(u), "fused"))
        return torch.cat(out, dim=1)


@contextlib.contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """PyTorch's deterministic algorithms for the block, on the CPU.

    The backward of NeuMF's embedding lookups (``index_put_`` with accumulation) adds rows in
    thread order on a multi-threaded CPU by default, so one seed gave a NeuMF up to 0.7 Recall@20
    points apart from run to run; the deterministic path sums in index order. On CUDA it would
    also need a cuBLAS workspace setting, so CUDA keeps the default.
    """
    if device.type != "cpu":
        yield
        return
    before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


class _NegPool:
    """Positive pairs by group, each group with its negative pool (given, else its own items)."""

    def __init__(self, groups: Sequence[tuple], device: torch.device):
        users, items, group_of, pools, offsets = [], [], [], [], [0]
        for g, (u, i, pool) in enumerate(groups):
            users.append(u)
            items.append(i)
            group_of.append(np.full(len(u), g, np.int64))
            pools.append(np.unique(i if pool is None else pool))
            offsets.append(offsets[-1] + len(pools[-1]))
        f = lambda parts: torch.as_tensor(np.concatenate(parts), dtype=torch.long, device=device)  # noqa: E731
        self.users, self.items, self.group, self.pool = f(users), f(items), f(group_of), f(pools)
        self.offsets = torch.as_tensor(offsets, dtype=torch.long, device=device)
        self.size = self.offsets[1:] - self.offsets[:-1]

    def batch(self, n: int, n_neg: int, generator: torch.Generator) -> tuple:
        device = self.users.device
        j = torch.randint(self.users.shape[0], (n,), generator=generator, device=device)
        g = self.group[j]
        draw = torch.rand((n, n_neg), generator=generator, device=device)
        index = torch.floor(draw * self.size[g].unsqueeze(1)).long()
        return self.users[j], self.items[j], self.pool[self.offsets[g].unsqueeze(1) + index]


# --------------------------------------------------------------------------------------------
# hyper-parameter choice on meta-validation scenarios

CROSS_DOMAIN: Dict[str, type] = {cls.name: cls for cls in (CDCF, CMF, EMCDR, CoNet)}

# "paper": the grids of Appendix A.3.2; "reduced": a subset for CPU time (docs/evaluation.md).
BASELINE_GRIDS = ("paper", "reduced")
_REDUCED = {"cdcf": {"lr": (0.1, 0.03), "steps": (10, 100, 200), "factors": (16,)},
            "cmf": {"lr": (0.1, 0.03), "steps": (10, 100, 200), "factors": (16,)},
            "emcdr": {"lr": (0.01, 0.001), "steps": (10, 100)},
            "conet": {"lr": (0.01,), "steps": (10, 50, 100), "l1": (0.01, 0.001)}}


def reduced_grid(name: str) -> Dict[str, tuple]:
    """The "reduced" grid of a cross-domain baseline: every value of it is in the paper's grid."""
    return dict(_REDUCED[name])


def grid_points(name: str, grid: Optional[Mapping[str, Sequence]] = None) -> Tuple[List[dict], List[int]]:
    """The (non-step hyper-parameter) points and the step counts of a method's grid."""
    grid = dict(CROSS_DOMAIN[name].GRID if grid is None else grid)
    steps = sorted(int(s) for s in grid.pop("steps"))
    keys = sorted(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))], steps


def select_cross_domain(name: str, domains: Domains, user_emb: Tensor, item_emb: Tensor, valid_tasks: Sequence[Any],
                        grid: Optional[Mapping[str, Sequence]] = None, metric: str = "recall@20", seed: int = 0,
                        block_size: int = 16, progress: bool = False) -> Dict[str, Any]:
    """Grid search of a cross-domain baseline on the meta-validation tasks.

    One training per non-step point records every step count of the grid. Returns
    ``{"hp": {...}, "score", "table": {"lr=..,steps=..,...": score}}``; ties prefer fewer steps,
    then the smaller lr.
    """
    if not valid_tasks:
        raise ValueError(f"{name}: choosing hyper-parameters needs meta-validation tasks")
    cls = CROSS_DOMAIN[name]
    points, steps = grid_points(name, grid)
    k = int(metric.split("@")[1])
    device = domains.users.device
    table: Dict[str, float] = {}
    scored: List[tuple] = []
    for point in tqdm(points, desc=f"choose {name} hyper-parameters", unit="point", disable=not progress, leave=False):
        model = cls(domains, user_emb, item_emb, {**point, "steps": steps[-1]})
        results = evaluate_step_counts(model.name, model.fit, model.score, valid_tasks, steps, (k,), seed=seed,
                                       device=device, block_size=block_size)
        for s, res in results.items():
            hp = {**point, "steps": s}
            value = res["metrics"][metric]
            table[",".join(f"{key}={hp[key]}" for key in sorted(hp))] = value
            scored.append((value, -s, -float(point.get("lr", 0)), hp))
    best = max(scored, key=lambda row: row[:3])
    return {"hp": best[3], "score": best[0], "metric": metric, "table": table}


__all__ = ["BASELINE_GRIDS", "CDCF", "CMF", "CROSS_DOMAIN", "CoNet", "Domains", "EMCDR", "NeuMF", "NeuMFConfig",
           "TargetBlock",
           "build_domains", "grid_points", "reduced_grid", "select_cross_domain", "target_block"]
