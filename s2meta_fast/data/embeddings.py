"""Frozen user/item embeddings by matrix factorisation (BPR) in torch, cached on disk.

BPR rather than weighted MF because every interaction is an implicit positive and the
recommender downstream is trained with a pairwise hinge loss on (positive, negative) items:
the embedding geometry then already separates liked from random items.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

import numpy as np
import torch
from tqdm.auto import tqdm

from . import cache
from .errors import EmptyDataError
from ..fileio import atomic_write

log = logging.getLogger(__name__)

MF_VERSION = 1


def default_cache_dir() -> str:
    return os.environ.get("S2META_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "s2meta_fast")


def _fingerprint(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int, params: dict) -> str:
    h = hashlib.sha1()
    h.update(json.dumps({"v": MF_VERSION, "n_users": n_users, "n_items": n_items, **params}, sort_keys=True).encode())
    h.update(np.ascontiguousarray(users, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(items, dtype=np.int64).tobytes())
    return h.hexdigest()[:20]


def train_bpr(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int, *, dim: int = 64,
              epochs: int = 30, lr: float = 0.01, reg: float = 1e-4, batch_size: int = 2048, seed: int = 0,
              progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """BPR-MF on positive pairs; negatives uniform over the items present in the pairs.

    Returns float32 arrays [n_users, dim], [n_items, dim]; rows of ids absent from the pairs are zero.
    """
    # Each step is a few thousand rows x dim: too small for intra-op threads, which on a shared
    # machine spin against other processes (measured 55x slower with 2 threads under load).
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_bpr(users, items, n_users, n_items, dim=dim, epochs=epochs, lr=lr, reg=reg,
                          batch_size=batch_size, seed=seed, progress=progress)
    finally:
        torch.set_num_threads(prev)


def _train_bpr(users, items, n_users, n_items, *, dim, epochs, lr, reg, batch_size, seed, progress):
    users = torch.from_numpy(np.ascontiguousarray(users, dtype=np.int64))
    items = torch.from_numpy(np.ascontiguousarray(items, dtype=np.int64))
    gen = torch.Generator().manual_seed(int(seed))
    ue = torch.nn.Embedding(n_users, dim, sparse=True)
    ie = torch.nn.Embedding(n_items, dim, sparse=True)
    with torch.no_grad():
        ue.weight.normal_(0.0, 0.1, generator=gen)
        ie.weight.normal_(0.0, 0.1, generator=gen)
    opt = torch.optim.SparseAdam(list(ue.parameters()) + list(ie.parameters()), lr=lr)
    item_pool = torch.unique(items)
    n = users.shape[0]
    steps = max(1, (n + batch_size - 1) // batch_size)
    bar = tqdm(total=epochs * steps, desc="MF embeddings (BPR)", disable=not progress, leave=False, unit="batch")
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for k in range(steps):
            idx = perm[k * batch_size:(k + 1) * batch_size]
            u, i = users[idx], items[idx]
            j = item_pool[torch.randint(item_pool.shape[0], (idx.shape[0],), generator=gen)]
            eu, ei, ej = ue(u), ie(i), ie(j)
            x = (eu * (ei - ej)).sum(-1)
            loss = torch.nn.functional.softplus(-x).mean() + reg * (eu.square().sum() + ei.square().sum()
                                                                    + ej.square().sum()) / idx.shape[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    U = ue.weight.detach().numpy().astype(np.float32)
    V = ie.weight.detach().numpy().astype(np.float32)
    seen_u = np.zeros(n_users, bool)
    seen_u[users.numpy()] = True
    seen_i = np.zeros(n_items, bool)
    seen_i[items.numpy()] = True
    U[~seen_u] = 0.0
    V[~seen_i] = 0.0
    return U, V


def mf_embeddings(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int, *, dataset: str,
                  cache_dir: str | None, use_cache: bool = True, progress: bool = True,
                  **params) -> tuple[np.ndarray, np.ndarray]:
    """train_bpr behind a disk cache keyed by the dataset, the training pairs and every parameter."""
    key = _fingerprint(users, items, n_users, n_items, params)
    root = cache_dir or default_cache_dir()
    path = os.path.join(root, "embeddings", f"{dataset}-bpr-{key}.npz")
    use_cache = cache.usable(root, use_cache)
    dim = params.get("dim", 64)

    def read(entry: str) -> tuple[np.ndarray, np.ndarray]:
        with np.load(entry, allow_pickle=False) as z:
            U, V = z["user_emb"], z["item_emb"]
        if U.shape != (n_users, dim) or V.shape != (n_items, dim):
            raise ValueError(f"shapes {U.shape}, {V.shape}, expected {(n_users, dim)}, {(n_items, dim)}")
        return U, V

    cached = cache.read_entry(path, read, "embeddings") if use_cache else None
    if cached is not None:
        log.info("embeddings: loaded from cache %s", path)
        return cached
    if users.size == 0:
        raise EmptyDataError(f"{dataset}: no interaction is left to train the embeddings on (the source domain "
                             f"and the scenario-only users' interactions are empty)")
    U, V = train_bpr(users, items, n_users, n_items, progress=progress, **params)
    if use_cache:
        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, user_emb=U, item_emb=V)
        cache.write_entry(path, lambda p: atomic_write(p, write), "embeddings")
    return U, V
