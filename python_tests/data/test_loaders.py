"""Raw-format loaders: exact counts on synthetic files of every format and on the real ML-100K."""
import importlib.util
import csv
import gzip
import os
import warnings

import numpy as np
import pytest

from s2meta_fast.data.amazon import load_amazon, read_meta
from s2meta_fast.data.movielens import load_ml20m, load_ml100k
from s2meta_fast.data.scenarios import unique_pairs
from s2meta_fast.data.taobao import load_taobao

HAS_RECBOLE = importlib.util.find_spec("recbole") is not None


def test_ml20m_counts(synthetic_dirs):
    folder, m = synthetic_dirs["ml20m"]
    raw = load_ml20m(folder)
    for k in ("n_ratings", "n_interactions", "n_movies", "n_movies_no_genres", "n_tagged_movies", "n_source_items"):
        assert raw.stats[k] == m[k], k
    assert len(raw.user_ids) == m["n_users"] and len(raw.item_ids) == m["n_items"]
    assert {k: len(v) for k, v in raw.tags.items()} == m["tag_items"]
    assert len(raw.source_users) == m["n_source_interactions"]
    assert len(raw.source_users) + len(raw.target_users) == m["n_interactions"]
    # Independent recount with the csv module: quoted titles with commas are one field.
    with open(os.path.join(folder, "movies.csv"), newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    assert len(rows) == m["n_movies"] and all(len(r) == 3 for r in rows)
    assert any("," in r[1] for r in rows) and any('"' in r[1] for r in rows)
    with open(os.path.join(folder, "ratings.csv")) as fh:
        assert sum(1 for _ in fh) - 1 == raw.stats["n_ratings"]


def test_ml20m_relevance_is_strict(synthetic_dirs):
    folder, _ = synthetic_dirs["ml20m"]
    with open(os.path.join(folder, "genome-scores.csv")) as fh:
        next(fh)
        exact = sum(1 for line in fh if line.rstrip().endswith(",0.80000"))
    assert exact > 0   # the generator plants relevance == 0.8 rows; they must not count as tags
    raw_lo = load_ml20m(folder, relevance=0.79999)
    raw = load_ml20m(folder)
    assert sum(map(len, raw_lo.tags.values())) == sum(map(len, raw.tags.values())) + exact


def test_amazon_counts(synthetic_dirs):
    folder, m = synthetic_dirs["amazon"]
    raw = load_amazon(folder)
    for k in ("n_ratings", "n_positive", "n_low_ratings_dropped", "n_without_meta_dropped", "n_interactions",
              "n_source_items"):
        assert raw.stats[k] == m[k], k
    assert len(raw.user_ids) == m["n_users"] and len(raw.item_ids) == m["n_items"]
    assert raw.groups == m["groups"]
    assert {k: len(v) for k, v in raw.tags.items()} == m["leaf_items"]
    # "Patio, Lawn & Garden" (file stem Patio_Lawn_and_Garden) matches Table 5's "Patio, Lawn and Garden".
    assert any(k.startswith("Patio, Lawn & Garden > ") and g == "test" for k, g in raw.groups.items())


def test_amazon_meta_python_literals(synthetic_dirs):
    folder, _ = synthetic_dirs["amazon"]
    path = os.path.join(folder, "meta_Beauty.json.gz")
    meta = read_meta(path)
    with gzip.open(path, "rt") as fh:
        first = fh.readline()
    assert first.startswith("{'asin': ")   # single-quoted: not JSON
    assert all(isinstance(p, list) and p[0] == "Beauty" for cats in meta.values() for p in cats if p[0] != "Books")


def test_amazon_meta_backslashes_read_without_warnings(tmp_path):
    # real descriptions hold "\d", "\&": invalid escapes to Python, which literal_eval warns about
    path = tmp_path / "meta_Beauty.json"
    path.write_text("{'asin': 'B1', 'description': 'size 3\\d \\& more', 'categories': [['Beauty', 'Nails\\y']]}\n"
                    "{'asin': 'B2', 'title': 'a \\q', 'categories': [['Beauty']]}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        meta = read_meta(str(path))
    assert meta == {"B1": [["Beauty", "Nails\\y"]], "B2": [["Beauty"]]}


def test_amazon_split_override(synthetic_dirs):
    folder, _ = synthetic_dirs["amazon"]
    raw = load_amazon(folder, categories={"source": ["Books"], "train": ["Beauty", "Digital Music"],
                                          "valid": ["Pet Supplies"], "test": ["Patio, Lawn and Garden"]})
    assert {g for k, g in raw.groups.items() if k.startswith("Digital Music")} == {"train"}
    assert {g for k, g in raw.groups.items() if k.startswith("Pet Supplies")} == {"valid"}
    with pytest.raises(ValueError, match="valid: source, train, valid, test"):
        load_amazon(folder, categories={"meta-train": ["Beauty"]})


def test_taobao_counts(synthetic_dirs):
    folder, m = synthetic_dirs["taobao"]
    raw = load_taobao(folder)
    for k in ("n_clicks", "n_clicks_outside_pool", "n_purchases", "n_interactions", "n_themes",
              "n_users_without_embedding", "n_items_without_embedding"):
        assert raw.stats[k] == m[k], k
    assert len(raw.user_ids) == m["n_users"] and len(raw.item_ids) == m["n_items"]
    assert raw.given_user_emb.shape == (m["n_users"], m["embed_dim"])
    assert raw.given_item_emb.shape == (m["n_items"], m["embed_dim"])
    assert (~raw.given_user_mask).sum() == m["n_users_without_embedding"]
    assert np.all(raw.given_user_emb[~raw.given_user_mask] == 0)
    pairs = {k: len(unique_pairs(u, i, len(raw.item_ids))[0]) for k, (u, i) in raw.explicit.items()}
    assert pairs == m["theme_pairs"]


def test_taobao_embeddings_parsed_exactly(synthetic_dirs):
    folder, _ = synthetic_dirs["taobao"]
    raw = load_taobao(folder)
    with open(os.path.join(folder, "user_embedding.csv")) as fh:
        next(fh)
        uid, emb = fh.readline().rstrip().split(",")
    row = np.searchsorted(raw.user_ids, int(uid))
    np.testing.assert_allclose(raw.given_user_emb[row], np.array(emb.split(), np.float32))


@pytest.mark.skipif(not HAS_RECBOLE, reason="recbole is not installed (pip install --no-deps recbole==1.2.1)")
def test_ml100k_exact_counts():
    raw = load_ml100k(seed=0)
    assert raw.stats["n_ratings"] == 100_000
    assert raw.stats["n_interactions"] == 100_000
    assert len(raw.user_ids) == 943
    assert len(raw.item_ids) == 1682
    assert len(raw.source_users) + len(raw.target_users) == 100_000
    assert "ml.genre:Action" in raw.tags and any(k.startswith("fb.genre:") for k in raw.tags)


def test_ml100k_prepared(ml100k):
    d = ml100k
    assert (d.n_users, d.n_items, d.embed_dim) == (943, 1682, 64)
    assert d.stats["n_ratings"] == 100_000
    assert len(d.scenarios()) >= 40
    assert min(len(d.train), len(d.valid), len(d.test)) >= 5
    # No (user, item) pair of a meta-test scenario is a meta-train interaction.
    key = lambda scs: set().union(*[set((s.users * d.n_items + s.items).tolist()) for s in scs])
    assert not key(d.test) & key(d.train) and not key(d.valid) & key(d.train)
    for s in d.scenarios():
        assert 30 <= s.n_items <= 400 and s.n_interactions >= 64 + 128
    # Reserved (embedding-only) users never appear in a scenario.
    shared = np.zeros(d.n_users, bool)
    for s in d.scenarios():
        shared[s.users] = True
    assert shared.sum() <= d.stats["n_shared_users"]
    assert d.stats["n_reserved_users"] == round(0.25 * 943)
