"""prepare(): registry, thresholds, split, embeddings, caching and determinism."""
import inspect
import logging
import os

import numpy as np
import pytest
import torch

from s2meta_fast.data import (DATASETS, UnknownDatasetError, available_datasets, load_prepared, planted, prepare,
                              save_prepared)
from s2meta_fast.data.embeddings import train_bpr

# Mirrors conftest.SMALL (test dirs are not packages, so no import from it).
SMALL = dict(min_items=10, max_items=500, mf_epochs=3, progress=False)


def test_registry_names():
    assert available_datasets() == ["amazon", "ml100k", "ml20m", "planted0", "planted05", "planted05x4", "planted1",
                                    "planted1x4", "planted2", "planted2x4", "taobao"]
    with pytest.raises(UnknownDatasetError) as exc:
        prepare("movielens")
    for name in DATASETS:
        assert name in str(exc.value)


@pytest.mark.parametrize("name", sorted(planted.BENCHMARKS))
def test_planted_benchmarks_reach_the_generator(name):
    """Each registered planted benchmark's options are the generator's: its strength and its
    number of scenarios arrive (a small world of 60 users keeps this fast)."""
    options = DATASETS[name].options
    assert set(options) <= set(inspect.signature(planted.load_planted).parameters)
    raw = planted.load_planted(**options, n_users=60)
    expected = planted.BENCHMARKS[name].get("n_scenarios",
                                            inspect.signature(planted.load_planted).parameters["n_scenarios"].default)
    assert len(raw.tags) == expected
    assert raw.stats["strength"] == planted.BENCHMARKS[name]["strength"]


def test_unknown_option_lists_valid_ones(synthetic_dirs, cache_dir):
    folder, _ = synthetic_dirs["ml20m"]
    with pytest.raises(TypeError, match="relevance"):
        prepare("ml20m", folder, cache_dir=cache_dir, bogus=1, **SMALL)
    with pytest.raises(ValueError, match="min_items"):
        prepare("ml20m", folder, cache_dir=cache_dir, **{**SMALL, "min_items": 50, "max_items": 10})


@pytest.mark.parametrize("fmt", ["ml20m", "amazon", "taobao"])
def test_splits_disjoint_and_thresholds(synthetic_prepared, fmt):
    d = synthetic_prepared[fmt]
    names = [s.name for s in d.scenarios()]
    assert len(names) == len(set(names)) >= 6
    assert len(d.train) > 0 and len(d.valid) > 0 and len(d.test) > 0
    for s in d.scenarios():
        assert 10 <= s.n_items <= 500 and s.n_interactions >= 192
        assert s.users.dtype == np.int64 and s.items.dtype == np.int64
        pairs = s.users * d.n_items + s.items
        assert np.unique(pairs).size == pairs.size                 # no duplicate interaction
        assert d.user_has_emb[s.users].all() and d.item_has_emb[s.items].all()
    assert d.user_emb.dtype == torch.float32 and torch.isfinite(d.user_emb).all()


@pytest.mark.parametrize("fmt", ["ml20m", "amazon", "taobao"])
def test_splits_have_disjoint_users(synthetic_prepared, fmt):
    d = synthetic_prepared[fmt]
    users = {k: set().union(*[set(s.users.tolist()) for s in v]) if v else set() for k, v in d.splits.items()}
    assert not users["train"] & users["valid"] and not users["train"] & users["test"]
    assert not users["valid"] & users["test"]
    by = d.stats["n_users_by_split"]
    assert by["test"] > by["valid"] > 0 and by["train"] > by["test"]


def test_user_split_can_be_disabled(synthetic_dirs, tmp_path):
    folder, _ = synthetic_dirs["ml20m"]
    d = prepare("ml20m", folder, cache_dir=str(tmp_path), heldout_user_frac=0.0, **SMALL)
    n = d.n_items
    pairs = [set((s.users * n + s.items).tolist()) for s in d.scenarios()]
    assert len(d.scenarios()) == 12 and sum(map(len, pairs)) > len(set().union(*pairs))  # tags overlap


