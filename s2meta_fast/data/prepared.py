"""The data layer's products: scenarios and a prepared dataset, plus their on-disk form."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from ..fileio import atomic_write


@dataclass
class Scenario:
    """One scenario's positive interactions as parallel arrays of global ids (int64)."""

    name: str
    users: np.ndarray
    items: np.ndarray
    group: str = ""          # e.g. the Amazon first-order category; "" where none applies

    @property
    def n_interactions(self) -> int:
        return int(self.users.shape[0])

    @property
    def item_set(self) -> np.ndarray:
        return np.unique(self.items)

    @property
    def n_items(self) -> int:
        return int(np.unique(self.items).shape[0])

    @property
    def n_users(self) -> int:
        return int(np.unique(self.users).shape[0])

    def __repr__(self) -> str:
        return (f"Scenario({self.name!r}, interactions={self.n_interactions}, "
                f"items={self.n_items}, users={self.n_users})")


@dataclass
class PreparedData:
    """Frozen embeddings and the scenario split, everything downstream needs.

    user_emb / item_emb cover every user / item of the dataset (rows of entities that never
    got an embedding are zero and flagged False in user_has_emb / item_has_emb; no scenario
    ever refers to them). ``source_users`` / ``source_items`` are the interactions the
    embeddings were trained on: the source domain plus scenario-only users (Appendix A.4); for
    datasets with given embeddings, the source-domain log. Baselines may train on them freely:
    they contain no interaction of any scenario's shared users.
    """

    name: str
    user_emb: torch.Tensor
    item_emb: torch.Tensor
    train: list[Scenario]
    valid: list[Scenario]
    test: list[Scenario]
    user_ids: np.ndarray
    item_ids: np.ndarray
    user_has_emb: np.ndarray
    item_has_emb: np.ndarray
    source_users: np.ndarray
    source_items: np.ndarray
    stats: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return int(self.user_emb.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.item_emb.shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self.user_emb.shape[1])

    @property
    def splits(self) -> dict[str, list[Scenario]]:
        return {"train": self.train, "valid": self.valid, "test": self.test}

    def scenarios(self, split: str | None = None) -> list[Scenario]:
        if split is None:
            return self.train + self.valid + self.test
        try:
            return self.splits[split]
        except KeyError:
            raise ValueError(f"unknown split {split!r}; valid: train, valid, test") from None

    def summary(self) -> str:
        parts = [f"{self.name}: {self.stats.get('n_interactions', '?')} interactions, "
                 f"{self.n_users} users, {self.n_items} items, d={self.embed_dim}"]
        for k, sc in self.splits.items():
            if sc:
                ni = np.array([s.n_items for s in sc])
                nn = np.array([s.n_interactions for s in sc])
                parts.append(f"{k}: {len(sc)} scenarios, items {ni.min()}-{ni.max()} "
                             f"(median {int(np.median(ni))}), interactions {nn.min()}-{nn.max()} "
                             f"(median {int(np.median(nn))})")
            else:
                parts.append(f"{k}: 0 scenarios")
        return "\n".join(parts)


_SPLITS = ("train", "valid", "test")


def save_prepared(data: PreparedData, path: str) -> None:
    arrays: dict[str, np.ndarray] = {
        "user_emb": data.user_emb.numpy(), "item_emb": data.item_emb.numpy(),
        "user_has_emb": data.user_has_emb, "item_has_emb": data.item_has_emb,
        "source_users": data.source_users, "source_items": data.source_items,
        "user_ids": np.asarray(data.user_ids).astype(str), "item_ids": np.asarray(data.item_ids).astype(str),
    }
    meta = {"name": data.name, "stats": data.stats, "params": data.params, "splits": {}}
    for split in _SPLITS:
        scs = data.splits[split]
        meta["splits"][split] = [[s.name, s.group] for s in scs]
        lens = np.array([s.n_interactions for s in scs], dtype=np.int64)
        arrays[f"{split}_indptr"] = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        arrays[f"{split}_users"] = (np.concatenate([s.users for s in scs]) if scs else np.zeros(0, np.int64))
        arrays[f"{split}_items"] = (np.concatenate([s.items for s in scs]) if scs else np.zeros(0, np.int64))
    arrays["meta_json"] = np.array(json.dumps(meta))

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    atomic_write(path, write)


def _restore_ids(a: np.ndarray) -> np.ndarray:
    try:
        return a.astype(np.int64)
    except ValueError:
        return a


def load_prepared(path: str) -> PreparedData:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta_json"]))
        splits = {}
        for split in _SPLITS:
            ptr, us, it = z[f"{split}_indptr"], z[f"{split}_users"], z[f"{split}_items"]
            splits[split] = [Scenario(name, us[ptr[k]:ptr[k + 1]].copy(), it[ptr[k]:ptr[k + 1]].copy(), group)
                             for k, (name, group) in enumerate(meta["splits"][split])]
        return PreparedData(
            name=meta["name"], user_emb=torch.from_numpy(z["user_emb"].copy()),
            item_emb=torch.from_numpy(z["item_emb"].copy()), train=splits["train"], valid=splits["valid"],
            test=splits["test"], user_ids=_restore_ids(z["user_ids"]), item_ids=_restore_ids(z["item_ids"]),
            user_has_emb=z["user_has_emb"].copy(), item_has_emb=z["item_has_emb"].copy(),
            source_users=z["source_users"].copy(), source_items=z["source_items"].copy(),
            stats=meta["stats"], params=meta["params"])
