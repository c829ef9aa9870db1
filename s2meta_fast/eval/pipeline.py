"""The stages behind the CLI: prepare data, meta-train, build the baselines, evaluate, write results.

A run folder holds everything a stage needs to be skipped on ``--resume``:

    OUT/config.yaml            the resolved configuration (a resumed run must match it)
    OUT/<trainer files>        meta-training checkpoints (the trainer's own layout)
    OUT/global.pt              the Global baseline's θ
    OUT/finetune.json          the Finetune (lr, steps) chosen on meta-validation scenarios
    OUT/methods/<name>.json    each method's metrics on the meta-test scenarios
    OUT/results.json, .md      the pooled results
    OUT/adaptation.json        s²Meta's adaptation gain, steps and gates per scenario, the validation history
    OUT/validation_curve.png   meta-validation Recall@20 against meta-steps (with matplotlib)

Every file is written atomically, so a run killed at any point resumes from the last finished
stage (and meta-training from its last checkpoint).
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict, List, Optional

import torch
import yaml

from .. import _extension
from ..config import Config, ConfigError, build_config
from .baselines import (Finetune, FinetuneGrid, GlobalModel, GlobalTrainConfig, ItemPop, S2Meta,
                        global_item_counts, select_finetune, train_global)
from .protocol import evaluate
from .results import atomic_write_text, build_results, write_results

log = logging.getLogger("s2meta_fast")

# Options that may change between an interrupted run and its resumption without changing results.
RESUME_FREE = {"quiet", "resume", "device", "methods", "out"}


# --------------------------------------------------------------------------------------------
# run folder


def clear_results(out: str) -> None:
    """Drops per-method results and results files: they are recomputed unless resuming."""
    for stale in ("results.json", "results.md", "adaptation.json", "validation_curve.png"):
        if os.path.exists(os.path.join(out, stale)):
            os.unlink(os.path.join(out, stale))
    methods = os.path.join(out, "methods")
    if os.path.isdir(methods):
        for name in os.listdir(methods):
            os.unlink(os.path.join(methods, name))


def check_run_folder(cfg: Config) -> None:
    """Writes OUT/config.yaml, or on ``--resume`` checks the stored one matches (except run control)."""
    out = cfg.run.out
    path = os.path.join(out, "config.yaml")
    if cfg.run.resume:
        if not os.path.exists(path):
            raise ConfigError(f"--resume: {out!r} holds no run to resume (no config.yaml); drop --resume to start one")
        with open(path, encoding="utf-8") as fh:
            stored = build_config(yaml.safe_load(fh), where=path).to_dict()
        current = cfg.to_dict()
        changed = [f"{name} ({stored[s][name]!r} -> {current[s][name]!r})"
                   for s in current for name in current[s]
                   if name not in RESUME_FREE and stored[s][name] != current[s][name]]
        if changed:
            raise ConfigError(f"--resume: the run in {out!r} used different settings: {', '.join(changed)}; "
                              f"resume with the same settings or start a new run in another --out")
    else:
        # A fresh run must not pick up a previous run's stages: its baselines used other data.
        for stale in ("global.pt", "finetune.json", "best.pt", "checkpoint.pt"):
            if os.path.exists(os.path.join(out, stale)):
                os.unlink(os.path.join(out, stale))
        clear_results(out)
    atomic_write_text(path, cfg.to_yaml())


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# --------------------------------------------------------------------------------------------
# stages


def prepare_data(cfg: Config) -> Any:
    """The prepared dataset for cfg.data (the data layer caches embeddings and scenarios)."""
    from .. import data

    d = cfg.data
    kwargs: Dict[str, Any] = dict(seed=cfg.run.seed, embed_dim=d.embed_dim, progress=not cfg.run.quiet)
    for name in ("min_items", "max_items", "cache_dir", "mf_epochs", "heldout_user_frac"):
        if getattr(d, name) is not None:
            kwargs[name] = getattr(d, name)
    prepared = data.prepare(d.dataset, d.data_dir, **kwargs)
    log.info("%s: %d meta-train, %d meta-validation, %d meta-test scenarios", prepared.name, len(prepared.train),
             len(prepared.valid), len(prepared.test))
    return prepared


def build_learner(cfg: Config, prepared: Any) -> Any:
    from ..meta import MetaLearner
    from ..models import build_model

    device = torch.device(cfg.run.device)
    model = build_model(cfg.train.model, prepared.embed_dim, fused=cfg.meta.fused)
    # The controllers initialise from torch's global RNG: seeding it makes the run reproducible.
    torch.manual_seed(cfg.run.seed)
    learner = MetaLearner(model, prepared.user_emb, prepared.item_emb, cfg.meta)
    return learner.to(device)


def task_sampler(prepared: Any, seed: int) -> Any:
    from ..data.tasks import TaskSampler
    return TaskSampler(prepared, seed)


def eval_tasks(prepared: Any, split: str, seed: int) -> List[Any]:
    """The SPEC §6 evaluation tasks of a split, fixed by the seed (a fresh sampler per split)."""
    return task_sampler(prepared, seed).eval_tasks(prepared.scenarios(split))


def train_meta(cfg: Config, prepared: Any) -> Any:
    """Meta-trains (or resumes) in OUT; returns the learner at its best validation score."""
    from ..meta.trainer import MetaTrainer

    learner = build_learner(cfg, prepared)
    if cfg.train.warm_start:
        warm_start_omega(cfg, prepared, learner)
    sampler = task_sampler(prepared, cfg.run.seed)
    valid = eval_tasks(prepared, "valid", cfg.run.seed)
    validate = validation_fn(cfg, valid) if valid else None
    trainer = MetaTrainer(learner, sampler, prepared.train, cfg.train.trainer_config(), cfg.run.out,
                          validate=validate)
    start = time.perf_counter()
    summary = trainer.fit(cfg.train.meta_steps, resume=cfg.run.resume)
    log.info("meta-training: %d meta-steps, best validation %.4f, %.1f s", summary["step"], summary["best_score"],
             time.perf_counter() - start)
    return load_learner(cfg, prepared)


def warm_start_omega(cfg: Config, prepared: Any, learner: Any) -> None:
    """ω_R := the Global baseline's θ (OUT/global.pt, trained here if missing) before meta-training.

    A departure from the paper, whose ω_R starts at a random init and learns only from
    meta-train scenario tasks: Global also trains on every source-domain interaction, so the
    learned init otherwise starts from less data than the baseline it must beat. On ``--resume``
    the checkpoint's ω_R replaces this start, as every other trained parameter.
    """
    if learner.omega is None:
        raise ConfigError("warm_start needs a learned initialisation (init: learned); init: random has no ω_R")
    theta = global_theta(cfg, prepared, learner.model, learner.omega.device)
    with torch.no_grad():
        learner.omega.copy_(theta.to(learner.omega.dtype))


def load_learner(cfg: Config, prepared: Any, checkpoint_path: Optional[str] = None) -> Any:
    """The learner of a checkpoint: `checkpoint_path`, else OUT/best.pt, else OUT/checkpoint.pt.

    best.pt (the best validation score) is preferred: it is what model selection on the
    meta-validation scenarios chooses; checkpoint.pt is the last state.
    """
    from ..meta.checkpoint import load
    from ..meta.trainer import BEST, LAST

    if checkpoint_path is None:
        for name in (BEST, LAST):
            candidate = os.path.join(cfg.run.out, name)
            if os.path.exists(candidate):
                checkpoint_path = candidate
                break
        else:
            raise FileNotFoundError(f"no trained meta learner in {cfg.run.out!r} ({BEST} or {LAST}); "
                                    f"run `s2meta train --out {cfg.run.out}` first")
    state = load(checkpoint_path, map_location="cpu")
    learner = build_learner(cfg, prepared)
    learner.load_state_dict(state["learner"])
    log.info("evaluating the meta learner of %s (meta-step %d)", checkpoint_path, state["step"])
    return learner


def validation_fn(cfg: Config, valid_tasks: List[Any]):
    """Recall@20 (or the nearest K) of the learner on the meta-validation scenarios."""
    k = 20 if 20 in cfg.eval.ks else cfg.eval.ks[0]

    def validate(learner: Any) -> float:
        method = S2Meta(learner, stop=cfg.eval.eval_stop)
        res = evaluate(method, valid_tasks, (k,), seed=cfg.run.seed, device=cfg.run.device,
                       block_size=cfg.eval.block_size, max_pairs=cfg.eval.max_pairs, progress=False)
        return res["metrics"][f"recall@{k}"]
    return validate


def _global_key(cfg: Config) -> Dict[str, Any]:
    e = cfg.eval
    return {"model": cfg.train.model, "fused": cfg.meta.fused, "seed": cfg.run.seed, "steps": e.global_steps,
            "batch": e.global_batch, "lr": e.global_lr, "source": e.global_source}


def global_theta(cfg: Config, prepared: Any, model: Any, device: torch.device) -> torch.Tensor:
    """The Global baseline's θ, trained once per run folder and settings (OUT/global.pt)."""
    from ..meta.checkpoint import load, save_atomic

    path = os.path.join(cfg.run.out, "global.pt")
    key = _global_key(cfg)
    if os.path.exists(path):
        stored = load(path, map_location=device)
        if stored.get("key") == key:
            return stored["theta"]
    e = cfg.eval
    gcfg = GlobalTrainConfig(steps=e.global_steps, batch_size=e.global_batch, lr=e.global_lr, use_source=e.global_source)
    start = time.perf_counter()
    theta = train_global(model, prepared.user_emb.to(device), prepared.item_emb.to(device), prepared, gcfg,
                         seed=cfg.run.seed, progress=not cfg.run.quiet)
    log.info("global: trained %d steps in %.1f s", gcfg.steps, time.perf_counter() - start)
    save_atomic({"theta": theta.cpu(), "key": key}, path)
    return theta


