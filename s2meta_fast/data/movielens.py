"""MovieLens loaders: the real ML-100K shipped with RecBole, and a raw ML-20M folder."""
from __future__ import annotations

import csv
import importlib.util
import logging
import os

import numpy as np
import pandas as pd

from ._io import read_table, require_dir, require_files
from .errors import DataFileError, EmptyDataError
from .scenarios import RawData

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# ML-100K (RecBole atomic files)
# ---------------------------------------------------------------------------------------------

ML100K_FILES = {
    "ml-100k.inter": ("user_id", "item_id", "rating", "timestamp"),
    "ml-100k.item": ("item_id", "movie_title", "release_year", "class"),
    "ml-100k.kg": ("head_id", "relation_id", "tail_id"),
    "ml-100k.link": ("item_id", "entity_id"),
}

# Freebase relations whose tail entity describes what a film is, where it is from, or how it was
# received — the same kinds of facts the ML-20M tag genome holds ("french", "pixar",
# "oscar (best picture)"). Person relations (actor, director, ...) and sequels are left out:
# no such entity links more than a dozen ML-100K movies.
ML100K_RELATIONS = (
    "film.film.genre", "film.film.subjects", "film.film.language", "film.film.country",
    "film.film.production_companies", "film.film.rating", "film.film.award_nomination",
    "film.film.award_won",
)


def recbole_ml100k_dir() -> str:
    spec = importlib.util.find_spec("recbole")
    if spec is None or spec.origin is None:
        raise DataFileError("ml100k: the real MovieLens-100K comes with the PyPI package recbole==1.2.1; "
                            "install it with `pip install --no-deps recbole==1.2.1`, or pass data_dir= a folder "
                            "holding " + ", ".join(f"{f} ({', '.join(c)})" for f, c in ML100K_FILES.items()))
    return os.path.join(os.path.dirname(spec.origin), "dataset_example", "ml-100k")


def load_ml100k(data_dir: str | None = None, *, seed: int = 0, relations=ML100K_RELATIONS,
                source_item_frac: float = 0.3, reserved_user_frac: float = 0.25) -> RawData:
    """ML-100K with genre / Freebase-entity tags as scenarios.

    Nearly every ML-100K movie carries some tag, so "untagged movies" would leave a source domain
    of < 1% of the ratings. Instead a seeded ``source_item_frac`` of the movies is reserved as the
    scenario-free source domain, and a seeded ``reserved_user_frac`` of the users play the
    paper's scenario-only users: all their ratings train the embeddings, none is ever a
    scenario interaction. See docs/data.md.
    """
    folder = require_dir(data_dir or recbole_ml100k_dir(), "ml100k", ML100K_FILES)
    path = {f: os.path.join(folder, f) for f in ML100K_FILES}
    inter = read_table(path["ml-100k.inter"], ["user_id", "item_id", "rating"],
                       {"user_id": np.int64, "item_id": np.int64, "rating": np.float32},
                       sep="\t", quoting=csv.QUOTE_NONE, strict_fields=True)
    items_df = read_table(path["ml-100k.item"], ["item_id", "class"], {"item_id": np.int64, "class": str},
                          sep="\t", quoting=csv.QUOTE_NONE)
    kg = read_table(path["ml-100k.kg"], ["head_id", "relation_id", "tail_id"],
                    {"head_id": str, "relation_id": str, "tail_id": str}, sep="\t", quoting=csv.QUOTE_NONE,
                    strict_fields=True)
    link = read_table(path["ml-100k.link"], ["item_id", "entity_id"], {"item_id": np.int64, "entity_id": str},
                      sep="\t", quoting=csv.QUOTE_NONE, strict_fields=True)

    user_ids = np.unique(inter["user_id"].to_numpy())
    item_ids = np.unique(np.concatenate([items_df["item_id"].to_numpy(), inter["item_id"].to_numpy()]))
    u = np.searchsorted(user_ids, inter["user_id"].to_numpy())
    i = np.searchsorted(item_ids, inter["item_id"].to_numpy())
    key = np.unique(u * len(item_ids) + i)
    u, i = key // len(item_ids), key % len(item_ids)

    tags: dict[str, np.ndarray] = {}
    genres = pd.DataFrame({"item": np.searchsorted(item_ids, items_df["item_id"].to_numpy()),
                           "g": items_df["class"].fillna("").str.split(" ")}).explode("g")
    genres = genres[(genres["g"] != "") & (genres["g"] != "unknown")]
    for g, grp in genres.groupby("g"):
        tags[f"ml.genre:{g}"] = grp["item"].to_numpy(np.int64)
    link = link[link["item_id"].isin(item_ids)]
    ent2item = pd.Series(np.searchsorted(item_ids, link["item_id"].to_numpy()), index=link["entity_id"].to_numpy())
    ent2item = ent2item[~ent2item.index.duplicated()]
    facts = kg[kg["relation_id"].isin(list(relations)) & kg["head_id"].isin(ent2item.index)]
    facts = facts.assign(item=ent2item.loc[facts["head_id"].to_numpy()].to_numpy())
    for (rel, tail), grp in facts.groupby(["relation_id", "tail_id"]):
        tags[f"fb.{rel.rsplit('.', 1)[-1]}:{tail}"] = np.unique(grp["item"].to_numpy(np.int64))

    rng = np.random.default_rng([int(seed), 100])
    n_items, n_users = len(item_ids), len(user_ids)
    is_source = np.zeros(n_items, bool)
    is_source[rng.permutation(n_items)[:int(round(source_item_frac * n_items))]] = True
    reserved = np.sort(rng.permutation(n_users)[:int(round(reserved_user_frac * n_users))])
    src = is_source[i]
    tags = {k: v[~is_source[v]] for k, v in tags.items()}
    return RawData(
        name="ml100k", user_ids=user_ids, item_ids=item_ids,
        source_users=u[src], source_items=i[src], target_users=u[~src], target_items=i[~src],
        tags=tags, reserved_users=reserved,
        stats={"n_ratings": int(len(inter)), "n_interactions": int(key.shape[0]),
               "n_source_items": int(is_source.sum()), "n_reserved_users": int(reserved.shape[0]),
               "n_candidate_tags": len(tags)})


