"""The cross-domain baselines and NeuMF on planted data: they must learn a planted preference
that only transfers through the source domain, and never read an evaluation positive."""

from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

from s2meta_fast.data.tasks import EvalTask
from s2meta_fast.eval import evaluate
from s2meta_fast.eval.cross_domain import (CROSS_DOMAIN, NeuMF, NeuMFConfig, build_domains, select_cross_domain,
                                           target_block)


@dataclass
class _Scenario:
    name: str
    users: np.ndarray
    items: np.ndarray


@dataclass
class _Prepared:  # the PreparedData fields the baselines read
    name: str
    user_emb: torch.Tensor
    item_emb: torch.Tensor
    train: list
    source_users: np.ndarray
    source_items: np.ndarray


def _planted(seed=0, d=8, n_shared=60, n_only=40, n_source_items=40, n_scen=4, per_scen=20, top=3):
    """Users like the items whose latent vector points their way. Shared users show it on source
    items, scenario-only users on scenario items: predicting a shared user's scenario positives
    needs both (what the A.4 data offers a cross-domain method)."""
    gen = torch.Generator().manual_seed(seed)
    n_users, n_items = n_shared + n_only, n_source_items + n_scen * per_scen
    user = torch.randn(n_users, d, generator=gen)
    item = torch.randn(n_items, d, generator=gen)
    affinity = (user @ item.T).numpy()
    src_items = np.arange(n_source_items)
    pick = lambda users, items, k: (np.repeat(users, k),  # noqa: E731
                                    items[np.argsort(-affinity[np.ix_(users, items)], axis=1)[:, :k]].reshape(-1))
    su, si = pick(np.arange(n_users), src_items, 10)
    tasks = []
    only = np.arange(n_shared, n_users)
    for s in range(n_scen):
        items = np.arange(n_source_items + s * per_scen, n_source_items + (s + 1) * per_scen)
        ou, oi = pick(only, items, top)
        su, si = np.concatenate([su, ou]), np.concatenate([si, oi])
        eu, ei = pick(np.arange(n_shared), items, top)
        rng = np.random.default_rng(s)
        sup = rng.choice(len(eu), 64, replace=False)
        rest = np.setdiff1d(np.arange(len(eu)), sup)
        order = np.lexsort((ei[rest], eu[rest]))
        ru, ri = eu[rest][order], ei[rest][order]
        users, counts = np.unique(ru, return_counts=True)
        tasks.append(EvalTask(f"s{s}", eu[sup], ei[sup], items, users,
                              np.concatenate([[0], np.cumsum(counts)]), ri))
    # user / item embeddings: noisy views of the latent vectors, as an MF of the source would give
    emb_u = user + 0.1 * torch.randn(user.shape, generator=gen)
    emb_i = item + 0.1 * torch.randn(item.shape, generator=gen)
    return _Prepared("planted", emb_u, emb_i, [], su, si), tasks


FAST = {"cmf": {"lr": 0.03, "steps": 200, "factors": 16}, "cdcf": {"lr": 0.03, "steps": 200, "factors": 8},
        "emcdr": {"lr": 0.01, "steps": 100}, "conet": {"lr": 0.01, "steps": 200, "l1": 0.001}}


def _recall(method, tasks, seed=0):
    return evaluate(method, tasks, ks=(3,), seed=seed, progress=False)["metrics"]["recall@3"]


@pytest.mark.parametrize("name", sorted(CROSS_DOMAIN))
def test_beats_random_on_planted_data(name):
    prepared, tasks = _planted()
    domains = build_domains(prepared)
    model = CROSS_DOMAIN[name](domains, prepared.user_emb, prepared.item_emb, FAST[name], source_batch=256)
    learned = _recall(model, tasks)
    untrained = CROSS_DOMAIN[name](domains, prepared.user_emb, prepared.item_emb, {**FAST[name], "steps": 0})
    chance = 3 / 20    # 3 positives among a scenario's 20 items
    assert learned > max(chance, _recall(untrained, tasks)) + 0.15, (name, learned)


