"""What each ``s2meta`` command does, as functions of a resolved config.

The CLI parses the command line into a :class:`~s2meta_fast.config.Config`, calls one of these
and reports what it returns; nothing here parses or prints.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

from ..config import Config
from ..data import PreparedData, support_batch
from ..errors import ConfigError
from ..plot import draw_figure, record_scenario
from . import compare as compare_mod
from . import run_folder
from .stages import check_device, eval_tasks, evaluate_methods, global_theta, load_learner, prepare_data, train_meta

log = logging.getLogger("s2meta_fast")


def prepare(cfg: Config) -> PreparedData:
    """Reads the raw files and builds scenarios and embeddings (cached)."""
    return prepare_data(cfg)


def train(cfg: Config) -> None:
    """Meta-trains s²Meta in the run folder (``--resume`` continues from its last checkpoint)."""
    check_device(cfg.run.device)
    run_folder.check_run_folder(cfg)
    train_meta(cfg, prepare_data(cfg))


def evaluate(cfg: Config, checkpoint: Optional[str] = None) -> Dict[str, Any]:
    """Evaluates cfg.eval.methods on the meta-test scenarios; returns the results document."""
    check_device(cfg.run.device)
    if not cfg.run.resume:
        run_folder.clear_results(cfg.run.out)
    prepared = prepare_data(cfg)
    learner = None
    if "s2meta" in cfg.eval.methods:
        learner = load_learner(cfg, prepared, checkpoint)
    return evaluate_methods(cfg, prepared, learner)


def run(cfg: Config) -> Dict[str, Any]:
    """prepare + train + evaluate every method of cfg.eval.methods; returns the results document."""
    check_device(cfg.run.device)
    run_folder.check_run_folder(cfg)
    start = time.perf_counter()
    prepared = prepare_data(cfg)
    seconds = {"prepare_s": time.perf_counter() - start}
    learner = None
    if "s2meta" in cfg.eval.methods:
        # on --resume this is the time of the resumed part only
        learner = train_meta(cfg, prepared)
        seconds["meta_train_s"] = time.perf_counter() - start - seconds["prepare_s"]
    doc = evaluate_methods(cfg, prepared, learner, seconds)
    log.info("run finished in %.1f s", time.perf_counter() - start)
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


__all__ = ["Figure", "compare", "evaluate", "headroom", "plot", "prepare", "run", "train"]
