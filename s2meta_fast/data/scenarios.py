"""From a loader's raw interactions to filtered scenarios, embeddings and a meta split.

Appendix A.4 roles, applied identically to every dataset (plus user-disjoint meta-splits, see
``_disjoint_users``):
  * shared users — users with source-domain interactions (and not reserved for embeddings);
    only their scenario interactions become scenario data (support + evaluation);
  * scenario-only users — everyone else (plus users a loader reserves); all their
    interactions join the source domain as matrix-factorisation training data, which is what
    gives scenario items an embedding without touching any evaluated interaction.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from .embeddings import mf_embeddings
from .errors import EmptyDataError
from .prepared import PreparedData, Scenario

log = logging.getLogger(__name__)

SUPPORT_SIZE = 64    # docs/spec.md §5/§6: |D_train|
QUERY_SIZE = 128     # docs/spec.md §5: query positives per training task


@dataclass
class RawData:
    """What a raw-format loader hands over. All ids are global ints (indices into *_ids)."""

    name: str
    user_ids: np.ndarray
    item_ids: np.ndarray
    source_users: np.ndarray
    source_items: np.ndarray
    # Tag-style scenarios: a scenario owns every target interaction on its items.
    target_users: np.ndarray | None = None
    target_items: np.ndarray | None = None
    tags: dict[str, np.ndarray] | None = None
    # Explicit scenarios (Taobao themes): the scenario's own interaction pairs.
    explicit: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
    groups: dict[str, str] = field(default_factory=dict)       # scenario -> "train"/"valid"/"test"
    reserved_users: np.ndarray | None = None                    # embedding-only users (ml100k)
    given_user_emb: np.ndarray | None = None
    given_item_emb: np.ndarray | None = None
    given_user_mask: np.ndarray | None = None
    given_item_mask: np.ndarray | None = None
    stats: dict = field(default_factory=dict)
    source: str = ""        # where the raw files are, for messages about what the filters left


def unique_pairs(users: np.ndarray, items: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    key = np.unique(users.astype(np.int64) * n_items + items.astype(np.int64))
    return key // n_items, key % n_items


def _csr_by_item(users: np.ndarray, items: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(items, kind="stable")
    indptr = np.zeros(n_items + 1, np.int64)
    np.cumsum(np.bincount(items, minlength=n_items), out=indptr[1:])
    return indptr, users[order]


def _gather(indptr: np.ndarray, vals: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenates vals[indptr[r]:indptr[r+1]] over rows, vectorised; returns (vals, row of each)."""
    starts, lens = indptr[rows], indptr[rows + 1] - indptr[rows]
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rep_rows = np.repeat(rows, lens)
    offs = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)
    return vals[np.repeat(starts, lens) + offs], rep_rows


def _dedupe_by_jaccard(scens: list[Scenario], threshold: float, n_items: int) -> tuple[list[Scenario], int]:
    """Drops a scenario whose item set overlaps a larger kept one with Jaccard >= threshold.

    ML-100K carries two genre vocabularies (MovieLens' own and Freebase's) that name many of the
    same sets; near-duplicate tasks would leak between meta-train and meta-test.
    """
    if not scens or threshold is None or threshold > 1:
        return scens, 0
    order = sorted(range(len(scens)), key=lambda k: (-scens[k].n_items, scens[k].name))
    m = torch.zeros(len(scens), n_items)
    for row, k in enumerate(order):
        m[row, torch.from_numpy(scens[k].item_set)] = 1.0
    inter = m @ m.T
    size = m.sum(1)
    jac = inter / (size[:, None] + size[None, :] - inter).clamp_min(1)
    kept: list[int] = []
    for row in range(len(order)):
        if all(jac[row, r].item() < threshold for r in kept):
            kept.append(row)
    return [scens[order[r]] for r in sorted(kept, key=lambda r: scens[order[r]].name)], len(order) - len(kept)


