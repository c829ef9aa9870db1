"""A trained meta learner as a product: adapt to a new scenario from a few pairs, then recommend.

    rec = Recommender.load("model.s2m")                  # or Recommender.from_run("runs/demo")
    scen = rec.adapt(support)                            # support: (user_id, item_id) pairs, raw ids
    scen.recommend(["196", "186"], k=20)                 # DataFrame[user_id, item_id, score, rank, fallback]

Ids are the raw ids of the user's data files. The model knows the users and items that got a
frozen embedding when it was trained; everything else is unknown and handled by one policy
(docs/recommend.md): support pairs naming an unknown user or item are dropped and counted;
an unknown candidate item is an error naming it unless ``on_unknown="drop"``; a user without an
embedding is ranked by the scenario's ItemPop and flagged ``fallback``; no support pair left is an
error.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..data.scenarios import SUPPORT_SIZE
from ..data.tasks import TaskBatch
from ..errors import InputError, ModelFileError
from ..fileio import atomic_write
from ..meta.learner import MetaLearner
from ..meta.meta_config import STOP_MODES, MetaConfig
from ..models import build_model
from . import model_file

ON_UNKNOWN = ("error", "drop")
_SHOWN = 5   # unknown ids quoted in a message


class UnknownIdError(InputError):
    """Ids the model cannot use where the policy says that is an error.

    Attributes:
        argument: the argument that held them ("candidates", "items").
        ids: the unknown ids, as given.
        positions: their positions in that argument (0-based), for messages about files.
    """

    def __init__(self, argument: str, ids: Sequence[Any], positions: Sequence[int], what: str, hint: str):
        self.argument, self.ids, self.positions = argument, list(ids), list(positions)
        shown = ", ".join(repr(i) for i in self.ids[:_SHOWN]) + (", …" if len(self.ids) > _SHOWN else "")
        super().__init__(f"{argument}: {len(self.ids)} unknown {what} id(s): {shown} (no embedding in the "
                         f"model, so they cannot be scored); {hint}")


def _key(value: Any, numeric: bool) -> Any:
    """The lookup key of a raw id: ints for a model whose ids are all ints, else stripped strings."""
    if numeric:
        if isinstance(value, (bool, np.bool_)):
            return None
        if isinstance(value, (int, np.integer)):
            return int(value)
        if isinstance(value, (float, np.floating)):
            return int(value) if math.isfinite(value) and float(value).is_integer() else None
        try:
            return int(str(value).strip())
        except ValueError:
            return None
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        value = int(value)
    return str(value).strip()


class _IdMap:
    """Raw ids <-> embedding rows; integer arrays are looked up vectorised."""

    def __init__(self, ids: Sequence[Any], what: str):
        self.ids = list(ids)
        self.numeric = bool(self.ids) and all(isinstance(i, int) and not isinstance(i, bool) for i in self.ids)
        self.array = np.asarray(self.ids, dtype=np.int64 if self.numeric else object)
        self.index = {_key(i, self.numeric): row for row, i in enumerate(self.ids)}
        if len(self.index) != len(self.ids):
            raise ModelFileError(f"the model's {what} ids are not unique")
        if self.numeric:
            self._order = np.argsort(self.array, kind="stable")
            self._sorted = self.array[self._order]

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, values: Sequence[Any]) -> np.ndarray:
        """Embedding row of each value, -1 where unknown."""
        array = np.asarray(values) if not isinstance(values, np.ndarray) else values
        if self.numeric and array.ndim == 1 and array.dtype.kind in "iu" and len(self._sorted):
            at = np.minimum(np.searchsorted(self._sorted, array), len(self._sorted) - 1)
            return np.where(self._sorted[at] == array, self._order[at], -1).astype(np.int64)
        return np.fromiter((self.index.get(_key(v, self.numeric), -1) for v in array.reshape(-1).tolist()),
                           dtype=np.int64, count=array.size)


def _as_list(values: Any, argument: str) -> np.ndarray:
    """A 1-D array of raw ids from a list, array, Series or one-column DataFrame."""
    if isinstance(values, pd.DataFrame):
        if values.shape[1] != 1:
            raise InputError(f"{argument}: expected one column of ids, got columns {list(values.columns)}")
        values = values.iloc[:, 0]
    if isinstance(values, pd.Series):
        values = values.to_numpy()
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise InputError(f"{argument}: expected a list of ids, got {type(values).__name__}")
    if not isinstance(values, np.ndarray):
        values = list(values)
        try:
            # plain ints become an int64 array (looked up vectorised); anything mixed stays objects
            array = np.asarray(values)
        except (ValueError, OverflowError):
            array = None
        if array is None or array.dtype.kind not in "iu" or array.ndim != 1:
            array = np.empty(len(values), dtype=object)
            array[:] = values if values else []
        values = array
    if values.ndim != 1:
        raise InputError(f"{argument}: expected a flat list of ids, got shape {values.shape}")
    return values


def _pairs(support: Any, argument: str = "support") -> Tuple[np.ndarray, np.ndarray]:
    """(users, items) of a DataFrame[user_id, item_id], an [n, 2] array or a list of pairs."""
    if isinstance(support, pd.DataFrame):
        missing = [c for c in ("user_id", "item_id") if c not in support.columns]
        if missing:
            raise InputError(f"{argument}: expected columns user_id and item_id, got {list(support.columns)}")
        return _as_list(support["user_id"], argument), _as_list(support["item_id"], argument)
    if isinstance(support, (str, bytes)) or not isinstance(support, Iterable):
        raise InputError(f"{argument}: expected a DataFrame[user_id, item_id] or a list of (user_id, item_id) "
                         f"pairs, got {type(support).__name__}")
    rows = support if isinstance(support, np.ndarray) else list(support)
    if isinstance(rows, np.ndarray):
        if rows.ndim != 2 or rows.shape[1] != 2:
            raise InputError(f"{argument}: expected an array of shape [n, 2], got {rows.shape}")
        return _as_list(rows[:, 0], argument), _as_list(rows[:, 1], argument)
    for at, pair in enumerate(rows):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise InputError(f"{argument}[{at}]: expected a (user_id, item_id) pair, got {pair!r}")
    return (_as_list([p[0] for p in rows], argument), _as_list([p[1] for p in rows], argument))


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise InputError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _device(device: Any) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device={str(device)!r}: no CUDA device is available here (torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda or 'no'}); use device='cpu'")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"device must be 'cpu' or 'cuda', got {str(device)!r}")
    return device


@dataclasses.dataclass
class _Scenario:
    """One scenario's support and candidates as embedding rows, before adaptation."""

    users: np.ndarray          # [n] user rows of the kept support pairs
    local: np.ndarray          # [n] their items as indices into pool
    pool: np.ndarray           # [P] item rows, sorted: the candidates
    unknown_users: int         # pairs dropped for an unknown user (whatever their item)
    unknown_items: int         # pairs dropped for an unknown item (known user)
    dropped_pairs: List[Tuple[Any, Any]]
    candidates_dropped: List[Any]


