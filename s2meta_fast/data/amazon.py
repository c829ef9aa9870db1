"""Amazon Review 2014: ratings_<Category>.csv + meta_<Category>.json.gz, leaf categories as scenarios."""
from __future__ import annotations

import ast
import glob
import gzip
import json
import logging
import os
import re
import warnings
import zlib

import numpy as np
import pandas as pd

from ._io import read_table, require_dir
from .errors import DataFileError, DataFormatError, EmptyDataError
from .scenarios import RawData, unique_pairs

log = logging.getLogger(__name__)

RATING_COLUMNS = ("user", "item", "rating", "timestamp")
META_KEYS = ("asin", "categories")
FILES = {"ratings_<Category>.csv": RATING_COLUMNS + ("(no header)",),
         "meta_<Category>.json.gz": ("one Python dict literal per line with keys", *META_KEYS)}

# The paper's Table 5. Names are matched after normalisation, so "Clothing, Shoes & Jewelry",
# "Clothing, Shoes and Jewelry" and the file stem "Clothing_Shoes_and_Jewelry" are the same.
TABLE5_SPLIT = {
    "source": ["Books", "Electronics", "Movies and TV", "Clothing, Shoes and Jewelry", "Home and Kitchen",
               "Sports and Outdoors", "Health and Personal Care", "Toys and Games", "Apps for Android",
               "Grocery and Gourmet Food"],
    "train": ["Beauty", "CDs and Vinyl", "Kindle Store", "Tools and Home Improvement", "Pet Supplies"],
    "test": ["Digital Music", "Musical Instruments", "Video Games", "Cell Phones and Accessories", "Baby",
             "Automotive", "Office Products", "Amazon Instant Video", "Patio, Lawn and Garden"],
}
_GROUPS = ("source", "train", "valid", "test")


def normalise_category(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower().replace("&", "and"))


# What literal_eval raises on text that is no literal: bad syntax, an unhashable key, nesting
# deeper than the parser's stack.
_LITERAL_ERRORS = (ValueError, SyntaxError, TypeError, MemoryError, RecursionError)


_ASIN = re.compile(r"""['"]asin['"]\s*:\s*['"]([^'"]+)['"]""")
_CATS = re.compile(r"""['"]categories['"]\s*:\s*(\[\[.*?\]\])""")


def _parse_meta_line(line: str, path: str, lineno: int):
    """(asin, categories) from one metadata line; the regex fast path avoids evaluating the whole
    dict (titles, descriptions, related lists) on multi-million-line files."""
    m_a, m_c = _ASIN.search(line), _CATS.search(line)
    if m_a is not None and m_c is not None:
        try:
            cats = ast.literal_eval(m_c.group(1))
            if isinstance(cats, list) and all(isinstance(p, list) for p in cats):
                return m_a.group(1), cats
        except _LITERAL_ERRORS:
            pass
    try:
        obj = ast.literal_eval(line)
    except _LITERAL_ERRORS:
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            raise DataFormatError(f"{path}: line {lineno}: not a Python dict literal") from None
    if not isinstance(obj, dict) or "asin" not in obj:
        raise DataFormatError(f"{path}: line {lineno}: expected a dict with an 'asin' key")
    cats = obj.get("categories", [])
    if not isinstance(cats, list) or not all(isinstance(p, (list, tuple)) for p in cats):
        raise DataFormatError(f"{path}: line {lineno}: 'categories' must be a list of category paths")
    return str(obj["asin"]), [list(p) for p in cats]


def read_meta(path: str) -> dict[str, list[list[str]]]:
    out: dict[str, list[list[str]]] = {}
    opener = gzip.open if path.endswith(".gz") else open
    try:
        # The free text (titles, descriptions) holds backslashes that Python reads as invalid
        # escapes: literal_eval returns the right value but warns (DeprecationWarning, from 3.12
        # SyntaxWarning), which a loader must not print on a user's terminal. Once per file, not
        # per line: the filter swap would cost a sixth of a line's parse.
        with opener(path, "rt", encoding="utf-8") as fh, warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            for lineno, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                asin, cats = _parse_meta_line(line, path, lineno)
                out.setdefault(asin, []).extend([str(c) for c in p] for p in cats if len(p) > 0)
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
        raise DataFormatError(f"{path}: cannot read: {exc}") from None
    return out