def _disjoint_users(splits: dict[str, list[Scenario]], shared: np.ndarray, frac: float, valid_share: float,
                    seed: int, min_items: int, max_items: int, min_pairs: int):
    """Three disjoint groups of shared users: meta-train scenarios keep the interactions of one,
    meta-valid of another, meta-test of the third (``frac`` of the users are held out, divided
    between valid and test as ``valid_share``).

    Tag scenarios overlap (a movie has many tags), so without this the same (user, item) pair is a
    meta-train interaction and a meta-test evaluation positive: on ML-100K 98% of the meta-test
    positives were, which rewards memorising them rather than adapting to a new scenario. With
    disjoint users no pair is shared between splits, and no evaluated user has a scenario
    interaction anywhere in training (a candidate item is never a hidden training positive).
    """
    rng = np.random.default_rng([int(seed), 0xD15])
    users = rng.permutation(np.flatnonzero(shared))
    n_held = int(round(frac * users.shape[0]))
    n_valid = int(round(valid_share * n_held))
    group = np.full(shared.shape[0], -1, np.int8)
    group[users[n_held:]] = 0
    group[users[:n_valid]] = 1
    group[users[n_valid:n_held]] = 2
    code = {"train": 0, "valid": 1, "test": 2}
    out: dict[str, list[Scenario]] = {}
    dropped = 0
    for name, scs in splits.items():
        kept = []
        for s in scs:
            keep = group[s.users] == code[name]
            u, i = s.users[keep], s.items[keep]
            if min_items <= np.unique(i).shape[0] <= max_items and u.shape[0] >= min_pairs:
                kept.append(Scenario(s.name, u, i, s.group))
            else:
                dropped += 1
        out[name] = kept
    return out, group, dropped


def split_scenarios(scens: list[Scenario], groups: dict[str, str], *, valid_frac: float, test_frac: float,
                    seed: int) -> dict[str, list[Scenario]]:
    """Seeded, disjoint train/valid/test split; loader-given groups (Amazon) take precedence."""
    rng = np.random.default_rng([int(seed), 0x5EED])
    out: dict[str, list[Scenario]] = {"train": [], "valid": [], "test": []}
    if groups:
        for s in scens:
            g = groups.get(s.name)
            if g in out:
                out[g].append(s)
        if not any(groups.get(s.name) == "valid" for s in scens) and out["train"]:
            # No group names a validation set (Table 5 has none): carve it from meta-train.
            n_valid = int(round(valid_frac * len(out["train"])))
            n_valid = min(max(n_valid, 1 if valid_frac > 0 else 0), len(out["train"]) - 1)
            perm = rng.permutation(len(out["train"]))
            pick = set(perm[:n_valid].tolist())
            out["valid"] = [s for k, s in enumerate(out["train"]) if k in pick]
            out["train"] = [s for k, s in enumerate(out["train"]) if k not in pick]
    else:
        n = len(scens)
        n_test = int(round(test_frac * n))
        n_valid = int(round(valid_frac * n))
        perm = rng.permutation(n)
        out["test"] = [scens[k] for k in perm[:n_test]]
        out["valid"] = [scens[k] for k in perm[n_test:n_test + n_valid]]
        out["train"] = [scens[k] for k in perm[n_test + n_valid:]]
    for k in out:
        out[k].sort(key=lambda s: s.name)
    return out