# ---------------------------------------------------------------------------------------------
# ML-20M (raw GroupLens CSVs)
# ---------------------------------------------------------------------------------------------

ML20M_FILES = {
    "ratings.csv": ("userId", "movieId", "rating", "timestamp"),
    "movies.csv": ("movieId", "title", "genres"),
    "genome-tags.csv": ("tagId", "tag"),
    "genome-scores.csv": ("movieId", "tagId", "relevance"),
}


def load_ml20m(data_dir: str, *, relevance: float = 0.8, **_unused) -> RawData:
    """Genome tags with relevance > ``relevance`` as scenarios, untagged movies as source domain."""
    path = require_files(data_dir, "ml20m", ML20M_FILES)
    movies = read_table(path["movies.csv"], ["movieId", "title", "genres"],
                        {"movieId": np.int64, "title": str, "genres": str})
    tags_df = read_table(path["genome-tags.csv"], ["tagId", "tag"], {"tagId": np.int64, "tag": str})
    scores = read_table(path["genome-scores.csv"], ["movieId", "tagId", "relevance"],
                        {"movieId": np.int32, "tagId": np.int32, "relevance": np.float32},
                        chunk_filter=lambda c: c[c["relevance"].to_numpy() > relevance][["movieId", "tagId"]],
                        strict_fields=True)
    # Ratings dominate memory (20M rows): only the two id columns, as int32.
    ratings = read_table(path["ratings.csv"], ["userId", "movieId", "rating"],
                         {"userId": np.int32, "movieId": np.int32, "rating": np.float32}, strict_fields=True)

    user_ids = np.unique(ratings["userId"].to_numpy()).astype(np.int64)
    item_ids = np.unique(np.concatenate([movies["movieId"].to_numpy(np.int64),
                                         ratings["movieId"].to_numpy(np.int64)]))
    u = np.searchsorted(user_ids, ratings["userId"].to_numpy()).astype(np.int64)
    i = np.searchsorted(item_ids, ratings["movieId"].to_numpy()).astype(np.int64)
    n_ratings = len(ratings)
    del ratings
    key = np.unique(u * len(item_ids) + i)
    u, i = key // len(item_ids), key % len(item_ids)

    scores = scores[np.isin(scores["movieId"].to_numpy(), item_ids)]
    s_item = np.searchsorted(item_ids, scores["movieId"].to_numpy().astype(np.int64))
    tag_name = dict(zip(tags_df["tagId"].to_numpy(), tags_df["tag"].astype(str).to_numpy()))
    tags: dict[str, np.ndarray] = {}
    tag_col = scores["tagId"].to_numpy()
    order = np.argsort(tag_col, kind="stable")
    bounds = np.flatnonzero(np.diff(tag_col[order])) + 1
    for grp in np.split(order, bounds) if order.size else []:
        tid = int(tag_col[grp[0]])
        tags[tag_name.get(tid, f"tag{tid}")] = np.unique(s_item[grp])
    if not tags:
        raise EmptyDataError(f"{path['genome-scores.csv']}: no (movie, tag) pair has relevance > {relevance} "
                             f"for a movie in {path['movies.csv']} or {path['ratings.csv']}: no scenario can be built")
    tagged = np.zeros(len(item_ids), bool)
    if s_item.size:
        tagged[s_item] = True
    src = ~tagged[i]
    n_no_genre = int((movies["genres"] == "(no genres listed)").sum())
    return RawData(
        name="ml20m", user_ids=user_ids, item_ids=item_ids,
        source_users=u[src], source_items=i[src], target_users=u[~src], target_items=i[~src], tags=tags,
        stats={"n_ratings": n_ratings, "n_interactions": int(key.shape[0]), "n_movies": int(len(movies)),
               "n_movies_no_genres": n_no_genre, "n_tagged_movies": int(tagged.sum()),
               "n_source_items": int((~tagged).sum()), "n_candidate_tags": len(tags)})