def load_amazon(data_dir: str, *, categories: dict[str, list[str]] | None = None, min_rating: float = 3.0,
                **_unused) -> RawData:
    """Positives: rating >= min_rating. Scenario = category path ending in a leaf, named by the path.

    An item listed under any source first-order category is a source item (all its interactions are
    source domain, none is a scenario interaction). Other items join the scenario of each of their
    category paths whose first-order category is in train/valid/test; unknown first-order
    categories are ignored (counted).
    """
    if data_dir is None:
        raise DataFileError("amazon needs data_dir= a folder holding "
                            + "; ".join(f"{f} ({', '.join(c)})" for f, c in FILES.items()))
    folder = require_dir(data_dir, "amazon", FILES)
    split = categories if categories is not None else TABLE5_SPLIT
    bad = set(split) - set(_GROUPS)
    if bad:
        raise ValueError(f"amazon categories: unknown group(s) {sorted(bad)}; valid: {', '.join(_GROUPS)}")
    group_of = {normalise_category(c): g for g, cs in split.items() for c in cs}

    rating_files = sorted(glob.glob(os.path.join(folder, "ratings_*.csv")))
    if not rating_files:
        raise DataFileError(f"amazon: no ratings_<Category>.csv in {folder!r}; each must have the columns "
                            f"{', '.join(RATING_COLUMNS)} (no header), next to meta_<Category>.json.gz")
    frames, meta = [], {}
    n_ratings = 0
    for rf in rating_files:
        cat = os.path.basename(rf)[len("ratings_"):-len(".csv")]
        mf = os.path.join(folder, f"meta_{cat}.json.gz")
        if not os.path.isfile(mf):
            raise DataFileError(f"amazon: missing file {mf!r} (for {os.path.basename(rf)}): one Python dict literal "
                                f"per line with keys {', '.join(META_KEYS)}")
        df = read_table(rf, ["user", "item", "rating"], {"user": str, "item": str, "rating": np.float32},
                        header=False, names=RATING_COLUMNS, strict_fields=True)
        n_ratings += len(df)
        frames.append(df[df["rating"].to_numpy() >= min_rating][["user", "item"]])
        for asin, cats in read_meta(mf).items():
            meta.setdefault(asin, []).extend(cats)
    pos = pd.concat(frames, ignore_index=True)
    n_positive = len(pos)
    names = ", ".join(os.path.basename(f) for f in rating_files)
    if n_positive == 0:
        raise EmptyDataError(f"amazon: no rating >= min_rating={min_rating} in {names} ({folder}): "
                             f"no interaction is left")
    has_meta = pos["item"].isin(meta.keys()).to_numpy()
    pos = pos[has_meta]
    if len(pos) == 0:
        raise EmptyDataError(f"amazon: none of the {n_positive} positive ratings in {names} ({folder}) is of an "
                             f"item listed in its meta_<Category>.json.gz: no interaction is left")

    user_ids, u = np.unique(pos["user"].to_numpy(), return_inverse=True)
    item_ids, i = np.unique(pos["item"].to_numpy(), return_inverse=True)
    u, i = unique_pairs(u.reshape(-1), i.reshape(-1), len(item_ids))

    is_source = np.zeros(len(item_ids), bool)
    members: dict[str, list[int]] = {}
    groups: dict[str, str] = {}
    ignored: set[str] = set()
    for k, asin in enumerate(item_ids):
        paths = meta[asin]
        if any(group_of.get(normalise_category(p[0])) == "source" for p in paths):
            is_source[k] = True
            continue
        for p in paths:
            g = group_of.get(normalise_category(p[0]))
            if g is None:
                ignored.add(p[0])
                continue
            name = " > ".join(p)
            members.setdefault(name, []).append(k)
            groups[name] = g
    if ignored:
        log.info("amazon: %d first-order categories in no split group were ignored: %s", len(ignored),
                 ", ".join(sorted(ignored)[:10]))
    src = is_source[i]
    return RawData(
        name="amazon", user_ids=user_ids, item_ids=item_ids, source_users=u[src], source_items=i[src],
        target_users=u[~src], target_items=i[~src],
        tags={k: np.asarray(v, np.int64) for k, v in members.items()}, groups=groups,
        stats={"n_ratings": n_ratings, "n_positive": n_positive, "n_low_ratings_dropped": n_ratings - n_positive,
               "n_without_meta_dropped": int((~has_meta).sum()), "n_interactions": int(u.shape[0]),
               "n_source_items": int(is_source.sum()), "n_candidate_tags": len(members),
               "n_ignored_categories": len(ignored)})
