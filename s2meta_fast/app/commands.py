"""What each ``s2meta`` command does, as functions of a resolved config.

The CLI parses the command line into a :class:`~s2meta_fast.config.Config`, calls one of these
and reports what it returns; nothing here parses or prints.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterator, Mapping, Optional, Tuple

from ..config import Config
from ..data import PreparedData, support_batch
from ..errors import CheckpointError, ConfigError
from ..meta import checkpoint as checkpoints
from ..meta import distributed
from ..meta.trainer import BEST, LAST
from ..plot import draw_figure, record_scenario
from . import compare as compare_mod
from . import run_folder
from .transaction import STAGING
from .stages import (adaptation_stage, check_device, check_ranks_agree, eval_tasks, evaluate_methods, global_theta,
                     load_learner, prepare_data, train_meta)

if TYPE_CHECKING:
    from .recommender import Recommender

log = logging.getLogger("s2meta_fast")


def prepare(cfg: Config) -> PreparedData:
    """Reads the raw files and builds scenarios and embeddings (cached)."""
    return prepare_data(cfg)


@contextlib.contextmanager
def processes(cfg: Config) -> Iterator[Tuple[Config, distributed.Group]]:
    """The torchrun process group (one process without torchrun) and the config this rank runs.

    A worker restarted by ``torchrun --max-restarts`` resumes from the run folder; ranks other
    than 0 run quiet (rank 0 logs and draws the progress bars). Every rank checks at once that
    all run the same settings.
    """
    with distributed.session(cfg.run.device, cfg.run.dist_backend) as group:
        if group.active:
            check_ranks_agree(cfg, None, group)
        if not group.is_writer:
            logging.getLogger("s2meta_fast").setLevel(logging.WARNING)
            cfg = cfg.replace(quiet=True)
        restarted = distributed.restart_count()
        if restarted and not cfg.run.resume and distributed.from_writer(
                lambda: any(os.path.exists(os.path.join(cfg.run.out, folder, run_folder.CONFIG_FILE))
                            for folder in ("", STAGING)), group):
            if group.is_writer:
                log.warning("torchrun restart %d: resuming the run in %s from its last checkpoint", restarted,
                            cfg.run.out)
            cfg = cfg.replace(resume=True)
        yield cfg, group


def _prepare_agreed(cfg: Config, group: distributed.Group) -> PreparedData:
    # rank 0 fills the data cache first; the others then read it instead of racing to write it
    prepared = distributed.writer_first(lambda: prepare_data(cfg), group)
    check_ranks_agree(cfg, prepared, group)
    return prepared


def train(cfg: Config) -> None:
    """Meta-trains s²Meta in the run folder (``--resume`` continues from its last checkpoint)."""
    check_device(cfg.run.device)
    with processes(cfg) as (cfg, group):
        prepared = _prepare_agreed(cfg, group)   # bad data fails here, before --out is touched
        with run_folder.staged(cfg, group=group) as staged:
            distributed.writer_first(lambda: run_folder.check_run_folder(staged), group, run_others=False)
            train_meta(staged, prepared, group)


def evaluate(cfg: Config, checkpoint: Optional[str] = None) -> Dict[str, Any]:
    """Evaluates cfg.eval.methods on the meta-test scenarios; returns the results document."""
    check_device(cfg.run.device)
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise CheckpointError(f"--checkpoint {checkpoint}: no such file")
    if checkpoint is None and "s2meta" in cfg.eval.methods and not any(
            os.path.isfile(os.path.join(cfg.run.out, folder, name))
            for folder in ("", STAGING) for name in (BEST, LAST)):
        run_folder.find_checkpoint(cfg.run.out)   # names what is missing
    with processes(cfg) as (cfg, group):
        prepared = _prepare_agreed(cfg, group)
        with run_folder.staged(cfg, carry=True, group=group) as staged:
            if not cfg.run.resume:
                distributed.writer_first(lambda: run_folder.clear_results(staged.run.out), group, run_others=False)
            learner = None
            if "s2meta" in cfg.eval.methods:
                learner = load_learner(staged, prepared, checkpoint, group)
            doc = evaluate_methods(staged, prepared, learner, group=group)
            if learner is not None and group.is_writer:
                adaptation_stage(staged, prepared, learner)
        return _committed(doc, cfg)


def run(cfg: Config) -> Dict[str, Any]:
    """prepare + train + evaluate every method of cfg.eval.methods; returns the results document."""
    check_device(cfg.run.device)
    with processes(cfg) as (cfg, group):
        start = time.perf_counter()
        prepared = _prepare_agreed(cfg, group)   # bad data fails here, before --out is touched
        seconds = {"prepare_s": time.perf_counter() - start}
        with run_folder.staged(cfg, group=group) as staged:
            distributed.writer_first(lambda: run_folder.check_run_folder(staged), group, run_others=False)
            learner = None
            if "s2meta" in cfg.eval.methods:
                # on --resume this is the time of the resumed part only
                learner = train_meta(staged, prepared, group)
                seconds["meta_train_s"] = time.perf_counter() - start - seconds["prepare_s"]
            doc = evaluate_methods(staged, prepared, learner, seconds, group)
            if learner is not None and group.is_writer:
                adaptation_stage(staged, prepared, learner)
        log.info("run finished in %.1f s", time.perf_counter() - start)
        return _committed(doc, cfg)


def _committed(doc: Dict[str, Any], cfg: Config) -> Dict[str, Any]:
    """The results document as committed: its config names the run folder, not the staging area."""
    if isinstance(doc.get("config", {}).get("run"), dict):
        doc["config"]["run"]["out"] = cfg.run.out
    return doc


def headroom(cfg: Config) -> Dict[str, Any]:
    """The oracle fine-tuning bound of a run folder: Global's θ fine-tuned with the (lr, steps)
    that is best on the meta-test scenarios themselves (an upper-bound diagnostic, not a method)."""
    import torch

    from ..eval.baselines import FinetuneGrid, GlobalModel, select_finetune
    from ..eval.protocol import evaluate as evaluate_protocol
    from ..models import build_model

    prepared = prepare_data(cfg)
    device = torch.device(cfg.run.device)
    model = build_model(cfg.train.model, prepared.embed_dim, fused=cfg.meta.fused)
    theta = global_theta(cfg, prepared, model, device)
    user_emb, item_emb = prepared.user_emb.to(device), prepared.item_emb.to(device)
    tasks = eval_tasks(prepared, "test", cfg.run.seed)
    grid = FinetuneGrid(lrs=compare_mod.HEADROOM_GRID["lrs"], steps=compare_mod.HEADROOM_GRID["steps"])
    oracle = select_finetune(model, theta, user_emb, item_emb, tasks, grid, seed=cfg.run.seed,
                             block_size=cfg.eval.block_size)
    plain = evaluate_protocol(GlobalModel(model, theta, user_emb, item_emb), tasks, (20,), seed=cfg.run.seed,
                              device=device, block_size=cfg.eval.block_size, progress=False)
    return {"global": plain["metrics"]["recall@20"], "oracle": oracle["score"], "lr": oracle["lr"],
            "steps": oracle["steps"], "label": "upper bound: schedule chosen on the meta-test scenarios"}


def compare(cfg: Config, study: "compare_mod.Study") -> Dict[str, Any]:
    """Every method, ablation and architecture of `study` for every seed in OUT (resumable);
    returns the compare.json document (also written with compare.md and the chart)."""
    check_device(cfg.run.device)
    return compare_mod.compare(cfg, study, run, headroom)


@dataclass(frozen=True)
class Figure:
    """What :func:`plot` drew: the PNG and the inner loop it shows."""

    path: str
    scenario: str
    split: str
    steps: int
    k: int
    recall_before: float
    recall_after: float


def plot(checkpoint: str, scenario: str, png: str, overrides: Mapping[str, Any], k: int = 20) -> Figure:
    """Draws the paper's Fig. 2 for one scenario (any split) with the learner of a checkpoint.

    Args:
        checkpoint: a checkpoint file or a run folder; the run's config.yaml must lie next to it.
        scenario: the scenario's name.
        png: the image to write (atomically).
        overrides: run options to change from the stored config (seed, device, quiet).
        k: the cut-off of the test recall curve.
    """
    checkpoint, cfg = run_folder.checkpoint_and_config(checkpoint, {**overrides, "resume": False})
    checkpoints.load(checkpoint, map_location="cpu")   # a damaged checkpoint is named before any work
    check_device(cfg.run.device)
    prepared = prepare_data(cfg)
    splits = {s.name: split for split in ("test", "valid", "train") for s in prepared.scenarios(split)}
    if scenario not in splits:
        shown = sorted(name for name, split in splits.items() if split == "test")
        raise ConfigError(f"unknown scenario {scenario!r}; meta-test scenarios: {', '.join(shown)} "
                          f"({len(splits)} scenarios in all splits)")
    split = splits[scenario]
    task = next(t for t in eval_tasks(prepared, split, cfg.run.seed) if t.name == scenario)
    learner = load_learner(cfg, prepared, checkpoint)
    record = record_scenario(learner, task, support_batch, stop=cfg.stop_at_evaluation, seed=cfg.run.seed, k=k)
    draw_figure(record, png, title=f"s²Meta on {prepared.name} scenario {scenario!r} ({split} split)")
    return Figure(png, scenario, split, record["steps"], k, record["test_recall"][0],
                  record["test_recall"][record["steps"]])


def export(run_dir: str, out: str, checkpoint: Optional[str] = None) -> "Recommender":
    """Writes the trained meta learner of a run folder as one model file; returns its recommender."""
    from .recommender import Recommender
    rec = Recommender.from_run(run_dir, checkpoint=checkpoint)
    rec.save(out)
    return rec


@dataclass(frozen=True)
class Recommendations:
    """What :func:`recommend` did: the rows it wrote and how the scenario was adapted."""

    frame: Any                 # DataFrame[user_id, item_id, score, rank, fallback]
    scenario: Any              # the AdaptedScenario
    n_users: int               # distinct users asked for
    n_fallback_users: int      # of them, users without an embedding (ranked by ItemPop)
    load_seconds: float        # model file and input tables
    serve_seconds: float       # adapt + rank


def recommend(model: str, support: str, users: str, out: str, *, candidates: Optional[str] = None, k: int = 20,
              stop: Optional[str] = None, seed: Optional[int] = 0, on_unknown: str = "error",
              exclude_support: bool = False, device: str = "cpu", stream: Any = None) -> Recommendations:
    """Adapts a model file to the support pairs of a file and writes each user's top `k` to `out`.

    `out` is .csv, .parquet or .jsonl by extension, or ``-`` for JSON lines on `stream`. An unknown
    candidate is an error naming its file line unless ``on_unknown="drop"`` (docs/recommend.md).
    """
    from .recommender import Recommender, UnknownIdError, read_table, write_table
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"--k must be a positive int, got {k!r}")
    if seed is not None and seed < 0:
        raise ConfigError(f"--seed must be a non-negative int, got {seed}")
    check_device(device)
    start = time.perf_counter()
    rec = Recommender.load(model, device=device)
    support_table = read_table(support, ("user_id", "item_id"))
    user_table = read_table(users, ("user_id",))
    candidate_table = read_table(candidates, ("item_id",)) if candidates else None
    loaded = time.perf_counter()
    try:
        scenario = rec.adapt(support_table.frame, None if candidate_table is None else candidate_table.frame["item_id"],
                             stop=stop, seed=seed, on_unknown=on_unknown)
    except UnknownIdError as error:
        lines = candidate_table.line_of(error.positions[:5])
        raise UnknownIdError(candidates, error.ids, error.positions, "item",
                             f"line(s) {', '.join(map(str, lines))}{', …' if len(error.ids) > 5 else ''}; pass "
                             f"--on-unknown drop to leave them out") from None
    frame = scenario.recommend(user_table.frame["user_id"], k=k, exclude="support" if exclude_support else None)
    served = time.perf_counter()
    write_table(frame, out, stream)
    known = rec.known_users(user_table.frame["user_id"].drop_duplicates())
    return Recommendations(frame, scenario, int(known.shape[0]), int((~known).sum()), loaded - start,
                           served - loaded)


__all__ = ["Figure", "Recommendations", "compare", "evaluate", "export", "headroom", "plot", "prepare", "recommend",
           "run", "train"]
