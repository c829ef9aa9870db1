"""Datasets by name: ``prepare(name, data_dir, ...) -> PreparedData``, cached on disk."""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable

from . import amazon, cache, movielens, planted, taobao
from .embeddings import default_cache_dir
from .errors import UnknownDatasetError
from .prepared import PreparedData, load_prepared, save_prepared
from .scenarios import QUERY_SIZE, RawData, build

log = logging.getLogger(__name__)

DATA_VERSION = 3   # bump when a loader or the builder changes what it produces


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    loader: Callable[..., RawData]
    description: str
    files: dict
    min_items: int
    max_items: int
    mf_epochs: int = 20
    dedupe_jaccard: float | None = None
    options: dict = field(default_factory=dict)    # loader keyword -> default


DATASETS: dict[str, DatasetSpec] = {
    "ml100k": DatasetSpec(
        "ml100k", movielens.load_ml100k,
        "real MovieLens-100K from the recbole package; genres + Freebase entities as scenarios",
        movielens.ML100K_FILES, min_items=30, max_items=400, mf_epochs=40, dedupe_jaccard=0.7,
        options={"relations": movielens.ML100K_RELATIONS, "source_item_frac": 0.3, "reserved_user_frac": 0.25}),
    "ml20m": DatasetSpec(
        "ml20m", movielens.load_ml20m, "MovieLens-20M; genome tags (relevance > 0.8) as scenarios",
        movielens.ML20M_FILES, min_items=100, max_items=1000, mf_epochs=10, options={"relevance": 0.8}),
    "amazon": DatasetSpec(
        "amazon", amazon.load_amazon, "Amazon Review 2014; leaf categories as scenarios, split by Table 5",
        amazon.FILES, min_items=100, max_items=1000, mf_epochs=10,
        options={"categories": None, "min_rating": 3.0}),
    "taobao": DatasetSpec(
        "taobao", taobao.load_taobao, "Taobao Cloud Theme; themes as scenarios, given embeddings",
        taobao.FILES, min_items=100, max_items=1000),
}
_PLANTED_SCENARIOS = inspect.signature(planted.load_planted).parameters["n_scenarios"].default
for _name, _options in planted.BENCHMARKS.items():
    DATASETS[_name] = DatasetSpec(
        _name, planted.load_planted,
        f"generated: scenario-specific preferences planted at strength {_options['strength']:g}, "
        f"{_options.get('n_scenarios', _PLANTED_SCENARIOS)} scenarios (no files)",
        {}, min_items=30, max_items=400, mf_epochs=20, options={**_options, "taste": "scenario_users"})


def available_datasets() -> list[str]:
    return sorted(DATASETS)


def get_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise UnknownDatasetError(f"unknown dataset {name!r}; valid: {', '.join(available_datasets())}") from None


def _fingerprint_dir(folder: str | None) -> list:
    if folder is None:
        return []
    out = []
    for f in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        st = os.stat(os.path.join(folder, f))
        out.append([f, st.st_size, st.st_mtime_ns])
    return out


