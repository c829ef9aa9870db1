"""Taobao Cloud Theme: themes as scenarios, the purchase log as source, given embeddings."""
from __future__ import annotations

import logging
import os
import warnings

import numpy as np
import pandas as pd

from ._io import read_table, require_file, require_files
from .errors import DataFormatError, EmptyDataError
from .scenarios import RawData

log = logging.getLogger(__name__)

FILES = {
    "theme_click_log.csv": ("user_id", "theme_id", "item_id", "leaf_cate_id", "cate_level1_id", "clk_cnt",
                            "reach_time"),
    "theme_item_pool.csv": ("theme_id", "item_id"),
    "user_item_purchase_log.csv": ("user_id", "item_id"),
    "user_embedding.csv": ("user_id", "emb (space-separated floats)"),
    "item_embedding.csv": ("item_id", "emb (space-separated floats)"),
}


def read_embedding_file(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [n], vectors float32 [n, d]) from 'id,f1 f2 ... fd' lines, header optional."""
    require_file(path, FILES[os.path.basename(path)])
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        first = fh.readline()
    head = first.rstrip("\r\n").split(",")
    has_header = len(head) >= 2 and not _is_number(head[0].strip())
    df = read_table(path, ["id", "emb"], {"id": np.int64, "emb": str}, header=False, names=["id", "emb"],
                    strict_fields=True) \
        if not has_header else _read_with_header(path)
    emb = df["emb"].astype(str).str.strip()
    counts = emb.str.count(r"\s+").to_numpy() + 1
    if counts.size == 0:
        raise DataFormatError(f"{path}: no embedding rows")
    d = int(counts[0])
    bad = np.flatnonzero(counts != d)
    if bad.size:
        raise DataFormatError(f"{path}: line {int(bad[0]) + 1 + has_header}: {counts[bad[0]]} values, "
                              f"the first row has {d}")
    with warnings.catch_warnings():
        # A non-numeric token makes fromstring stop early (with a warning); the size check reports it.
        warnings.simplefilter("ignore")
        try:
            flat = np.fromstring(" ".join(emb.tolist()), dtype=np.float32, sep=" ")
        except ValueError:
            flat = np.zeros(0, np.float32)
    if flat.size != d * len(emb) or not np.isfinite(flat).all():
        row = _first_unparsable(emb)
        raise DataFormatError(f"{path}: line {row + 1 + has_header}: embedding is not {d} finite numbers")
    return df["id"].to_numpy(np.int64), flat.reshape(len(emb), d)


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _read_with_header(path: str) -> pd.DataFrame:
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        cols = [c.strip() for c in fh.readline().rstrip("\r\n").split(",")]
    df = read_table(path, cols[:2], {cols[0]: np.int64, cols[1]: str}, strict_fields=True)
    return df.rename(columns={cols[0]: "id", cols[1]: "emb"})


def _first_unparsable(emb: pd.Series) -> int:
    for k, s in enumerate(emb.tolist()):
        try:
            if not np.isfinite(np.array(s.split(), dtype=np.float64)).all():
                return k
        except ValueError:
            return k
    return 0


def load_taobao(data_dir: str, **_unused) -> RawData:
    """Every click is a positive of its theme; clicks on items outside the theme's pool are dropped."""
    p = require_files(data_dir, "taobao", FILES)
    clicks = read_table(p["theme_click_log.csv"], ["user_id", "theme_id", "item_id"],
                        {"user_id": np.int64, "theme_id": np.int64, "item_id": np.int64}, strict_fields=True)
    pool = read_table(p["theme_item_pool.csv"], ["theme_id", "item_id"], {"theme_id": np.int64, "item_id": np.int64},
                      strict_fields=True)
    buys = read_table(p["user_item_purchase_log.csv"], ["user_id", "item_id"], {"user_id": np.int64, "item_id": np.int64},
                      strict_fields=True)
    uid_e, uvec = read_embedding_file(p["user_embedding.csv"])
    iid_e, ivec = read_embedding_file(p["item_embedding.csv"])
    if uvec.shape[1] != ivec.shape[1]:
        raise DataFormatError(f"taobao: {p['user_embedding.csv']} has {uvec.shape[1]}-dim embeddings, "
                              f"{p['item_embedding.csv']} {ivec.shape[1]}-dim ones; they must match")

    user_ids = np.unique(np.concatenate([clicks["user_id"].to_numpy(), buys["user_id"].to_numpy()]))
    item_ids = np.unique(np.concatenate([clicks["item_id"].to_numpy(), buys["item_id"].to_numpy(),
                                         pool["item_id"].to_numpy()]))

    def embed(ids, eids, vecs):
        out = np.zeros((len(ids), vecs.shape[1]), np.float32)
        pos = np.searchsorted(ids, eids)
        ok = (pos < len(ids)) & (ids[np.minimum(pos, len(ids) - 1)] == eids)
        out[pos[ok]] = vecs[ok]
        mask = np.zeros(len(ids), bool)
        mask[pos[ok]] = True
        return out, mask

    U, umask = embed(user_ids, uid_e, uvec)
    V, imask = embed(item_ids, iid_e, ivec)

    n_items = len(item_ids)
    cu = np.searchsorted(user_ids, clicks["user_id"].to_numpy())
    ci = np.searchsorted(item_ids, clicks["item_id"].to_numpy())
    theme = clicks["theme_id"].to_numpy()
    pool_key = np.unique(pool["theme_id"].to_numpy() * np.int64(n_items)
                         + np.searchsorted(item_ids, pool["item_id"].to_numpy()))
    in_pool = np.isin(theme * np.int64(n_items) + ci, pool_key)
    n_outside = int((~in_pool).sum())
    if n_outside:
        log.info("taobao: %d clicks on items outside their theme's item pool dropped", n_outside)
    if n_outside == len(clicks):
        raise EmptyDataError(f"{p['theme_click_log.csv']}: none of its {len(clicks)} clicks is on an item of the "
                             f"click's theme in {p['theme_item_pool.csv']}: no scenario can be built")
    cu, ci, theme = cu[in_pool], ci[in_pool], theme[in_pool]
    order = np.argsort(theme, kind="stable")
    bounds = np.flatnonzero(np.diff(theme[order])) + 1
    explicit = {}
    for grp in (np.split(order, bounds) if order.size else []):
        explicit[f"theme:{int(theme[grp[0]])}"] = (cu[grp].astype(np.int64), ci[grp].astype(np.int64))
    bu = np.searchsorted(user_ids, buys["user_id"].to_numpy()).astype(np.int64)
    bi = np.searchsorted(item_ids, buys["item_id"].to_numpy()).astype(np.int64)
    return RawData(
        name="taobao", user_ids=user_ids, item_ids=item_ids, source_users=bu, source_items=bi,
        explicit=explicit, given_user_emb=U, given_item_emb=V, given_user_mask=umask, given_item_mask=imask,
        stats={"n_clicks": int(len(clicks)), "n_clicks_outside_pool": n_outside, "n_purchases": int(len(buys)),
               "n_interactions": int(len(clicks)), "n_themes": int(len(explicit)),
               "n_users_without_embedding": int((~umask).sum()), "n_items_without_embedding": int((~imask).sum())})
