"""TaskSampler: docs/spec.md §5 training tasks and the docs/spec.md §6 evaluation split."""
import time

import numpy as np
import pytest
import torch

from s2meta_fast.data import EvalTask, TaskBatch, TaskSampler, support_batch


def _pair_sets(d):
    return {s.name: set(zip(s.users.tolist(), s.items.tolist())) for s in d.scenarios()}


@pytest.fixture(scope="module", params=["ml20m", "taobao"])
def data(request, synthetic_prepared):
    return synthetic_prepared[request.param]


def check_batch(d, b: TaskBatch, S):
    pairs = _pair_sets(d)
    by_name = {s.name: s for s in d.scenarios()}
    assert b.support_users.shape == (S, 64) and b.query_users.shape == (S, 128)
    assert b.query_neg.shape == (S, 128) and b.pool.shape[0] == S and len(b.names) == S
    for t in (b.support_users, b.support_items, b.support_item_index, b.pool, b.pool_size, b.query_users,
              b.query_pos, b.query_neg):
        assert t.dtype == torch.int64
    for s, name in enumerate(b.names):
        P = int(b.pool_size[s])
        pool = b.pool[s].numpy()
        np.testing.assert_array_equal(pool[:P], np.unique(by_name[name].items))
        assert (pool[P:] == pool[0]).all()
        assert torch.equal(b.pool[s][b.support_item_index[s]], b.support_items[s])
        assert torch.equal(b.pool[s][b.query_pos_index[s]], b.query_pos[s])
        assert torch.equal(b.pool[s][b.query_neg_index[s]], b.query_neg[s])
        sup = list(zip(b.support_users[s].tolist(), b.support_items[s].tolist()))
        qry = list(zip(b.query_users[s].tolist(), b.query_pos[s].tolist()))
        assert len(set(sup)) == 64 and set(sup) <= pairs[name]
        assert len(set(qry)) == 128 and set(qry) <= pairs[name]
        assert not set(sup) & set(qry)              # the query comes from the rest
        for u, p, n in zip(b.query_users[s].tolist(), b.query_pos[s].tolist(), b.query_neg[s].tolist()):
            assert n != p and (u, n) not in pairs[name]
        assert (b.query_neg_index[s] < P).all()


def test_train_batch_invariants(data):
    ts = TaskSampler(data, seed=0)
    for S in (1, 5, 3 * len(data.train)):
        check_batch(data, ts.train_batch(data.train, S), S)


def test_train_batch_deterministic_and_resumable(data):
    a, b, c = TaskSampler(data, 7), TaskSampler(data, 7), TaskSampler(data, 8)
    ba, bb, bc = a.train_batch(data.train, 4), b.train_batch(data.train, 4), c.train_batch(data.train, 4)
    assert torch.equal(ba.query_neg, bb.query_neg) and ba.names == bb.names
    assert not torch.equal(ba.support_users, bc.support_users)
    state = a.state_dict()
    nxt = a.train_batch(data.train, 4)
    b.load_state_dict(state)
    assert torch.equal(b.train_batch(data.train, 4).query_neg, nxt.query_neg)
    moved = ba.to("cpu")
    assert torch.equal(moved.pool, ba.pool) and moved.names == ba.names


def test_eval_tasks(data):
    ts = TaskSampler(data, seed=1)
    tasks = ts.eval_tasks(data.test)
    by_name = {s.name: s for s in data.test}
    for t in tasks:
        assert isinstance(t, EvalTask)
        sc = by_name[t.name]
        np.testing.assert_array_equal(t.items, np.unique(sc.items))
        assert t.support_users.shape == (64,) and t.support_items.shape == (64,)
        assert t.n_eval == sc.n_interactions - 64
        assert t.eval_indptr[0] == 0 and t.eval_indptr[-1] == t.n_eval and (np.diff(t.eval_indptr) > 0).all()
        assert (np.diff(t.eval_users) > 0).all()
        ev = {(int(u), int(i)) for a, u in enumerate(t.eval_users)
              for i in t.eval_items[t.eval_indptr[a]:t.eval_indptr[a + 1]]}
        sup = set(zip(t.support_users.tolist(), t.support_items.tolist()))
        assert not ev & sup and ev | sup == set(zip(sc.users.tolist(), sc.items.tolist()))
        np.testing.assert_array_equal(t.items[t.eval_item_index], t.eval_items)
    # Fixed by (seed, name): independent of order, of other scenarios and of training draws.
    ts2 = TaskSampler(data, seed=1)
    ts2.train_batch(data.train, 3)
    again = {t.name: t for t in ts2.eval_tasks(list(reversed(data.test)))}
    for t in tasks:
        np.testing.assert_array_equal(t.support_users, again[t.name].support_users)
        np.testing.assert_array_equal(t.eval_items, again[t.name].eval_items)
    other = TaskSampler(data, seed=2).eval_task(data.test[0])
    assert not np.array_equal(other.support_users, tasks[0].support_users) or \
        not np.array_equal(other.support_items, tasks[0].support_items)


def test_support_batch(data):
    tasks = TaskSampler(data, seed=0).eval_tasks(data.test)
    b = support_batch(tasks)
    assert b.query_users is None and b.query_pos is None and b.query_neg is None
    assert b.support_users.shape == (len(tasks), 64)
    for s, t in enumerate(tasks):
        assert int(b.pool_size[s]) == len(t.items)
        assert torch.equal(b.pool[s][b.support_item_index[s]], torch.from_numpy(t.support_items))


def test_train_batch_speed(ml100k):
    ts = TaskSampler(ml100k, seed=0)
    ts.train_batch(ml100k.train, 64)     # builds the per-scenario index once
    times = []
    for _ in range(15):
        t = time.perf_counter()
        ts.train_batch(ml100k.train, 64)
        times.append(time.perf_counter() - t)
    # Target is well under 10 ms; the bound leaves room for a loaded shared CI machine.
    assert np.median(times) < 0.03


def test_ml100k_tasks(ml100k):
    ts = TaskSampler(ml100k, seed=0)
    check_batch(ml100k, ts.train_batch(ml100k.train, 8), 8)
    tasks = ts.eval_tasks(ml100k.test)
    assert sum(t.n_eval_users for t in tasks) > 1000
