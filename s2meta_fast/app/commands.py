"""What each ``s2meta`` command does, as functions of a resolved config.

The CLI parses the command line into a :class:`~s2meta_fast.config.Config`, calls one of these
and reports what it returns; nothing here parses or prints.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

from ..config import Config
from ..data import PreparedData, support_batch
from ..errors import CheckpointError, ConfigError
from ..meta import checkpoint as checkpoints
from ..meta.trainer import BEST, LAST
from ..plot import draw_figure, record_scenario
from . import run_folder
from .transaction import STAGING
from .stages import check_device, eval_tasks, evaluate_methods, load_learner, prepare_data, train_meta

log = logging.getLogger("s2meta_fast")


def prepare(cfg: Config) -> PreparedData:
    """Reads the raw files and builds scenarios and embeddings (cached)."""
    return prepare_data(cfg)


def train(cfg: Config) -> None:
    """Meta-trains s²Meta in the run folder (``--resume`` continues from its last checkpoint)."""
    check_device(cfg.run.device)
    prepared = prepare_data(cfg)   # bad data fails here, before --out is touched
    with run_folder.staged(cfg) as staged:
        run_folder.check_run_folder(staged)
        train_meta(staged, prepared)


def evaluate(cfg: Config, checkpoint: Optional[str] = None) -> Dict[str, Any]:
    """Evaluates cfg.eval.methods on the meta-test scenarios; returns the results document."""
    check_device(cfg.run.device)
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise CheckpointError(f"--checkpoint {checkpoint}: no such file")
    if checkpoint is None and "s2meta" in cfg.eval.methods and not any(
            os.path.isfile(os.path.join(cfg.run.out, folder, name))
            for folder in ("", STAGING) for name in (BEST, LAST)):
        run_folder.find_checkpoint(cfg.run.out)   # names what is missing
    prepared = prepare_data(cfg)
    with run_folder.staged(cfg, carry=True) as staged:
        if not cfg.run.resume:
            run_folder.clear_results(staged.run.out)
        learner = None
        if "s2meta" in cfg.eval.methods:
            learner = load_learner(staged, prepared, checkpoint)
        doc = evaluate_methods(staged, prepared, learner)
    return _committed(doc, cfg)


def run(cfg: Config) -> Dict[str, Any]:
    """prepare + train + evaluate every method of cfg.eval.methods; returns the results document."""
    check_device(cfg.run.device)
    start = time.perf_counter()
    prepared = prepare_data(cfg)   # bad data fails here, before --out is touched
    seconds = {"prepare_s": time.perf_counter() - start}
    with run_folder.staged(cfg) as staged:
        run_folder.check_run_folder(staged)
        learner = None
        if "s2meta" in cfg.eval.methods:
            # on --resume this is the time of the resumed part only
            learner = train_meta(staged, prepared)
            seconds["meta_train_s"] = time.perf_counter() - start - seconds["prepare_s"]
        doc = evaluate_methods(staged, prepared, learner, seconds)
    log.info("run finished in %.1f s", time.perf_counter() - start)
    return _committed(doc, cfg)


def _committed(doc: Dict[str, Any], cfg: Config) -> Dict[str, Any]:
    """The results document as committed: its config names the run folder, not the staging area."""
    if isinstance(doc.get("config", {}).get("run"), dict):
        doc["config"]["run"]["out"] = cfg.run.out
    return doc


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


__all__ = ["Figure", "evaluate", "plot", "prepare", "run", "train"]