class AdaptedScenario:
    """A scenario after the inner loop: its θ, candidates and how the adaptation went.

    Attributes:
        theta: [N] the adapted recommender parameters (on the model's device).
        candidates: the scenario's item ids, in ranking-tie order.
        n_support: support pairs used; ``n_dropped``: pairs dropped for an unknown id
            (``dropped_unknown_user`` / ``dropped_unknown_item`` split them; ``dropped_pairs`` lists them).
        candidates_dropped: unknown candidate ids dropped under ``on_unknown="drop"``.
        trained_support: the support size the model was meta-trained with.
        steps: inner updates taken; ``record``: per inner step t, the support loss at θ⁽ᵗ⁾, the stop
            probability p⁽ᵗ⁾ (NaN under ``stop="fixed"``) and whether step t updated θ.
        stop, seed: how the loop ran. ``adapt_seconds``: the wall time of the inner loop that adapted
            this scenario (shared by the scenarios of one ``adapt_many`` block).
    """

    def __init__(self, rec: "Recommender", scenario: _Scenario, theta: Tensor, steps: int,
                 record: Dict[str, List[Any]], stop: str, seed: Optional[int], seconds: float):
        self._rec = rec
        self.theta = theta
        self._pool = scenario.pool
        self._pool_t = torch.from_numpy(scenario.pool).to(rec.device)
        self.candidates = rec._items.array[scenario.pool].tolist()
        self.n_support = int(scenario.users.shape[0])
        self.dropped_unknown_user, self.dropped_unknown_item = scenario.unknown_users, scenario.unknown_items
        self.n_dropped = scenario.unknown_users + scenario.unknown_items
        self.dropped_pairs = scenario.dropped_pairs
        self.candidates_dropped = scenario.candidates_dropped
        self.trained_support = rec.support_size
        self.steps, self.record, self.stop, self.seed, self.adapt_seconds = steps, record, stop, seed, seconds
        self._support_users, self._support_local = scenario.users, scenario.local
        counts = np.bincount(scenario.local, minlength=scenario.pool.shape[0]).astype(np.float64)
        # ItemPop: support count, ties broken by global popularity scaled into [0, 1), then by position
        self._itempop = torch.from_numpy(counts).to(rec.device) + rec._popularity[self._pool_t]

    @property
    def notes(self) -> List[str]:
        """What differs from the conditions the model was trained under, in words."""
        notes = []
        if self.n_dropped:
            notes.append(f"{self.n_dropped} support pair(s) dropped for an unknown id "
                         f"({self.dropped_unknown_user} user, {self.dropped_unknown_item} item)")
        if self.n_support < self.trained_support:
            notes.append(f"{self.n_support} support pairs, fewer than the {self.trained_support} the model was "
                         f"meta-trained with: the inner loop uses what there is")
        if self.candidates_dropped:
            notes.append(f"{len(self.candidates_dropped)} unknown candidate(s) dropped")
        return notes

    def summary(self) -> str:
        """One line: pairs used and dropped, inner steps, time."""
        return (f"{self.n_support} support pairs used, {self.n_dropped} dropped, {len(self.candidates)} candidates, "
                f"{self.steps} inner steps ({self.stop}), adapt {self.adapt_seconds * 1e3:.1f} ms")

    def __repr__(self) -> str:
        return f"AdaptedScenario({self.summary()})"

    # -- users ---------------------------------------------------------------------------------
    def _users(self, users: Any) -> Tuple[np.ndarray, np.ndarray]:
        """(distinct users in first-seen order, their embedding rows with -1 where none)."""
        values = _as_list(users, "users")
        if values.size == 0:
            raise InputError("users: no user to recommend for")
        if values.dtype == object:
            values = pd.unique(values)
        else:
            values = values[np.sort(np.unique(values, return_index=True)[1])]
        return values, self._rec._users.rows(values)

    def _exclusion(self, exclude: Any, user_rows: np.ndarray, values: np.ndarray) -> Optional[Tensor]:
        """[A, P] bool mask of excluded (user, candidate) pairs, or None."""
        if exclude is None:
            return None
        A, P = user_rows.shape[0], self._pool.shape[0]
        mask = np.zeros((A, P), dtype=bool)
        position = {int(u): a for a, u in enumerate(user_rows) if u >= 0}
        if isinstance(exclude, str):
            if exclude != "support":
                raise InputError(f"exclude: a string must be 'support', got {exclude!r}")
            for u, i in zip(self._support_users.tolist(), self._support_local.tolist()):
                if u in position:
                    mask[position[u], i] = True
            return torch.from_numpy(mask).to(self._rec.device)
        per_pair = isinstance(exclude, (pd.DataFrame, np.ndarray)) and (
            isinstance(exclude, pd.DataFrame) or exclude.ndim == 2)
        if not per_pair and not isinstance(exclude, (pd.Series, np.ndarray)):
            if not isinstance(exclude, Iterable):
                raise InputError(f"exclude: expected None, 'support', item ids or (user_id, item_id) pairs, "
                                 f"got {type(exclude).__name__}")
            exclude = list(exclude)
            per_pair = bool(exclude) and all(isinstance(p, (tuple, list)) for p in exclude)
        local = {int(r): p for p, r in enumerate(self._pool)}
        if per_pair:
            ex_users, ex_items = _pairs(exclude, "exclude")
            keys = {_key(v, self._rec._users.numeric): a for a, v in enumerate(values.tolist())}
            items = self._rec._items.rows(ex_items)
            for u, i in zip(ex_users.tolist(), items.tolist()):
                a = keys.get(_key(u, self._rec._users.numeric))
                if a is not None and i in local:
                    mask[a, local[i]] = True
        else:
            for i in self._rec._items.rows(_as_list(exclude, "exclude")).tolist():
                if i in local:
                    mask[:, local[i]] = True
        return torch.from_numpy(mask).to(self._rec.device)

    # -- output --------------------------------------------------------------------------------
    def recommend(self, users: Any, k: int = 20, exclude: Any = None) -> pd.DataFrame:
        """The top `k` candidates of each user (distinct users, in the order given).

        Args:
            users: raw user ids. A user without an embedding gets the scenario's ItemPop ranking
                (support counts, ties by global popularity) with ``fallback`` True.
            k: list length; fewer rows where the scenario has fewer candidates left.
            exclude: None; "support" (each user's own support items); item ids excluded for every
                user; or (user_id, item_id) pairs / a DataFrame[user_id, item_id] excluded per user.

        Returns:
            DataFrame[user_id, item_id, score, rank, fallback], rank 1 first, grouped by user.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InputError(f"k must be a positive int, got {k!r}")
        values, rows = self._users(users)
        scores = self._score_rows(rows)
        mask = self._exclusion(exclude, rows, values)
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        k = min(int(k), self._pool.shape[0])
        fallback = torch.from_numpy(rows < 0).to(scores.device)
        if bool(fallback.any()):
            # stable order among ItemPop ties (position in the candidates), as the evaluation's ranking
            order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
            top = scores.gather(1, order)
        else:
            top, order = torch.topk(scores, k, dim=1)
        top, order = top.cpu().numpy(), order.cpu().numpy()
        keep = np.isfinite(top)
        A = rows.shape[0]
        ranks = np.broadcast_to(np.arange(1, k + 1), (A, k))
        frame = pd.DataFrame({
            "user_id": np.repeat(self._rec._canonical_users(values, rows), k).reshape(A, k)[keep],
            "item_id": self._rec._items.array[self._pool[order[keep]]],
            "score": top[keep].astype(np.float64),
            "rank": ranks[keep].astype(np.int64),
            "fallback": np.repeat(rows < 0, k).reshape(A, k)[keep],
        })
        return frame

    def _score_rows(self, rows: np.ndarray) -> Tensor:
        """[A, P] scores of the candidates: the adapted model's, ItemPop's for rows < 0."""
        rec = self._rec
        known = rows >= 0
        s = None
        if known.any():
            user_rows = torch.from_numpy(rows[known]).to(rec.device)
            with torch.no_grad():
                s = rec.learner.model.scores(self.theta.unsqueeze(0), rec.learner.user_emb[user_rows].unsqueeze(0),
                                             rec.learner.item_emb[self._pool_t].unsqueeze(0))[0]
            if known.all():
                return s
        # float64 once ItemPop is in: its popularity tie-break needs more than float32's 24 bits next to a count
        out = torch.empty(rows.shape[0], self._pool.shape[0], dtype=torch.float64, device=rec.device)
        if s is not None:
            out[torch.from_numpy(known).to(rec.device)] = s.to(torch.float64)
        if not known.all():
            out[torch.from_numpy(~known).to(rec.device)] = self._itempop
        return out

    def score(self, users: Any, items: Any = None, on_unknown: str = "error") -> pd.DataFrame:
        """Scores of every (user, item) pair: DataFrame[user_id, item_id, score, fallback].

        Any item with an embedding can be scored, candidate or not (default: the candidates).
        An unknown item is an :class:`UnknownIdError` unless ``on_unknown="drop"``; a user without an
        embedding gets ItemPop scores (support count plus a global-popularity tie-break in [0, 1))
        with ``fallback`` True.
        """
        _check_choice("on_unknown", on_unknown, ON_UNKNOWN)
        rec = self._rec
        values, rows = self._users(users)
        if items is None:
            item_values, item_rows = np.asarray(self.candidates, dtype=rec._items.array.dtype), self._pool
        else:
            item_values = _as_list(items, "items")
            item_rows = rec._items.rows(item_values)
            unknown = np.flatnonzero(item_rows < 0)
            if unknown.size and on_unknown == "error":
                raise UnknownIdError("items", item_values[unknown].tolist(), unknown.tolist(), "item",
                                     "pass on_unknown='drop' to leave them out")
            item_values, item_rows = item_values[item_rows >= 0], item_rows[item_rows >= 0]
        A, B = rows.shape[0], item_rows.shape[0]
        scores = torch.empty(A, B, dtype=torch.float64, device=rec.device)
        known = rows >= 0
        item_t = torch.from_numpy(item_rows).to(rec.device)
        if known.any() and B:
            with torch.no_grad():
                s = rec.learner.model.scores(self.theta.unsqueeze(0),
                                             rec.learner.user_emb[torch.from_numpy(rows[known]).to(rec.device)]
                                             .unsqueeze(0), rec.learner.item_emb[item_t].unsqueeze(0))[0]
            scores[torch.from_numpy(known).to(rec.device)] = s.to(torch.float64)
        if not known.all() and B:
            local = {int(r): p for p, r in enumerate(self._pool)}
            counts = np.bincount(self._support_local, minlength=self._pool.shape[0])
            support_count = np.array([counts[local[r]] if r in local else 0 for r in item_rows.tolist()], np.float64)
            pop = torch.from_numpy(support_count).to(rec.device) + rec._popularity[item_t]
            scores[torch.from_numpy(~known).to(rec.device)] = pop
        return pd.DataFrame({"user_id": np.repeat(rec._canonical_users(values, rows), B),
                             "item_id": np.tile(rec._items.array[item_rows], A),
                             "score": scores.cpu().numpy().reshape(-1), "fallback": np.repeat(~known, B)})


class Recommender:
    """A trained s²Meta meta learner with the id maps of its frozen embeddings.

    Build one with :meth:`load` (a model file) or :meth:`from_run` (a finished run folder; needs
    the run's data). ``fused`` picks the compiled kernels (default) or the pure-PyTorch path;
    both compute the same numbers.
    """

    def __init__(self, learner: MetaLearner, user_ids: Sequence[Any], item_ids: Sequence[Any],
                 item_popularity: Optional[Tensor] = None, *, support_size: int = SUPPORT_SIZE,
                 default_stop: str = "sample", info: Optional[Mapping[str, Any]] = None):
        if len(user_ids) != learner.user_emb.shape[0] or len(item_ids) != learner.item_emb.shape[0]:
            raise InputError(f"{len(user_ids)} user ids and {len(item_ids)} item ids for embeddings of "
                             f"{learner.user_emb.shape[0]} users and {learner.item_emb.shape[0]} items")
        _check_choice("default_stop", default_stop, STOP_MODES)
        self.learner = learner
        self._users, self._items = _IdMap(user_ids, "user"), _IdMap(item_ids, "item")
        if item_popularity is None:
            item_popularity = torch.zeros(len(item_ids), dtype=torch.int64)
        self.item_popularity = item_popularity.to(torch.int64).cpu()
        self.support_size, self.default_stop = int(support_size), default_stop
        self.info: Dict[str, Any] = dict(info or {})
        self._sync_device()

    def _sync_device(self) -> None:
        pop = self.item_popularity.to(torch.float64)
        self._popularity = (pop / (pop.max().clamp(min=0) + 1.0) if pop.numel() else pop).to(self.device)

    # -- properties ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.learner.user_emb.device

    @property
    def kind(self) -> str:
        return self.learner.model.kind

    @property
    def embed_dim(self) -> int:
        return self.learner.model.embed_dim

    @property
    def fused(self) -> bool:
        return self.learner.config.fused

    @property
    def user_ids(self) -> List[Any]:
        return list(self._users.ids)

    @property
    def item_ids(self) -> List[Any]:
        return list(self._items.ids)

    def known_users(self, users: Any) -> np.ndarray:
        """Whether each of `users` has an embedding (those without one are ranked by ItemPop)."""
        return self._users.rows(_as_list(users, "users")) >= 0

    def _canonical_users(self, values: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The model's own id of each known user (``"42"`` given for user 42 comes back as 42)."""
        if (rows >= 0).all():
            return self._users.array[rows]
        out = np.asarray(values, dtype=object).copy()
        out[rows >= 0] = self._users.array[rows[rows >= 0]]
        return out

    def to(self, device: Any) -> "Recommender":
        self.learner = self.learner.to(_device(device))
        self._sync_device()
        return self

    def __repr__(self) -> str:
        return (f"Recommender({self.kind}, d={self.embed_dim}, {len(self._users)} users, {len(self._items)} items, "
                f"device={self.device}, fused={self.fused})")

    # -- files -----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Writes the self-contained model file (atomically; see docs/recommend.md for the format)."""
        from .. import __version__
        config = dataclasses.asdict(self.learner.config)
        del config["fused"]   # a property of the process that loads it, not of the model
        tensors = {f"learner.{name}": t for name, t in self.learner.state_dict().items()}
        tensors.update(user_emb=self.learner.user_emb, item_emb=self.learner.item_emb,
                       item_popularity=self.item_popularity)
        document = {"package_version": __version__, "kind": self.kind, "embed_dim": self.embed_dim,
                    "meta": config, "support_size": self.support_size, "default_stop": self.default_stop,
                    "user_ids": self._users.ids, "item_ids": self._items.ids, "info": self.info}
        model_file.write(path, tensors, document)

    @classmethod
    def load(cls, path: str | os.PathLike, device: Any = "cpu", fused: bool = True) -> "Recommender":
        """The recommender of a model file written by :meth:`save` or ``s2meta export``.

        Raises:
            ModelFileError: no file, or a corrupt, truncated, newer-version or otherwise unusable one.
        """
        device = _device(device)
        tensors, doc = model_file.read(path)
        where = f"model file {str(path)!r}"
        try:
            meta = MetaConfig(**doc["meta"], fused=bool(fused))
            model = build_model(doc["kind"], int(doc["embed_dim"]), fused=bool(fused))
            user_emb, item_emb = tensors.pop("user_emb"), tensors.pop("item_emb")
            popularity = tensors.pop("item_popularity")
            learner = MetaLearner(model, user_emb, item_emb, meta)
            state = {name[len("learner."):]: t for name, t in tensors.items() if name.startswith("learner.")}
            learner.load_state_dict(state, strict=True)
            rec = cls(learner, doc["user_ids"], doc["item_ids"], popularity, support_size=int(doc["support_size"]),
                      default_stop=doc["default_stop"], info=doc.get("info"))
        except ModelFileError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise ModelFileError(f"{where} does not hold a model this s2meta_fast can build "
                                 f"({type(error).__name__}: {error}); was it written by a newer version?") from None
        return rec.to(device)

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, checkpoint: Optional[str] = None, device: Any = "cpu",
                 fused: Optional[bool] = None) -> "Recommender":
        """The recommender of a finished ``s2meta train`` / ``run`` folder.

        Reads RUN_DIR/config.yaml, the checkpoint (default RUN_DIR/best.pt, else checkpoint.pt; a
        `checkpoint` elsewhere needs its run's config.yaml next to it) and the run's prepared data
        (from the data cache, or rebuilt from the raw files).
        """
        from ..eval.baselines import global_item_counts
        from ..meta import checkpoint as checkpoints
        from .run_folder import checkpoint_and_config
        from .stages import build_learner, prepare_data

        overrides: Dict[str, Any] = {"device": "cpu", "resume": False}
        if fused is not None:
            overrides["fused"] = bool(fused)
        checkpoint, cfg = checkpoint_and_config(os.fspath(checkpoint or run_dir), overrides)
        prepared = prepare_data(cfg)
        state = checkpoints.load(checkpoint, map_location="cpu")
        full = build_learner(cfg, prepared)
        full.load_state_dict(state["learner"])
        # only entities with an embedding are known to the model: the others get the fallback policy
        has_user = np.asarray(prepared.user_has_emb, dtype=bool)
        has_item = np.asarray(prepared.item_has_emb, dtype=bool)
        learner = MetaLearner(full.model, prepared.user_emb[torch.from_numpy(has_user)],
                              prepared.item_emb[torch.from_numpy(has_item)], cfg.meta)
        learner.load_state_dict(full.state_dict())
        popularity = torch.from_numpy(global_item_counts(prepared)[has_item])
        info = {"dataset": prepared.name, "run": os.path.abspath(cfg.run.out),
                "checkpoint": os.path.basename(checkpoint), "meta_step": int(state.get("step", -1)),
                "seed": cfg.run.seed}
        return cls(learner, np.asarray(prepared.user_ids)[has_user].tolist(),
                   np.asarray(prepared.item_ids)[has_item].tolist(), popularity, support_size=SUPPORT_SIZE,
                   default_stop=cfg.stop_at_evaluation, info=info).to(device)

    # -- adaptation ------------------------------------------------------------------------------
    def _scenario(self, support: Any, candidates: Any, on_unknown: str, index: int) -> _Scenario:
        where = "support" if index < 0 else f"supports[{index}]"
        users, items = _pairs(support, where)
        if users.size == 0:
            raise InputError(f"{where}: no support pair; a scenario needs at least one (user_id, item_id) pair")
        u_rows, i_rows = self._users.rows(users), self._items.rows(items)
        keep = (u_rows >= 0) & (i_rows >= 0)
        dropped = np.flatnonzero(~keep)
        dropped_pairs = list(zip(users[dropped].tolist(), items[dropped].tolist()))
        unknown_users = int((u_rows < 0).sum())
        unknown_items = int(((u_rows >= 0) & (i_rows < 0)).sum())
        if not keep.any():
            raise InputError(f"{where}: none of the {users.size} support pairs can be used: {unknown_users} name an "
                             f"unknown user, {unknown_items} an unknown item (ids without an embedding in the model); "
                             f"e.g. {dropped_pairs[:3]}")
        pool_parts = [i_rows[keep]]
        candidates_dropped: List[Any] = []
        if candidates is not None:
            argument = "candidates" if index < 0 else f"candidates[{index}]"
            values = _as_list(candidates, argument)
            c_rows = self._items.rows(values)
            unknown = np.flatnonzero(c_rows < 0)
            if unknown.size:
                if on_unknown == "error":
                    raise UnknownIdError(argument, values[unknown].tolist(), unknown.tolist(), "item",
                                         "pass on_unknown='drop' to leave them out")
                candidates_dropped = values[unknown].tolist()
            pool_parts.append(c_rows[c_rows >= 0])
        pool, inverse = np.unique(np.concatenate(pool_parts), return_inverse=True)
        if pool.shape[0] < 2:
            raise InputError(f"{where}: the scenario has a single item ({self._items.ids[pool[0]]!r}); the inner loop "
                             f"draws negatives among the scenario's other items: give more candidates")
        n = int(keep.sum())
        return _Scenario(users=u_rows[keep], local=inverse.reshape(-1)[:n].astype(np.int64), pool=pool.astype(np.int64),
                         unknown_users=unknown_users, unknown_items=unknown_items,
                         dropped_pairs=dropped_pairs, candidates_dropped=candidates_dropped)

    def adapt(self, support: Any, candidates: Any = None, stop: Optional[str] = None, seed: Optional[int] = None,
              on_unknown: str = "error") -> AdaptedScenario:
        """Adapts the recommender to one new scenario from its support pairs (raw ids).

        Args:
            support: DataFrame[user_id, item_id] or a list of (user_id, item_id) pairs. Pairs naming an
                unknown user or item are dropped and counted; none left is an error.
            candidates: the scenario's items; the candidates are these plus the support's items
                (default: the support's items alone). An unknown one is an :class:`UnknownIdError`
                unless ``on_unknown="drop"``.
            stop: "sample", "threshold" or "fixed" (default: the stop rule the run evaluated with).
            seed: seeds the inner loop's negatives and stop draws; None draws from torch's global RNG.
        """
        return self.adapt_many([support], None if candidates is None else [candidates], stop=stop, seed=seed,
                               on_unknown=on_unknown, _single=True)[0]

    def adapt_many(self, supports: Sequence[Any], candidates: Optional[Sequence[Any]] = None,
                   stop: Optional[str] = None, seed: Optional[int] = None, on_unknown: str = "error",
                   block_size: int = 16, _single: bool = False) -> List[AdaptedScenario]:
        """Adapts many scenarios, `block_size` at a time in one batched inner loop (the fused
        multi-scenario kernels: one launch per inner step for the whole block).

        Same arguments as :meth:`adapt`, one list entry per scenario (``candidates`` may be None or
        hold None entries). Within a block, scenarios with fewer support pairs than the largest
        repeat theirs cyclically up to its size (the support loss is a mean, so a whole number of
        repeats changes nothing). With a seed, the draws are fixed per call, not per scenario:
        scenario s of a batch sees other draws than the same scenario adapted alone.
        `block_size` bounds memory: the update controller keeps 2 · 16 floats per adapted scalar
        and scenario (22 MB for 16 scenarios of the d = 64 interaction model).
        """
        stop = self.default_stop if stop is None else stop
        _check_choice("stop", stop, STOP_MODES)
        _check_choice("on_unknown", on_unknown, ON_UNKNOWN)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise InputError(f"seed must be a non-negative int or None, got {seed!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
            raise InputError(f"block_size must be a positive int, got {block_size!r}")
        if isinstance(supports, (pd.DataFrame, str, bytes)) or not isinstance(supports, Sequence):
            raise InputError("supports: expected a list with one support set per scenario")
        if len(supports) == 0:
            raise InputError("supports: no scenario to adapt")
        if candidates is not None and len(candidates) != len(supports):
            raise InputError(f"candidates: {len(candidates)} entries for {len(supports)} scenarios")
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(seed))
        adapted: List[AdaptedScenario] = []
        for first in range(0, len(supports), int(block_size)):
            start = time.perf_counter()
            scenarios = [self._scenario(supports[k], None if candidates is None else candidates[k], on_unknown,
                                        -1 if _single else k)
                         for k in range(first, min(first + int(block_size), len(supports)))]
            with torch.no_grad():
                out = self.learner.adapt(self._batch(scenarios), stop=stop, generator=generator)
            steps = out.steps.cpu().tolist()
            loss = out.support_loss.cpu()
            prob = torch.sigmoid(out.stop_logit).cpu()
            if stop == "fixed":
                prob = torch.full_like(prob, float("nan"))
            updated = out.updated.bool().cpu()
            seconds = time.perf_counter() - start
            adapted += [AdaptedScenario(self, sc, out.theta[s], steps[s],
                                        {"support_loss": loss[:, s].tolist(), "stop_prob": prob[:, s].tolist(),
                                         "updated": updated[:, s].tolist()}, stop, seed, seconds)
                        for s, sc in enumerate(scenarios)]
        return adapted

    def _batch(self, scenarios: List[_Scenario]) -> TaskBatch:
        S = len(scenarios)
        n = max(sc.users.shape[0] for sc in scenarios)
        P = max(sc.pool.shape[0] for sc in scenarios)
        users, local = np.empty((S, n), np.int64), np.empty((S, n), np.int64)
        pool, size = np.empty((S, P), np.int64), np.empty(S, np.int64)
        for s, sc in enumerate(scenarios):
            repeat = np.resize(np.arange(sc.users.shape[0]), n)
            users[s], local[s] = sc.users[repeat], sc.local[repeat]
            m = sc.pool.shape[0]
            pool[s, :m], pool[s, m:], size[s] = sc.pool, sc.pool[0], m
        items = np.take_along_axis(pool, local, 1)
        f = torch.from_numpy
        batch = TaskBatch(support_users=f(users), support_items=f(items), support_item_index=f(local), pool=f(pool),
                         pool_size=f(size), query_users=None, query_pos=None, query_neg=None,
                         names=[f"scenario{s}" for s in range(S)])
        return batch if self.device.type == "cpu" else batch.to(self.device)


