"""A benchmark with a known amount of scenario-specific preference (generated, no files).

Users and items have latent vectors u, v in R^k. Outside the scenarios (the source domain) a
user's choices follow u·v. Scenario c adds a taste of its own, shared by all its users: inside c
the choices follow (u + strength·z_c)·v, z_c ~ N(0, I). At strength 0 every scenario shares the
source domain's preference, so one global model is all a method can use; as the strength grows,
each scenario's ranking departs from the global one in a direction its support pairs reveal
(every support pair carries it, whoever the user) — room for adaptation that the benchmark's
headroom diagnostic then measures. Choices are Gumbel-top-k draws (a Plackett-Luce sample) at
temperature ``temp``.

Registered as ``planted0``, ``planted05``, ``planted1`` and ``planted2`` (strength 0, 0.5, 1, 2;
48 scenarios), and ``planted05x4``, ``planted1x4``, ``planted2x4``: strength 0.5, 1 and 2 with 192 scenarios, four
times the meta-train, meta-valid and meta-test scenarios, to measure what the number of scenarios
does to the methods.
"""
from __future__ import annotations

import numpy as np

from .scenarios import RawData

# name -> load_planted options
BENCHMARKS = {"planted0": {"strength": 0.0}, "planted05": {"strength": 0.5}, "planted1": {"strength": 1.0},
              "planted2": {"strength": 2.0}, "planted05x4": {"strength": 0.5, "n_scenarios": 192},
              "planted1x4": {"strength": 1.0, "n_scenarios": 192},
              "planted2x4": {"strength": 2.0, "n_scenarios": 192}}


def load_planted(data_dir: str | None = None, *, seed: int = 0, strength: float = 1.0, n_users: int = 1500,
                 n_source_items: int = 600, n_scenarios: int = 48, scenario_items: tuple = (35, 90), k: int = 16,
                 per_source: int = 20, per_scenario: int = 8, visit: float = 0.35, temp: float = 0.5,
                 reserved_user_frac: float = 0.25, world_seed: int = 0, taste: str = "scenario_users") -> RawData:
    """The planted world as RawData (tags = scenarios); `data_dir` is unused (nothing to read).

    The world (latents, scenario items, interactions) depends on `world_seed` and `strength`
    only, so the run seed varies the split and training, not the data — as for a real dataset.
    A `reserved_user_frac` of the users train the embeddings with all their choices and are
    never scenario users (as ml100k's): without them no scenario item would have an embedding.
    They choose scenario items by their own taste, so the embeddings do not give the scenarios'
    tastes away.
    """
    if strength < 0:
        raise ValueError(f"planted: strength must be >= 0, got {strength}")
    if taste != "scenario_users":  # the option names the generator in the prepared-data cache key
        raise ValueError(f"planted: taste must be 'scenario_users', got {taste!r}")
    del data_dir, seed
    rng = np.random.default_rng([int(world_seed), 4242])
    sizes = rng.integers(scenario_items[0], scenario_items[1] + 1, n_scenarios)
    n_items = n_source_items + int(sizes.sum())
    U = rng.normal(size=(n_users, k))
    V = rng.normal(size=(n_items, k)) / np.sqrt(k)
    Z = rng.normal(size=(n_scenarios, k))
    source = np.arange(n_source_items)
    owned = np.split(np.arange(n_source_items, n_items), np.cumsum(sizes)[:-1])

    def pick(u: int, items: np.ndarray, n: int, c=None) -> np.ndarray:
        n = min(max(n, 1), len(items))
        taste = U[u] if c is None else U[u] + strength * Z[c]
        logits = V[items] @ taste / temp + rng.gumbel(size=len(items))
        return items[np.argpartition(-logits, n - 1)[:n]]

    reserved = np.sort(rng.permutation(n_users)[:int(round(reserved_user_frac * n_users))])
    is_reserved = np.zeros(n_users, bool)
    is_reserved[reserved] = True
    src_u, src_i, tgt_u, tgt_i = [], [], [], []
    for u in range(n_users):
        chosen = pick(u, source, rng.poisson(per_source))
        src_u.append(np.full(len(chosen), u))
        src_i.append(chosen)
        for c, items in enumerate(owned):
            if rng.random() < visit:
                # the embedding-only users choose by their own taste: the frozen item embeddings
                # then carry no scenario's taste, which only its support pairs can reveal
                chosen = pick(u, items, rng.poisson(per_scenario), None if is_reserved[u] else c)
                tgt_u.append(np.full(len(chosen), u))
                tgt_i.append(chosen)
    cat = lambda parts: np.concatenate(parts).astype(np.int64)  # noqa: E731
    tags = {f"planted:{c:02d}": items.astype(np.int64) for c, items in enumerate(owned)}
    src_u, src_i, tgt_u, tgt_i = cat(src_u), cat(src_i), cat(tgt_u), cat(tgt_i)
    return RawData(name="planted", user_ids=np.arange(n_users), item_ids=np.arange(n_items),
                   source_users=src_u, source_items=src_i, target_users=tgt_u, target_items=tgt_i, tags=tags,
                   reserved_users=reserved,
                   stats={"strength": float(strength), "n_source_interactions": int(len(src_u)),
                          "n_scenario_interactions": int(len(tgt_u)), "n_candidate_tags": len(tags)})


__all__ = ["BENCHMARKS", "load_planted"]