def test_amazon_split_follows_table5(synthetic_prepared):
    d = synthetic_prepared["amazon"]
    tops = lambda scs: {s.name.split(" > ")[0] for s in scs}
    assert tops(d.test) <= {"Digital Music", "Patio, Lawn & Garden"}
    assert tops(d.train) | tops(d.valid) <= {"Beauty", "Pet Supplies"}
    assert not any(s.name.startswith("Books") for s in d.scenarios())


def test_scenario_users_have_source_history(synthetic_prepared):
    # Appendix A.4: scenario interactions are those of shared users; the others train embeddings.
    d = synthetic_prepared["ml20m"]
    src_users = set(d.source_users.tolist())
    for s in d.scenarios():
        assert set(s.users.tolist()) <= src_users
    scen_pairs = set()
    for s in d.scenarios():
        scen_pairs |= set((s.users * d.n_items + s.items).tolist())
    assert not scen_pairs & set((d.source_users * d.n_items + d.source_items).tolist())


def test_prepare_deterministic_and_seed_changes_split(synthetic_dirs, tmp_path):
    folder, _ = synthetic_dirs["ml20m"]
    a = prepare("ml20m", folder, cache_dir=str(tmp_path / "a"), seed=3, **SMALL)
    b = prepare("ml20m", folder, cache_dir=str(tmp_path / "b"), seed=3, **SMALL)
    c = prepare("ml20m", folder, cache_dir=str(tmp_path / "c"), seed=4, **SMALL)
    assert torch.equal(a.user_emb, b.user_emb) and torch.equal(a.item_emb, b.item_emb)
    assert [s.name for s in a.test] == [s.name for s in b.test]
    assert not torch.equal(a.user_emb, c.user_emb)


def test_cache_roundtrip(synthetic_dirs, tmp_path, caplog):
    folder, _ = synthetic_dirs["taobao"]
    cache = str(tmp_path / "cache")
    a = prepare("taobao", folder, cache_dir=cache, **SMALL)
    files = os.listdir(os.path.join(cache, "prepared"))
    assert len(files) == 1 and not any(f.startswith(".tmp") for f in files)
    with caplog.at_level(logging.INFO, logger="s2meta_fast.data"):
        b = prepare("taobao", folder, cache_dir=cache, **SMALL)
    assert "loaded from cache" in caplog.text
    assert torch.equal(a.user_emb, b.user_emb)
    assert [(s.name, s.users.tolist(), s.items.tolist()) for s in a.scenarios()] == \
           [(s.name, s.users.tolist(), s.items.tolist()) for s in b.scenarios()]
    assert a.stats == b.stats and list(a.item_ids) == list(b.item_ids)
    path = str(tmp_path / "x.npz")
    save_prepared(a, path)
    assert load_prepared(path).summary() == a.summary()


def test_bpr_seeded_and_informative():
    rng = np.random.default_rng(0)
    U, V = rng.normal(size=(120, 4)), rng.normal(size=(80, 4))
    s = U @ V.T
    users, items = np.nonzero(s > np.quantile(s, 0.85, axis=1, keepdims=True))
    a = train_bpr(users, items, 121, 80, dim=16, epochs=30, batch_size=256, seed=1, progress=False)
    b = train_bpr(users, items, 121, 80, dim=16, epochs=30, batch_size=256, seed=1, progress=False)
    np.testing.assert_array_equal(a[0], b[0])
    assert np.all(a[0][120] == 0)               # user 120 has no interaction: zero row
    score = a[0][:120] @ a[1].T
    pos = np.zeros_like(score, bool)
    pos[users, items] = True
    auc = np.mean([(score[u][pos[u]][:, None] > score[u][~pos[u]][None]).mean() for u in range(120)])
    assert auc > 0.85


def test_ml100k_cached_is_fast(ml100k, cache_dir):
    import time
    t = time.perf_counter()
    d = prepare("ml100k", cache_dir=cache_dir, progress=False)
    assert time.perf_counter() - t < 2.0
    assert [s.name for s in d.test] == [s.name for s in ml100k.test]