# --------------------------------------------------------------------------------------------
# tables on disk (the ``s2meta recommend`` command)

TABLE_FORMATS = (".csv", ".parquet", ".jsonl")


class IdTable:
    """Ids read from a file, with the file line of each row (for messages)."""

    def __init__(self, path: str, frame: pd.DataFrame, lines: np.ndarray):
        self.path, self.frame, self.lines = path, frame, lines

    def line_of(self, positions: Sequence[int]) -> List[int]:
        return [int(self.lines[p]) for p in positions]


def read_table(path: str, columns: Sequence[str]) -> IdTable:
    """The `columns` of a CSV (header row required) or Parquet file, every id read as written.

    A one-column file may name its column anything. Blank lines are skipped; line numbers in
    messages count them.
    """
    if not os.path.isfile(path):
        raise InputError(f"{path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".parquet":
            frame = pd.read_parquet(path).astype(str)
            lines = np.arange(len(frame)) + 1
        else:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False)
            blank = (frame == "").all(axis=1).to_numpy() if frame.shape[1] else np.zeros(len(frame), bool)
            lines = np.flatnonzero(~blank) + 2   # line 1 is the header
            frame = frame[~blank].reset_index(drop=True)
    except ImportError:
        raise InputError(f"{path!r}: reading Parquet needs pyarrow or fastparquet, and neither is installed; "
                         f"use a CSV file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError, OSError) as error:
        raise InputError(f"{path!r}: not a readable table: {error}") from None
    if len(columns) == 1 and frame.shape[1] == 1:
        frame = frame.set_axis(list(columns), axis=1)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputError(f"{path!r}: expected column(s) {', '.join(columns)} in the header row, got "
                         f"{', '.join(map(str, frame.columns)) or 'none'}")
    if len(frame) == 0:
        raise InputError(f"{path!r}: no rows after the header")
    return IdTable(path, frame[list(columns)], lines)


def write_table(frame: pd.DataFrame, path: str, stream: Any = None) -> None:
    """CSV, Parquet or JSON lines by the extension of `path`; ``-`` writes JSON lines to `stream`.

    A file is written to a temporary name and renamed: a failed write leaves no partial file.
    """
    if path == "-":
        frame.to_json(stream, orient="records", lines=True)
        return
    ext = os.path.splitext(path)[1].lower()
    if ext not in TABLE_FORMATS:
        raise InputError(f"--out {path!r}: unknown extension {ext or '(none)'}; use one of "
                         f"{', '.join(TABLE_FORMATS)} or - for JSON lines on stdout")

    def write(tmp: str) -> None:
        if ext == ".csv":
            frame.to_csv(tmp, index=False)
        elif ext == ".jsonl":
            frame.to_json(tmp, orient="records", lines=True)
        else:
            try:
                frame.to_parquet(tmp, index=False)
            except ImportError:
                raise InputError(f"--out {path!r}: writing Parquet needs pyarrow or fastparquet, and neither is "
                                 f"installed; install one or write .csv or .jsonl") from None

    atomic_write(path, write)


__all__ = ["AdaptedScenario", "IdTable", "ModelFileError", "ON_UNKNOWN", "Recommender", "UnknownIdError",
           "read_table", "write_table"]
