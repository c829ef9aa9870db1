"""Seeded synthetic raw files in the ML-20M, Amazon and Taobao formats, with planted structure.

Planted model (all formats): users and items have latent vectors u, v in R^k; the source domain
is driven by u·v, while scenario c reweights the user's tastes with its own vector w_c, so a user's
choices inside c follow (u ⊙ w_c)·v. Frozen embeddings learnt from the source domain therefore
carry the signal, but ranking well inside a scenario needs adapting to w_c from its few support
pairs: the situation s²Meta is built for, at a size an end-to-end test can afford.

The files contain the awkward bits real dumps have: quoted titles with commas and quotes,
``(no genres listed)``, genome relevances of exactly 0.8 (not a tag), Python-literal Amazon
metadata (single quotes, nested dicts), multi-listed items, rating-1/2 rows to drop, items without
metadata, users and items without Taobao embeddings, clicks outside a theme's item pool.

``write_raw`` returns a manifest of the exact counts a correct loader must report.
"""
from __future__ import annotations

import csv
import gzip
import os

import numpy as np

FORMATS = ("ml20m", "amazon", "taobao")


class _World:
    def __init__(self, rng, n_users, n_items, n_scen, k=8):
        self.rng = rng
        self.U = rng.normal(size=(n_users, k))
        self.V = rng.normal(size=(n_items, k))
        # Scenario tastes: each scenario flips and rescales the latent dimensions differently.
        self.W = rng.choice([-1.5, -1.0, 0.5, 1.0, 1.5], size=(n_scen, k))

    def pick(self, u, items, k, w=None, temp=0.5):
        """k distinct items for user u, Gumbel-top-k on the (scenario-reweighted) affinity."""
        k = min(k, len(items))
        uu = self.U[u] * (1.0 if w is None else w)
        logits = self.V[items] @ uu / temp
        g = logits + self.rng.gumbel(size=len(items))
        return items[np.argsort(-g)[:k]]


