"""TaskSampler edge cases on hand-built scenarios: saturated users, near-saturated users,
scenarios just above the minimum size (the exact per-row path)."""
import numpy as np
import pytest
import torch

from s2meta_fast.data import PreparedData, Scenario, TaskSampler


def _prepared(seed=0):
    rng = np.random.default_rng(seed)
    n_users, n_items = 60, 80
    # "small": 30 items, user 0 touched all of them, user 1 all but item 29, 200 pairs in all.
    pairs = {(0, i) for i in range(30)} | {(1, i) for i in range(29)}
    while len(pairs) < 200:
        pairs.add((int(rng.integers(2, n_users)), int(rng.integers(0, 30))))
    u, i = map(np.array, zip(*sorted(pairs)))
    small = Scenario("small", u.astype(np.int64), i.astype(np.int64))
    big = set()
    while len(big) < 1200:
        big.add((int(rng.integers(0, n_users)), int(rng.integers(30, 80))))
    u2, i2 = map(np.array, zip(*sorted(big)))
    large = Scenario("large", u2.astype(np.int64), i2.astype(np.int64))
    z = lambda n: torch.zeros(n, 4)
    return PreparedData("toy", z(n_users), z(n_items), [small, large], [], [], np.arange(n_users),
                        np.arange(n_items), np.ones(n_users, bool), np.ones(n_items, bool),
                        np.zeros(0, np.int64), np.zeros(0, np.int64))


@pytest.mark.parametrize("seed", range(5))
def test_saturated_and_near_saturated_users(seed):
    d = _prepared(seed)
    pairs = {s.name: set(zip(s.users.tolist(), s.items.tolist())) for s in d.train}
    ts = TaskSampler(d, seed)
    for _ in range(20):
        b = ts.train_batch(d.train, 4)
        for s, name in enumerate(b.names):
            qu, qp, qn = b.query_users[s].tolist(), b.query_pos[s].tolist(), b.query_neg[s].tolist()
            assert 0 not in qu or name == "large"          # user 0 has no negative in "small"
            for u, p, n in zip(qu, qp, qn):
                assert (u, p) in pairs[name] and (u, n) not in pairs[name]
                if name == "small" and u == 1:
                    assert n == 29                           # the only item user 1 never touched
            sup = set(zip(b.support_users[s].tolist(), b.support_items[s].tolist()))
            assert len(sup) == 64 and sup <= pairs[name] and not sup & set(zip(qu, qp))


def test_same_seed_same_stream():
    d = _prepared()
    a, b = TaskSampler(d, 3), TaskSampler(d, 3)
    for _ in range(5):
        x, y = a.train_batch(d.train, 3), b.train_batch(d.train, 3)
        assert x.names == y.names and torch.equal(x.query_neg, y.query_neg) and torch.equal(x.support_users,
                                                                                              y.support_users)


def test_too_small_scenario_is_an_error():
    d = _prepared()
    tiny = Scenario("tiny", np.arange(10, dtype=np.int64), np.arange(10, dtype=np.int64))
    with pytest.raises(ValueError, match="tiny"):
        TaskSampler(d, 0).train_batch([tiny], 1)
    with pytest.raises(ValueError, match="no scenarios"):
        TaskSampler(d, 0).train_batch([], 1)