def finetune_choice(cfg: Config, prepared: Any, model: Any, theta: torch.Tensor) -> Dict[str, Any]:
    """(lr, steps) for Finetune from the meta-validation grid search (OUT/finetune.json)."""
    path = os.path.join(cfg.run.out, "finetune.json")
    key = {"global": _global_key(cfg), "lrs": list(cfg.eval.finetune_lrs), "steps": list(cfg.eval.finetune_steps),
           "block_size": cfg.eval.block_size}
    cached = _read_json(path)
    if cached is not None and cached.get("key") == key:
        return cached
    valid = eval_tasks(prepared, "valid", cfg.run.seed)
    if not valid:
        raise ValueError("Finetune needs meta-validation scenarios to choose its lr and steps; the split has none")
    device = theta.device
    grid = FinetuneGrid(lrs=cfg.eval.finetune_lrs, steps=cfg.eval.finetune_steps)
    choice = select_finetune(model, theta, prepared.user_emb.to(device), prepared.item_emb.to(device), valid, grid,
                             seed=cfg.run.seed, block_size=cfg.eval.block_size)
    choice["key"] = key
    log.info("finetune: chose lr=%g, steps=%d (validation %s %.4f)", choice["lr"], choice["steps"], grid.metric,
             choice["score"])
    atomic_write_text(path, json.dumps(choice, indent=2) + "\n")
    return choice