def prepare(name: str = "ml100k", data_dir: str | os.PathLike | None = None, *, min_items: int | None = None,
            max_items: int | None = None, seed: int = 0, embed_dim: int = 64, cache_dir: str | None = None,
            use_cache: bool = True, min_eval: int = QUERY_SIZE, valid_frac: float = 0.1, test_frac: float = 0.2,
            mf_epochs: int | None = None, mf_lr: float = 0.01, mf_reg: float = 1e-4, mf_batch_size: int = 2048,
            dedupe_jaccard: float | None = None, heldout_user_frac: float = 0.45, progress: bool = True,
            **options) -> PreparedData:
    """Raw files -> scenarios split into train/valid/test plus frozen embeddings.

    Defaults that depend on the dataset (None here) come from ``DATASETS[name]``; ``options``
    are the dataset's own loader keywords (``DATASETS[name].options``). The result is cached in
    ``cache_dir`` (default ``$S2META_CACHE`` or ``~/.cache/s2meta_fast``) under a key of every
    parameter and the data files' names, sizes and mtimes; ``use_cache=False`` bypasses it.

    dedupe_jaccard: drop a scenario whose item set has at least this Jaccard similarity with a larger
    kept one (ml100k default 0.7; a value above 1 disables it). heldout_user_frac: the share of
    shared users whose interactions form meta-valid / meta-test scenarios (divided as
    valid_frac : test_frac), the rest forming meta-train ones; 0 keeps every user in every split,
    the paper's protocol (see docs/data.md).
    """
    spec = get_spec(name)
    unknown = set(options) - set(spec.options)
    if unknown:
        raise TypeError(f"prepare({name!r}): unknown option(s) {', '.join(sorted(unknown))}; valid for {name}: "
                        f"{', '.join(sorted(spec.options)) or '(none)'}")
    loader_kw = {**spec.options, **options}
    if "seed" in inspect.signature(spec.loader).parameters:
        loader_kw["seed"] = seed
    if name == "ml100k" and data_dir is None:
        data_dir = movielens.recbole_ml100k_dir()
    data_dir = os.path.abspath(os.fspath(data_dir)) if data_dir is not None else None
    params = {
        "name": name, "data_dir": data_dir, "min_items": spec.min_items if min_items is None else int(min_items),
        "max_items": spec.max_items if max_items is None else int(max_items), "seed": int(seed),
        "embed_dim": int(embed_dim), "min_eval": int(min_eval), "valid_frac": float(valid_frac),
        "test_frac": float(test_frac),
        "dedupe_jaccard": spec.dedupe_jaccard if dedupe_jaccard is None else float(dedupe_jaccard),
        "heldout_user_frac": float(heldout_user_frac),
        "mf": {"epochs": spec.mf_epochs if mf_epochs is None else int(mf_epochs), "lr": float(mf_lr),
               "reg": float(mf_reg), "batch_size": int(mf_batch_size)},
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in loader_kw.items()},
    }
    if params["min_items"] > params["max_items"]:
        raise ValueError(f"min_items ({params['min_items']}) > max_items ({params['max_items']})")
    cache_root = cache_dir or default_cache_dir()
    use_cache = cache.usable(cache_root, use_cache)
    key = hashlib.sha1(json.dumps({"v": DATA_VERSION, "p": params, "files": _fingerprint_dir(data_dir)},
                                  sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = os.path.join(cache_root, "prepared", f"{name}-{key}.npz")
    t0 = time.perf_counter()
    data = cache.read_entry(path, load_prepared, "prepared-data") if use_cache else None
    if data is not None:
        log.info("%s: prepared data loaded from cache %s (%.2fs)", name, path, time.perf_counter() - t0)
        return data
    t0 = time.perf_counter()
    raw = spec.loader(data_dir, **loader_kw)
    raw.source = raw.source or (data_dir or "")
    log.info("%s: raw files read (%.2fs): %s", name, time.perf_counter() - t0,
             ", ".join(f"{k}={v}" for k, v in raw.stats.items()))
    data = build(raw, min_items=params["min_items"], max_items=params["max_items"], min_eval=params["min_eval"],
                 seed=params["seed"], embed_dim=params["embed_dim"], valid_frac=params["valid_frac"],
                 test_frac=params["test_frac"], dedupe_jaccard=params["dedupe_jaccard"],
                 heldout_user_frac=params["heldout_user_frac"], mf=params["mf"],
                 cache_dir=cache_root, use_cache=use_cache, progress=progress)
    if raw.given_user_emb is None and embed_dim != data.embed_dim:
        raise AssertionError("embedding size mismatch")
    data.params = params
    log.info("%s: prepared in %.2fs\n%s", name, time.perf_counter() - t0, data.summary())
    if use_cache:
        cache.write_entry(path, lambda p: save_prepared(data, p), "prepared-data")
    return data