def build(raw: RawData, *, min_items: int, max_items: int, min_eval: int = QUERY_SIZE, seed: int = 0,
          embed_dim: int = 64, valid_frac: float = 0.1, test_frac: float = 0.2,
          dedupe_jaccard: float | None = None, heldout_user_frac: float = 0.45, mf: dict | None = None,
          cache_dir: str | None = None, use_cache: bool = True, progress: bool = True) -> PreparedData:
    n_users, n_items = len(raw.user_ids), len(raw.item_ids)
    min_pairs = SUPPORT_SIZE + min_eval

    # --- roles and embeddings -------------------------------------------------------------
    if raw.given_user_emb is not None:
        user_has = raw.given_user_mask.astype(bool)
        item_has = raw.given_item_mask.astype(bool)
        U, V = raw.given_user_emb.astype(np.float32), raw.given_item_emb.astype(np.float32)
        if U.shape[1] != V.shape[1]:
            raise ValueError(f"{raw.name}: given user embeddings have {U.shape[1]} dims, item embeddings {V.shape[1]}")
        shared = user_has.copy()
        mf_u, mf_i = raw.source_users, raw.source_items
        method = "given"
    else:
        shared = np.zeros(n_users, bool)
        shared[raw.source_users] = True
        if raw.reserved_users is not None:
            shared[raw.reserved_users] = False
        if raw.explicit is not None:
            tu = np.concatenate([p[0] for p in raw.explicit.values()]) if raw.explicit else np.zeros(0, np.int64)
            ti = np.concatenate([p[1] for p in raw.explicit.values()]) if raw.explicit else np.zeros(0, np.int64)
        else:
            tu, ti = raw.target_users, raw.target_items
        extra = ~shared[tu]
        mf_u, mf_i = unique_pairs(np.concatenate([raw.source_users, tu[extra]]),
                                  np.concatenate([raw.source_items, ti[extra]]), n_items)
        params = dict(dim=embed_dim, seed=seed, **(mf or {}))
        U, V = mf_embeddings(mf_u, mf_i, n_users, n_items, dataset=raw.name, cache_dir=cache_dir,
                             use_cache=use_cache, progress=progress, **params)
        user_has = np.zeros(n_users, bool)
        user_has[mf_u] = True
        item_has = np.zeros(n_items, bool)
        item_has[mf_i] = True
        method = "bpr"
    shared &= user_has

    # --- candidate scenarios ----------------------------------------------------------------
    skipped = {"too_few_items": 0, "too_many_items": 0, "too_few_interactions": 0}
    dropped_pairs = 0
    scens: list[Scenario] = []

    def consider(name: str, users: np.ndarray, items: np.ndarray) -> None:
        n_it = int(np.unique(items).shape[0]) if items.size else 0
        if n_it < min_items:
            skipped["too_few_items"] += 1
        elif n_it > max_items:
            skipped["too_many_items"] += 1
        elif users.shape[0] < min_pairs:
            skipped["too_few_interactions"] += 1
        else:
            scens.append(Scenario(name, users.astype(np.int64), items.astype(np.int64), raw.groups.get(name, "")))

    if raw.explicit is not None:
        for name in sorted(raw.explicit):
            u, i = raw.explicit[name]
            u, i = unique_pairs(u, i, n_items)
            ok = shared[u] & item_has[i]
            dropped_pairs += int((~ok).sum())
            consider(name, u[ok], i[ok])
    else:
        tu, ti = raw.target_users, raw.target_items
        ok = shared[tu] & item_has[ti]
        # Items only shared users touched get no embedding (Appendix A.4): their pairs cannot be ranked.
        dropped_pairs += int((shared[tu] & ~item_has[ti]).sum())
        indptr, vals = _csr_by_item(tu[ok], ti[ok], n_items)
        has_pairs = np.diff(indptr) > 0
        for name in sorted(raw.tags):
            tag_items = np.unique(raw.tags[name])
            tag_items = tag_items[has_pairs[tag_items]]
            # Cheap pre-check so huge tags (ML-20M) are never materialised.
            if tag_items.shape[0] < min_items:
                skipped["too_few_items"] += 1
                continue
            if tag_items.shape[0] > max_items:
                skipped["too_many_items"] += 1
                continue
            u, i = _gather(indptr, vals, tag_items)
            consider(name, u, i)

    where = f"{raw.name} ({raw.source})" if raw.source else raw.name
    if not scens:
        n_candidates = sum(skipped.values())
        raise EmptyDataError(
            f"{where}: no scenario passes the filter: of {n_candidates} candidate scenarios, "
            f"{skipped['too_few_items']} have fewer than min_items={min_items} items, {skipped['too_many_items']} "
            f"more than max_items={max_items}, {skipped['too_few_interactions']} fewer than {min_pairs} "
            f"interactions ({SUPPORT_SIZE} support + {min_eval} evaluation); lower --min-items or raise --max-items")
    scens, n_dupes = _dedupe_by_jaccard(scens, dedupe_jaccard, n_items) if dedupe_jaccard else (scens, 0)
    total_skipped = sum(skipped.values())
    log.info("%s: %d scenarios pass the filter; %d skipped (%s) for items outside [%d, %d] or fewer than %d "
             "interactions (%d support + %d evaluation); %d near-duplicates dropped (Jaccard >= %s)",
             raw.name, len(scens), total_skipped, ", ".join(f"{k}={v}" for k, v in skipped.items()),
             min_items, max_items, min_pairs, SUPPORT_SIZE, min_eval, n_dupes, dedupe_jaccard)
    if dropped_pairs:
        log.info("%s: %d scenario interactions of shared users dropped: their item (or, for given "
                 "embeddings, user) has no embedding", raw.name, dropped_pairs)

    splits = split_scenarios(scens, raw.groups, valid_frac=valid_frac, test_frac=test_frac, seed=seed)
    group = np.zeros(n_users, np.int8)
    after_split = 0
    if heldout_user_frac and heldout_user_frac > 0:
        share = valid_frac / (valid_frac + test_frac) if valid_frac + test_frac > 0 else 0.0
        splits, group, after_split = _disjoint_users(splits, shared, heldout_user_frac, share, seed,
                                                     min_items, max_items, min_pairs)
        log.info("%s: shared users split %d / %d / %d for meta-train / meta-valid / meta-test scenarios "
                 "(heldout_user_frac=%s); %d scenarios fell below the thresholds after the user split "
                 "and were skipped", raw.name, int((group == 0).sum()), int((group == 1).sum()),
                 int((group == 2).sum()), heldout_user_frac, after_split)
    log.info("%s: %d meta-train, %d meta-valid, %d meta-test scenarios", raw.name, len(splits["train"]),
             len(splits["valid"]), len(splits["test"]))
    empty = [name for name in ("train", "test") if not splits[name]]
    if empty:
        held = (f"; holding out heldout_user_frac={heldout_user_frac} of the users left {after_split} scenarios "
                f"below the thresholds" if after_split else "")
        raise EmptyDataError(
            f"{where}: no meta-{' or meta-'.join(empty)} scenario: {len(scens)} scenarios pass the filter "
            f"(min_items={min_items}, max_items={max_items}, at least {min_pairs} interactions), split "
            f"{len(splits['train'])} / {len(splits['valid'])} / {len(splits['test'])} into meta-train / "
            f"meta-valid / meta-test{held}; lower --min-items or raise --max-items")
    stats = dict(raw.stats)
    stats.update({
        "n_users": n_users, "n_items": n_items,
        "n_shared_users": int(shared.sum()),
        "n_embedding_interactions": int(mf_u.shape[0]),
        "n_scenarios_kept": sum(len(v) for v in splits.values()),
        "n_scenarios_skipped": total_skipped + after_split, "n_skipped_after_user_split": after_split,
        "n_users_by_split": {k: int((group == c).sum()) if heldout_user_frac else int(shared.sum())
                             for k, c in (("train", 0), ("valid", 1), ("test", 2))},
        "scenarios_skipped": skipped, "n_near_duplicates_dropped": n_dupes,
        "n_scenario_pairs_dropped": dropped_pairs,
        "n_train": len(splits["train"]), "n_valid": len(splits["valid"]), "n_test": len(splits["test"]),
        "embedding_method": method,
    })
    return PreparedData(
        name=raw.name, user_emb=torch.from_numpy(np.ascontiguousarray(U)),
        item_emb=torch.from_numpy(np.ascontiguousarray(V)), train=splits["train"], valid=splits["valid"],
        test=splits["test"], user_ids=np.asarray(raw.user_ids), item_ids=np.asarray(raw.item_ids),
        user_has_emb=user_has, item_has_emb=item_has, source_users=np.asarray(mf_u, np.int64),
        source_items=np.asarray(mf_i, np.int64), stats=stats)