def make_method(name: str, cfg: Config, prepared: Any, learner: Any = None) -> Any:
    device = torch.device(cfg.run.device)
    if name == "itempop":
        return ItemPop(global_item_counts(prepared), device=device)
    if name == "s2meta":
        if learner is None:
            raise ValueError("s2meta needs a trained learner")
        return S2Meta(learner, stop=cfg.eval.eval_stop)
    from ..models import build_model
    model = build_model(cfg.train.model, prepared.embed_dim, fused=cfg.meta.fused)
    theta = global_theta(cfg, prepared, model, device)
    user_emb, item_emb = prepared.user_emb.to(device), prepared.item_emb.to(device)
    if name == "global":
        return GlobalModel(model, theta, user_emb, item_emb)
    if name == "finetune":
        choice = finetune_choice(cfg, prepared, model, theta)
        return Finetune(model, theta, user_emb, item_emb, choice["lr"], choice["steps"])
    raise ValueError(f"unknown method {name!r}")


def evaluate_methods(cfg: Config, prepared: Any, learner: Any = None,
                     stage_seconds: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
    """Evaluates cfg.eval.methods on the meta-test scenarios and writes results.json/.md.

    `stage_seconds` (e.g. prepare, meta-training wall times of this process) go into the
    results' ``timings`` next to each method's.
    """
    tasks = eval_tasks(prepared, "test", cfg.run.seed)
    if not tasks:
        raise ValueError(f"{prepared.name}: no meta-test scenario; lower --min-items or raise --max-items")
    methods: Dict[str, Dict[str, float]] = {}
    timings: Dict[str, Any] = {k: round(v, 3) for k, v in (stage_seconds or {}).items()}
    n_users = None
    for name in cfg.eval.methods:
        path = os.path.join(cfg.run.out, "methods", f"{name}.json")
        cached = _read_json(path) if cfg.run.resume else None
        if cached is None:
            start = time.perf_counter()
            method = make_method(name, cfg, prepared, learner)
            res = evaluate(method, tasks, cfg.eval.ks, seed=cfg.run.seed, device=cfg.run.device,
                           block_size=cfg.eval.block_size, max_pairs=cfg.eval.max_pairs,
                           progress=not cfg.run.quiet, desc=f"evaluate {name}")
            res["total_seconds"] = time.perf_counter() - start
            atomic_write_text(path, json.dumps(res, indent=2) + "\n")
            cached = res
        methods[name] = cached["metrics"]
        timings[name] = {"evaluate_s": round(cached["seconds"], 3),
                         "setup_and_evaluate_s": round(cached.get("total_seconds", cached["seconds"]), 3)}
        n_users = cached["n_users"]
        log.info("%-8s %s", name, "  ".join(f"{k}={v:.4f}" for k, v in cached["metrics"].items()
                                             if k.startswith("recall")))
    doc = build_results(prepared.name, cfg.run.seed, len(tasks), n_users, methods,
                        backend=_extension.backend().name, device=cfg.run.device, timings=timings,
                        config=cfg.to_dict())
    write_results(cfg.run.out, doc)
    return doc


def adaptation_stage(cfg: Config, prepared: Any, learner: Any) -> Dict[str, Any]:
    """OUT/adaptation.json (gain, steps, α/β on the meta-valid and meta-test scenarios, the
    validation history) and OUT/validation_curve.png; see :mod:`s2meta_fast.eval.adaptation`."""
    from ..meta.checkpoint import load
    from ..meta.trainer import LAST
    from .adaptation import adaptation_report, write_adaptation

    last = os.path.join(cfg.run.out, LAST)
    history = load(last, map_location="cpu").get("history", []) if os.path.exists(last) else []
    valid = eval_tasks(prepared, "valid", cfg.run.seed)
    extra = {"valid": adaptation_report(learner, valid, seed=cfg.run.seed, block_size=cfg.eval.block_size,
                                        stop=cfg.eval.eval_stop)} if valid else {}
    return write_adaptation(cfg.run.out, learner, eval_tasks(prepared, "test", cfg.run.seed), history,
                            seed=cfg.run.seed, block_size=cfg.eval.block_size, stop=cfg.eval.eval_stop, extra=extra)