def test_neumf_beats_random_on_planted_data():
    prepared, tasks = _planted()
    cfg = NeuMFConfig(pretrain_steps=300, fused_steps=100, batch_size=256, lr=1e-2, fused_lr=1e-3)
    model = NeuMF(prepared.user_emb.shape[0], prepared.item_emb.shape[0], cfg).fit(prepared, tasks, seed=0)
    assert _recall(model, tasks) > 3 / 20 + 0.15
    with pytest.raises(ValueError, match="not fitted"):
        model.adapt([replace(tasks[0], name="other")], torch.Generator())


def test_neumf_is_the_same_on_every_run_with_two_threads():
    """One seed, one NeuMF: the embedding lookups' backward must not add in thread order."""
    prepared, tasks = _planted()
    cfg = NeuMFConfig(pretrain_steps=60, fused_steps=30, batch_size=512)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fits = [NeuMF(prepared.user_emb.shape[0], prepared.item_emb.shape[0], cfg).fit(prepared, tasks, seed=0).params
                for _ in range(3)]
    finally:
        torch.set_num_threads(before)
    assert not torch.are_deterministic_algorithms_enabled()   # the setting is the block's only
    for other in fits[1:]:
        for name, value in fits[0].items():
            assert torch.equal(value, other[name]), name


def _scrambled(tasks):
    """The same tasks with every evaluation positive moved to another item of the scenario."""
    out = []
    for t in tasks:
        items = np.asarray(t.items)
        where = np.searchsorted(items, t.eval_items)
        out.append(replace(t, eval_items=items[(where + 7) % len(items)]))
    return out


@pytest.mark.parametrize("name", sorted(CROSS_DOMAIN) + ["neumf"])
def test_never_reads_an_evaluation_positive(name):
    """Scores depend on support pairs and the source domain only: moving every evaluation positive
    leaves the trained model's scores unchanged (same seed, same draws)."""
    prepared, tasks = _planted()
    users = torch.as_tensor(np.stack([t.eval_users[:10] for t in tasks]))
    items = torch.as_tensor(np.stack([t.items for t in tasks]))
    scores = []
    for variant in (tasks, _scrambled(tasks)):
        if name == "neumf":
            cfg = NeuMFConfig(pretrain_steps=5, fused_steps=5, batch_size=64)
            model = NeuMF(prepared.user_emb.shape[0], prepared.item_emb.shape[0], cfg).fit(prepared, variant)
        else:
            model = CROSS_DOMAIN[name](build_domains(prepared), prepared.user_emb, prepared.item_emb,
                                       {**FAST[name], "steps": 5}, source_batch=64)
        state = model.adapt(variant, torch.Generator().manual_seed(3))
        scores.append(model.score(state, users, items))
    assert torch.equal(scores[0], scores[1])


def test_target_block_holds_support_and_scenario_only_pairs():
    prepared, tasks = _planted()
    block = target_block(tasks[:2], build_domains(prepared))
    for s, t in enumerate(tasks[:2]):
        n = int((block.weight[s] > 0).sum())
        pairs = set(zip(block.users[s, :n].tolist(), block.items[s, :n].tolist()))
        assert set(zip(t.support_users.tolist(), t.support_items.tolist())) <= pairs
        assert all(u >= 60 for u, _ in pairs - set(zip(t.support_users.tolist(), t.support_items.tolist())))
        assert block.weight[s].sum().item() == pytest.approx(1.0)
        assert block.in_target[s].nonzero().view(-1).tolist() == t.items.tolist()


def test_grid_search_uses_every_point_and_prefers_fewer_steps_on_ties():
    prepared, tasks = _planted()
    choice = select_cross_domain("cmf", build_domains(prepared), prepared.user_emb, prepared.item_emb, tasks[:2],
                                 grid={"lr": (0.03, 0.001), "steps": (0, 50), "factors": (8,)})
    assert len(choice["table"]) == 4
    assert choice["hp"]["steps"] in (0, 50) and set(choice["hp"]) == {"lr", "steps", "factors"}
    assert choice["score"] == max(choice["table"].values())
    with pytest.raises(ValueError, match="meta-validation"):
        select_cross_domain("cmf", build_domains(prepared), prepared.user_emb, prepared.item_emb, [])