def write_raw(format: str, folder: str, seed: int = 0, *, n_users: int = 600, n_items: int | None = None,
              n_scenarios: int = 12, per_scenario: int = 8, per_source: int = 12) -> dict:
    """Writes one raw dataset into ``folder`` (created) and returns its manifest of exact counts.

    per_scenario: mean picks of a user in a scenario they visit; per_source: in the source domain.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown synthetic format {format!r}; valid: {', '.join(FORMATS)}")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng([int(seed), FORMATS.index(format)])
    return {"ml20m": _ml20m, "amazon": _amazon, "taobao": _taobao}[format](
        rng, folder, n_users, n_items, n_scenarios, per_scenario, per_source)


def _scenario_items(rng, first, n_tagged, n_scen, extra_frac=0.25):
    """Each tagged item gets one scenario, a quarter of them a second one too."""
    own = {c: [] for c in range(n_scen)}
    for it in range(first, first + n_tagged):
        cs = [int(rng.integers(n_scen))]
        if rng.random() < extra_frac:
            cs.append(int(rng.integers(n_scen)))
        for c in set(cs):
            own[c].append(it)
    return {c: np.array(v, np.int64) for c, v in own.items()}


def _interactions(world, rng, n_users, source_items, scen_items, per_scenario, per_source,
                  scenario_only_frac=0.35, visit=0.5):
    """Returns a set of (user, item) pairs; a few users never touch the source domain."""
    pairs = set()
    for u in range(n_users):
        if rng.random() >= scenario_only_frac and len(source_items):
            for i in world.pick(u, source_items, max(1, rng.poisson(per_source))):
                pairs.add((u, int(i)))
        for c, items in scen_items.items():
            if len(items) and rng.random() < visit:
                for i in world.pick(u, items, max(1, rng.poisson(per_scenario)), w=world.W[c]):
                    pairs.add((u, int(i)))
    return sorted(pairs)


# --------------------------------------------------------------------------------------- ML-20M
def _ml20m(rng, folder, n_users, n_items, n_scen, per_scenario, per_source):
    n_items = n_items or 400
    n_untagged = n_items // 4
    n_genome = n_items - n_untagged // 2        # half the untagged movies still have genome rows
    world = _World(rng, n_users, n_items, n_scen)
    scen = _scenario_items(rng, n_untagged, n_items - n_untagged, n_scen)
    source = np.arange(n_untagged)
    pairs = _interactions(world, rng, n_users, source, scen, per_scenario, per_source)
    movie_ids = np.sort(rng.choice(np.arange(1, 10 * n_items), n_items, replace=False))
    user_ids = np.arange(1, n_users + 1) * 3        # non-contiguous raw ids
    genres = ["Action", "Comedy", "Drama", "Sci-Fi", "Film-Noir", "Children"]
    with open(os.path.join(folder, "movies.csv"), "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["movieId", "title", "genres"])
        for k, m in enumerate(movie_ids):
            title = [f"Movie {k}, The ({1950 + k % 60})", f'Say "Hi", Movie {k} (2001)', f"Plain {k} (1999)"][k % 3]
            g = "(no genres listed)" if k % 7 == 0 else "|".join(rng.choice(genres, 1 + k % 3, replace=False))
            w.writerow([int(m), title, g])
    tag_names = [f"tag {c}, with comma" if c % 3 == 0 else f"tag{c}" for c in range(n_scen)]
    with open(os.path.join(folder, "genome-tags.csv"), "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["tagId", "tag"])
        for c in range(n_scen):
            w.writerow([c + 1, tag_names[c]])
    member = np.zeros((n_items, n_scen), bool)
    for c, items in scen.items():
        member[items, c] = True
    with open(os.path.join(folder, "genome-scores.csv"), "w", encoding="utf-8") as fh:
        fh.write("movieId,tagId,relevance\n")
        for it in range(n_items - n_genome, n_items):
            for c in range(n_scen):
                r = rng.uniform(0.801, 1.0) if member[it, c] else (0.8 if rng.random() < 0.05 else rng.uniform(0, 0.8))
                fh.write(f"{int(movie_ids[it])},{c + 1},{r:.5f}\n")
    with open(os.path.join(folder, "ratings.csv"), "w", encoding="utf-8") as fh:
        fh.write("userId,movieId,rating,timestamp\n")
        for u, i in pairs:
            fh.write(f"{int(user_ids[u])},{int(movie_ids[i])},{rng.integers(1, 11) / 2:.1f},{1100000000 + u * 7 + i}\n")
    rated_users = sorted({u for u, _ in pairs})
    tagged = member.any(1)
    return {"format": "ml20m", "n_ratings": len(pairs), "n_interactions": len(pairs),
            "n_users": len(rated_users), "n_items": n_items, "n_movies": n_items,
            "n_movies_no_genres": sum(1 for k in range(n_items) if k % 7 == 0),
            "n_tags": n_scen, "n_tagged_movies": int(tagged.sum()), "n_source_items": int((~tagged).sum()),
            "tag_items": {tag_names[c]: int(member[:, c].sum()) for c in range(n_scen)},
            "n_source_interactions": sum(1 for _, i in pairs if not tagged[i])}


# --------------------------------------------------------------------------------------- Amazon
AMAZON_CATEGORIES = {
    "Books": ("source", ["Literature & Fiction", "History", "Science"]),
    "Beauty": ("train", ["Makeup", "Skin Care", "Hair Care"]),
    "Pet Supplies": ("train", ["Dogs", "Cats", "Fish & Aquatic Pets"]),
    "Digital Music": ("test", ["Pop", "Jazz"]),
    "Patio, Lawn & Garden": ("test", ["Gardening & Lawn Care", "Grills & Outdoor Cooking"]),
}


def _amazon(rng, folder, n_users, n_items, n_scen, per_scenario, per_source):
    leaves = [(top, sub) for top, (_, subs) in AMAZON_CATEGORIES.items() for sub in subs]
    per_leaf = (n_items or 40 * len(leaves)) // len(leaves)
    n_items = per_leaf * len(leaves)
    world = _World(rng, n_users, n_items, len(leaves))
    leaf_of = np.repeat(np.arange(len(leaves)), per_leaf)
    asins = np.array([f"B{rng.integers(10**8, 10**9)}{k:04d}" for k in range(n_items)])
    users = np.array([f"A{rng.integers(10**9, 10**10)}U{k}" for k in range(n_users)])
    src_leaves = [k for k, (top, _) in enumerate(leaves) if AMAZON_CATEGORIES[top][0] == "source"]
    source = np.flatnonzero(np.isin(leaf_of, src_leaves))
    scen = {k: np.flatnonzero(leaf_of == k) for k in range(len(leaves)) if k not in src_leaves}
    pairs = _interactions(world, rng, n_users, source, scen, per_scenario, per_source)
    # A few items of a test category are also listed under Books: they count as source items.
    multi = set(rng.choice(scen[max(scen)], 3, replace=False).tolist())
    no_meta = set(rng.choice(scen[min(scen)], 2, replace=False).tolist())
    rows_by_top: dict[str, list] = {top: [] for top in AMAZON_CATEGORIES}
    n_low = 0
    kept = []
    pair_set = set(pairs)
    for u, i in pairs:
        top = leaves[leaf_of[i]][0]
        r = float(rng.choice([3.0, 4.0, 5.0]))
        rows_by_top[top].append((users[u], asins[i], r, 1300000000 + u + i))
        kept.append((u, i))
        if rng.random() < 0.15:   # a second, low rating of another item: dropped as non-positive
            j = int(rng.integers(n_items))
            if (u, j) not in pair_set:
                rows_by_top[leaves[leaf_of[j]][0]].append((users[u], asins[j], float(rng.choice([1.0, 2.0])),
                                                           1300000000 + u + j))
                n_low += 1
    for top, rows in rows_by_top.items():
        stem = top.replace(",", "").replace("&", "and").replace(" ", "_")
        with open(os.path.join(folder, f"ratings_{stem}.csv"), "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(f"{row[0]},{row[1]},{row[2]:.1f},{row[3]}\n")
        with gzip.open(os.path.join(folder, f"meta_{stem}.json.gz"), "wt", encoding="utf-8") as fh:
            for k in range(n_items):
                t, sub = leaves[leaf_of[k]]
                if t != top or k in no_meta:
                    continue
                cats = [[t, sub]]
                if k in multi:
                    cats.append(["Books", "History"])
                d = {"asin": str(asins[k]), "title": f"Item {k}, \"deluxe\" 'edition'", "price": round(float(rng.uniform(1, 99)), 2),
                     "related": {"also_bought": [str(a) for a in asins[:2]]}, "salesRank": {t: int(k)},
                     "categories": cats}
                fh.write(repr(d) + "\n")
    pos = [(u, i) for u, i in kept if i not in no_meta]
    src_items = set(source.tolist()) | multi
    groups = {f"{t} > {s}": AMAZON_CATEGORIES[t][0] for t, s in leaves if AMAZON_CATEGORIES[t][0] != "source"}
    pos_items = {i for _, i in pos}
    leaf_items = {f"{t} > {s}": len([k for k in np.flatnonzero(leaf_of == li).tolist()
                                     if k not in src_items and k in pos_items])
                  for li, (t, s) in enumerate(leaves) if AMAZON_CATEGORIES[t][0] != "source"}
    return {"format": "amazon", "n_ratings": len(kept) + n_low, "n_positive": len(kept), "n_low_ratings_dropped": n_low,
            "n_without_meta_dropped": len(kept) - len(pos), "n_interactions": len(pos),
            "n_users": len({u for u, _ in pos}), "n_items": len({i for _, i in pos}),
            "n_source_items": len({i for _, i in pos if i in src_items}), "groups": groups,
            "leaf_items": leaf_items}


# --------------------------------------------------------------------------------------- Taobao
def _taobao(rng, folder, n_users, n_items, n_scen, per_scenario, per_source, dim=16):
    n_items = n_items or 60 * n_scen
    world = _World(rng, n_users, n_items, n_scen)
    n_source_items = n_items // 3
    source = np.arange(n_source_items)
    scen = {c: np.arange(n_source_items, n_items)[rng.random(n_items - n_source_items) < 0.35] for c in range(n_scen)}
    user_ids = np.arange(n_users) * 11 + 1000
    item_ids = np.arange(n_items) * 13 + 500000
    theme_ids = np.arange(n_scen) + 70
    buys, clicks = set(), []
    for u in range(n_users):
        for i in world.pick(u, source, max(1, rng.poisson(per_source))):
            buys.add((u, int(i)))
        for c, items in scen.items():
            if rng.random() < 0.5:
                for i in world.pick(u, items, max(1, rng.poisson(per_scenario)), w=world.W[c]):
                    clicks.append((u, c, int(i)))
                    if rng.random() < 0.1:
                        clicks.append((u, c, int(i)))     # repeated click of the same item
    # Clicks on items outside the theme's pool (log noise the loader must drop).
    outside = []
    for c in range(2):
        not_in = np.setdiff1d(np.arange(n_source_items, n_items), scen[c])
        outside.append((int(rng.integers(n_users)), c, int(not_in[0])))
    clicks_all = clicks + outside
    with open(os.path.join(folder, "theme_click_log.csv"), "w", encoding="utf-8") as fh:
        fh.write("user_id,theme_id,item_id,leaf_cate_id,cate_level1_id,clk_cnt,reach_time\n")
        for u, c, i in clicks_all:
            fh.write(f"{user_ids[u]},{theme_ids[c]},{item_ids[i]},{i % 17},{i % 5},1,2018-01-0{1 + (u + i) % 6} 10:00:00\n")
    with open(os.path.join(folder, "theme_item_pool.csv"), "w", encoding="utf-8") as fh:
        fh.write("theme_id,item_id\n")
        for c, items in scen.items():
            for i in items:
                fh.write(f"{theme_ids[c]},{item_ids[i]}\n")
    with open(os.path.join(folder, "user_item_purchase_log.csv"), "w", encoding="utf-8") as fh:
        fh.write("user_id,item_id,item_leaf_cate_id,item_cate_level1_id,bought_cnt\n")
        for u, i in sorted(buys):
            fh.write(f"{user_ids[u]},{item_ids[i]},{i % 17},{i % 5},1\n")
    # Given embeddings: a noisy random projection of the planted latents.
    proj = rng.normal(size=(world.U.shape[1], dim)) / np.sqrt(world.U.shape[1])
    ue = world.U @ proj + 0.1 * rng.normal(size=(n_users, dim))
    ie = world.V @ proj + 0.1 * rng.normal(size=(n_items, dim))
    users_no_emb = set(rng.choice(n_users, max(1, n_users // 30), replace=False).tolist())
    items_no_emb = set(rng.choice(np.arange(n_source_items, n_items), 3, replace=False).tolist())
    with open(os.path.join(folder, "user_embedding.csv"), "w", encoding="utf-8") as fh:
        fh.write("user_id,emb\n")
        for u in range(n_users):
            if u not in users_no_emb:
                fh.write(f"{user_ids[u]}," + " ".join(f"{x:.5f}" for x in ue[u]) + "\n")
    with open(os.path.join(folder, "item_embedding.csv"), "w", encoding="utf-8") as fh:
        fh.write("item_id,emb\n")
        for i in range(n_items):
            if i not in items_no_emb:
                fh.write(f"{item_ids[i]}," + " ".join(f"{x:.5f}" for x in ie[i]) + "\n")
    all_users = {u for u, _, _ in clicks_all} | {u for u, _ in buys}
    all_items = ({i for _, _, i in clicks_all} | {i for _, i in buys}
                 | {int(i) for items in scen.values() for i in items})
    return {"format": "taobao", "n_clicks": len(clicks_all), "n_clicks_outside_pool": len(outside),
            "n_purchases": len(buys), "n_interactions": len(clicks_all), "n_themes": n_scen,
            "n_users": len(all_users), "n_items": len(all_items), "embed_dim": dim,
            "n_users_without_embedding": len(users_no_emb & all_users),
            "n_items_without_embedding": len(items_no_emb & all_items),
            "theme_pairs": {f"theme:{theme_ids[c]}": len({(u, i) for u, cc, i in clicks if cc == c})
                            for c in range(n_scen)}}
