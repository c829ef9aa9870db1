"""The protocol and the baselines on toy tasks whose rankings are known by hand."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from s2meta_fast.data.tasks import EvalTask
from s2meta_fast.eval import (Finetune, GlobalModel, GlobalTrainConfig, ItemPop, evaluate, make_block,
                              markdown_table, build_results, select_finetune, train_global, FinetuneGrid)
from s2meta_fast.models import build_model




def _task(name, support_items, items, positives):
    support_items = np.asarray(support_items)
    users = np.arange(len(positives)) + 100
    indptr = np.concatenate([[0], np.cumsum([len(p) for p in positives])])
    return EvalTask(name, np.zeros(len(support_items), np.int64), support_items, np.asarray(items),
                users, indptr, np.concatenate([np.asarray(p) for p in positives]))


class TestItemPop:
    # support counts: item 7 ×3, item 5 ×2, item 9 ×1; items 1, 3 unseen
    task = _task("t", [7, 7, 7, 5, 5, 9], [1, 3, 5, 7, 9], [[7], [5, 1], [3]])

    def test_ranks_by_support_count(self):
        res = evaluate(ItemPop(), [self.task], ks=(1, 2, 3), progress=False)
        m = res["metrics"]
        # ranking 7, 5, 9, 1, 3: user 0 hits at 1; user 1 has 5 at 2 (1 at 4); user 2's 3 is at 5
        assert m["recall@1"] == pytest.approx((1 + 0 + 0) / 3)
        assert m["recall@2"] == pytest.approx((1 + 0.5 + 0) / 3)
        assert m["hit@3"] == pytest.approx(2 / 3)
        assert res["n_users"] == 3 and res["n_scenarios"] == 1

    def test_global_popularity_breaks_ties(self):
        counts = np.zeros(10)
        counts[3] = 50          # 3 outranks 1 among the unseen items, never 9 (seen once)
        res = evaluate(ItemPop(counts), [self.task], ks=(3, 4), progress=False)
        assert res["metrics"]["hit@4"] == pytest.approx(1.0)   # user 2's item 3 is now 4th
        assert res["metrics"]["recall@3"] == pytest.approx((1 + 0.5 + 0) / 3)


def test_make_block_rejects_positive_outside_scenario():
    with pytest.raises(ValueError, match="not among its items"):
        make_block([_task("bad", [1], [1, 2], [[3]])])


def test_block_size_does_not_change_deterministic_results():
    gen = np.random.default_rng(1)
    tasks = []
    for s in range(5):
        items = np.sort(gen.choice(50, size=int(gen.integers(5, 20)), replace=False))
        positives = [gen.choice(items, size=2, replace=False) for _ in range(int(gen.integers(1, 6)))]
        tasks.append(_task(f"s{s}", gen.choice(items, size=8), items, positives))
    one = evaluate(ItemPop(), tasks, block_size=1, progress=False)["metrics"]
    many = evaluate(ItemPop(), tasks, block_size=4, max_pairs=30, progress=False)["metrics"]
    assert one == pytest.approx(many, rel=1e-12)


class _Prepared:  # the PreparedData fields the Global baseline reads
    def __init__(self, train, user_emb, item_emb):
        self.train, self.user_emb, self.item_emb = train, user_emb, item_emb
        self.source_users = self.source_items = np.zeros(0, np.int64)


@dataclass
class _Scenario:
    name: str
    users: np.ndarray
    items: np.ndarray


def _planted(seed=0, d=8, n_users=40, n_items=60):
    """Users like the items whose embedding points their way: learnable by any recommender."""
    gen = torch.Generator().manual_seed(seed)
    user_emb = torch.randn(n_users, d, generator=gen)
    item_emb = torch.randn(n_items, d, generator=gen)
    affinity = user_emb @ item_emb.T
    scenarios, tasks = [], []
    for s in range(6):
        items = np.arange(s * 10, s * 10 + 10) % n_items
        top = torch.topk(affinity[:, items], 3, dim=1).indices.numpy()
        users = np.repeat(np.arange(n_users), 3)
        scen_items = items[top.reshape(-1)]
        scenarios.append(_Scenario(f"s{s}", users, scen_items))
        positives = [items[top[u]] for u in range(n_users)]
        tasks.append(EvalTask(f"s{s}", users[:64], scen_items[:64], items, np.arange(n_users),
                          np.arange(0, 3 * n_users + 1, 3), np.concatenate(positives)))
    return _Prepared(scenarios, user_emb, item_emb), tasks


def test_global_learns_a_planted_preference_and_finetune_runs():
    prepared, tasks = _planted()
    model = build_model("interaction", 8)
    theta = train_global(model, prepared.user_emb, prepared.item_emb, prepared,
                         GlobalTrainConfig(steps=300, batch_size=128, lr=1e-2), seed=0, progress=False)
    learned = evaluate(GlobalModel(model, theta, prepared.user_emb, prepared.item_emb), tasks, ks=(3,),
                       progress=False)["metrics"]["recall@3"]
    untrained = GlobalModel(model, model.init_theta(torch.Generator().manual_seed(0)),
                            prepared.user_emb, prepared.item_emb)
    chance = evaluate(untrained, tasks, ks=(3,), progress=False)["metrics"]["recall@3"]
    assert learned > 0.6 > chance + 0.2
    choice = select_finetune(model, theta, prepared.user_emb, prepared.item_emb, tasks[:2],
                             FinetuneGrid(lrs=(0.01, 0.1), steps=(1, 3)), seed=0)
    assert (choice["lr"], choice["steps"]) in {(0.01, 1), (0.01, 3), (0.1, 1), (0.1, 3)}
    assert len(choice["table"]) == 4
    tuned = Finetune(model, theta, prepared.user_emb, prepared.item_emb, choice["lr"], choice["steps"])
    first = evaluate(tuned, tasks, ks=(3,), seed=5, progress=False)["metrics"]
    again = evaluate(tuned, tasks, ks=(3,), seed=5, progress=False)["metrics"]
    assert first == again
    zero = Finetune(model, theta, prepared.user_emb, prepared.item_emb, 0.1, 0)
    assert evaluate(zero, tasks, ks=(3,), progress=False)["metrics"]["recall@3"] == pytest.approx(learned)


def test_global_on_the_source_domain_alone_never_reads_a_scenario_pair():
    prepared, _ = _planted()
    rng = np.random.default_rng(1)
    prepared.source_users = rng.integers(0, 40, 500)
    prepared.source_items = rng.integers(0, 30, 500)
    model = build_model("interaction", 8)
    source_only = GlobalTrainConfig(steps=20, batch_size=32, use_scenarios=False)

    def train(prep, cfg):
        return train_global(model, prep.user_emb, prep.item_emb, prep, cfg, seed=0, progress=False)

    theta = train(prepared, source_only)
    other = _Prepared([_Scenario(s.name, s.users[::-1].copy(), s.items) for s in prepared.train],
                      prepared.user_emb, prepared.item_emb)
    other.source_users, other.source_items = prepared.source_users, prepared.source_items
    assert torch.equal(train(other, source_only), theta)   # the scenario pairs changed, θ did not
    assert not torch.equal(train(other, GlobalTrainConfig(steps=20, batch_size=32)),
                           train(prepared, GlobalTrainConfig(steps=20, batch_size=32)))
    with pytest.raises(ValueError, match="no source-domain interaction"):
        train(_planted()[0], source_only)   # no source domain at all


def test_markdown_table_layout():
    methods = {m: {"recall@10": v, "recall@20": v + 0.1, "ndcg@10": v / 2, "ndcg@20": v / 2, "hit@10": v,
                   "hit@20": v} for m, v in {"s2meta": 0.5, "itempop": 0.4, "global": 0.2, "finetune": 0.3}.items()}
    doc = build_results("toy", 0, 3, 30, methods, backend="reference")
    assert list(doc) == ["dataset", "seed", "n_test_scenarios", "n_test_users", "methods", "backend"]
    assert list(doc["methods"]) == ["s2meta", "itempop", "global", "finetune"]
    text = markdown_table(doc)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| Method | Recall@10 | Recall@20 | NDCG@10")
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| ItemPop", "| Global", "| Finetune", "| s²Meta", "| Improve"]
    assert rows[4].split(" | ")[1] == "50.00"
    assert rows[5].split(" | ")[1] == "+25.00"   # (50 - 40) / 40


def test_s2meta_adapter_matches_the_learner_and_is_seeded():
    from s2meta_fast.data.tasks import support_batch
    from s2meta_fast.eval import S2Meta
    from s2meta_fast.eval.protocol import block_generator
    from s2meta_fast.meta import MetaConfig, MetaLearner

    prepared, tasks = _planted(d=8)
    torch.manual_seed(0)
    learner = MetaLearner(build_model("interaction", 8), prepared.user_emb, prepared.item_emb,
                          MetaConfig(t_max=6, t_min=2))
    method = S2Meta(learner, stop="sample")
    theta = method.adapt(tasks[:3], block_generator(7, 0, torch.device("cpu")))
    with torch.no_grad():
        direct = learner.adapt(support_batch(tasks[:3]), stop="sample",
                               generator=block_generator(7, 0, torch.device("cpu"))).theta
    assert torch.equal(theta, direct)
    first = evaluate(method, tasks, ks=(3,), seed=7, block_size=2, progress=False)["metrics"]
    assert evaluate(method, tasks, ks=(3,), seed=7, block_size=2, progress=False)["metrics"] == first
