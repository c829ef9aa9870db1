"""The stages a command chains: prepare data, meta-train, build the baselines, evaluate.

Each stage takes the resolved :class:`~s2meta_fast.config.Config` and reads or writes the run
folder through :mod:`s2meta_fast.app.run_folder`, so a finished stage is skipped on ``--resume``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch

from .. import _extension
from ..config import Config
from .. import data
from ..data import EvalTask, PreparedData, TaskSampler
from ..errors import CheckpointError, ConfigError, DataError, RunFolderError
from ..eval.baselines import (Finetune, FinetuneGrid, GlobalModel, GlobalTrainConfig, ItemPop, S2Meta,
                              global_item_counts, select_finetune, train_global)
from ..eval.cross_domain import CROSS_DOMAIN, NeuMF, build_domains, reduced_grid, select_cross_domain
from ..eval.adaptation import adaptation_report, write_adaptation
from ..eval.methods import METHODS
from ..eval.protocol import Method, evaluate
from ..eval.results import build_results, write_results
from ..meta import MetaLearner, MetaTrainer
from ..meta import checkpoint as checkpoints
from ..meta import distributed
from ..meta.distributed import SINGLE, Group
from ..meta.trainer import LAST, checkpoint_differences
from ..models import FlatRecommender, build_model
from . import run_folder

log = logging.getLogger("s2meta_fast")


def check_device(device: str) -> None:
    """Refuses a CUDA device where there is none, before any work starts."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available here "
                          f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use --device cpu")


# --------------------------------------------------------------------------------------------
# data


def prepare_data(cfg: Config) -> PreparedData:
    """The prepared dataset for cfg.data (the data layer caches embeddings and scenarios)."""
    d = cfg.data
    kwargs: Dict[str, Any] = dict(seed=cfg.run.seed, embed_dim=d.embed_dim, progress=not cfg.run.quiet)
    for name in ("min_items", "max_items", "cache_dir", "mf_epochs", "heldout_user_frac"):
        if getattr(d, name) is not None:
            kwargs[name] = getattr(d, name)
    prepared = data.prepare(d.dataset, d.data_dir, **kwargs)
    log.info("%s: %d meta-train, %d meta-validation, %d meta-test scenarios", prepared.name, len(prepared.train),
             len(prepared.valid), len(prepared.test))
    return prepared


def eval_tasks(prepared: PreparedData, split: str, seed: int) -> List[EvalTask]:
    """The evaluation tasks of a split, fixed by the seed (a fresh sampler per split)."""
    return TaskSampler(prepared, seed).eval_tasks(prepared.scenarios(split))


# --------------------------------------------------------------------------------------------
# s²Meta


def build_learner(cfg: Config, prepared: PreparedData) -> MetaLearner:
    model = build_model(cfg.train.model, prepared.embed_dim, fused=cfg.meta.fused)
    # The controllers initialise from torch's global RNG: seeding it makes the run reproducible.
    torch.manual_seed(cfg.run.seed)
    learner = MetaLearner(model, prepared.user_emb, prepared.item_emb, cfg.meta)
    return learner.to(torch.device(cfg.run.device))


def validation_fn(cfg: Config, valid_tasks: List[EvalTask],
                  group: Group = SINGLE) -> Callable[[MetaLearner], float]:
    """Recall@20 (or the nearest K) of the learner on the meta-validation scenarios.

    The learner is validated with the stop rule it will be evaluated with (sharded over `group`).
    """
    k = 20 if 20 in cfg.eval.ks else cfg.eval.ks[0]

    def validate(learner: MetaLearner) -> float:
        method = S2Meta(learner, stop=cfg.stop_at_evaluation)
        res = evaluate(method, valid_tasks, (k,), seed=cfg.run.seed, device=cfg.run.device,
                       block_size=cfg.eval.block_size, max_pairs=cfg.eval.max_pairs, progress=False, group=group)
        return res["metrics"][f"recall@{k}"]
    return validate


def train_meta(cfg: Config, prepared: PreparedData, group: Group = SINGLE) -> MetaLearner:
    """Meta-trains (or resumes) in OUT; returns the learner at its best validation score."""
    if not prepared.train:
        raise DataError(f"{prepared.name}: no meta-train scenario; lower --min-items or raise --max-items")
    learner = build_learner(cfg, prepared)
    if cfg.train.warm_start:
        warm_start_omega(cfg, prepared, learner, group)
    valid = eval_tasks(prepared, "valid", cfg.run.seed)
    trainer = MetaTrainer(learner, TaskSampler(prepared, cfg.run.seed), prepared.train, cfg.train, cfg.run.out,
                          validate=validation_fn(cfg, valid, group) if valid else None,
                          keep_freed_memory=cfg.run.keep_freed_memory, group=group)
    start = time.perf_counter()
    summary = trainer.fit(resume=cfg.run.resume)
    log.info("meta-training: %d meta-steps, best validation %.4f, %.1f s", summary["step"], summary["best_score"],
             time.perf_counter() - start)
    return load_learner(cfg, prepared, group=group)


def warm_start_omega(cfg: Config, prepared: PreparedData, learner: MetaLearner, group: Group = SINGLE) -> None:
    """ω_R := the Global baseline's θ (OUT/global.pt, trained here if missing) before meta-training,
    or under ``warm_start_data: source`` the same training on the source domain alone.

    A departure from the paper, whose ω_R starts at a random init and learns only from
    meta-train scenario tasks: Global also trains on every source-domain interaction, so the
    learned init otherwise starts from less data than the baseline it must beat. Global has also
    trained on every meta-train scenario pair, the meta-train tasks' queries among them, so from
    its θ those tasks gain less from adapting than a new scenario does, and the stop controller
    learns to stop early; the source-only start has not seen them. On ``--resume`` the
    checkpoint's ω_R replaces this start, as every other trained parameter.
    """
    if learner.omega is None:
        raise ConfigError("warm_start needs a learned initialisation (init: learned); init: random has no ω_R")
    device = learner.omega.device
    # rank 0 trains and caches the start; the other ranks then read OUT/global.pt (global_source.pt)
    source_only = cfg.train.warm_start_data == "source"
    theta = distributed.writer_first(lambda: global_theta(cfg, prepared, learner.model, device, source_only), group)
    with torch.no_grad():
        learner.omega.copy_(theta.to(device=device, dtype=learner.omega.dtype))


def adaptation_stage(cfg: Config, prepared: PreparedData, learner: MetaLearner) -> Dict[str, Any]:
    """OUT/adaptation.json (adaptation gain, steps, α/β per scenario on the meta-valid and
    meta-test scenarios, the validation history) and OUT/validation_curve.png; see
    :mod:`s2meta_fast.eval.adaptation`."""
    last = os.path.join(cfg.run.out, LAST)
    history = checkpoints.load(last, map_location="cpu").get("history", []) if os.path.exists(last) else []
    stop = cfg.stop_at_evaluation
    valid = eval_tasks(prepared, "valid", cfg.run.seed)
    extra = {"valid": adaptation_report(learner, valid, seed=cfg.run.seed, block_size=cfg.eval.block_size,
                                        stop=stop)} if valid else {}
    return write_adaptation(cfg.run.out, learner, eval_tasks(prepared, "test", cfg.run.seed), history,
                            seed=cfg.run.seed, block_size=cfg.eval.block_size, stop=stop, extra=extra)


def load_learner(cfg: Config, prepared: PreparedData, checkpoint_path: Optional[str] = None,
                 group: Group = SINGLE) -> MetaLearner:
    """The learner of a checkpoint: `checkpoint_path`, else the run folder's (best.pt, else checkpoint.pt).

    Under torchrun rank 0 reads the file and hands the state to the others.
    """
    def read():
        path = checkpoint_path
        if path is None:
            path = run_folder.find_checkpoint(cfg.run.out)
        elif not os.path.exists(path):
            raise RunFolderError(f"checkpoint {path!r} does not exist")
        return path, checkpoints.load(path, map_location="cpu")

    checkpoint_path, state = distributed.from_writer(read, group)
    learner = build_learner(cfg, prepared)
    diffs = checkpoint_differences(state, learner)
    if diffs or "learner" not in state:
        raise CheckpointError(f"{checkpoint_path} is not a meta learner for these settings: "
                              f"{', '.join(diffs) or 'it holds no learner state'}")
    learner.load_state_dict(state["learner"])
    log.info("evaluating the meta learner of %s (meta-step %d)", checkpoint_path, state["step"])
    return learner


# --------------------------------------------------------------------------------------------
# baselines


def _global_key(cfg: Config) -> Dict[str, Any]:
    e = cfg.eval
    return {"model": cfg.train.model, "fused": cfg.meta.fused, "seed": cfg.run.seed, "steps": e.global_steps,
            "batch": e.global_batch, "lr": e.global_lr, "source": e.global_source}


def global_theta(cfg: Config, prepared: PreparedData, model: FlatRecommender, device: torch.device,
                 source_only: bool = False) -> torch.Tensor:
    """The Global baseline's θ, trained once per run folder and settings (OUT/global.pt); with
    `source_only`, the same training on the source-domain interactions alone
    (OUT/global_source.pt: the warm start of ``warm_start_data: source``)."""
    name = run_folder.GLOBAL_SOURCE_FILE if source_only else run_folder.GLOBAL_FILE
    path = os.path.join(cfg.run.out, name)
    key = dict(_global_key(cfg), scenarios=False) if source_only else _global_key(cfg)
    if source_only and len(prepared.source_users) == 0:
        raise DataError(f"{prepared.name}: warm_start_data: source needs source-domain interactions and this "
                        f"dataset has none; use warm_start_data: all")
    if os.path.exists(path):
        try:
            stored = checkpoints.load(path, map_location=device)
        except CheckpointError as error:
            log.warning("%s; retraining the Global baseline", error)
            stored = {}
        if stored.get("key") == key and "theta" in stored:
            return stored["theta"]
    e = cfg.eval
    gcfg = GlobalTrainConfig(steps=e.global_steps, batch_size=e.global_batch, lr=e.global_lr,
                             use_source=e.global_source or source_only, use_scenarios=not source_only)
    start = time.perf_counter()
    theta = train_global(model, prepared.user_emb.to(device), prepared.item_emb.to(device), prepared, gcfg,
                         seed=cfg.run.seed, progress=not cfg.run.quiet)
    log.info("%s: trained %d steps in %.1f s", "global (source domain only)" if source_only else "global", gcfg.steps,
             time.perf_counter() - start)
    checkpoints.save_atomic({"theta": theta.cpu(), "key": key}, path)
    return theta


def finetune_choice(cfg: Config, prepared: PreparedData, model: FlatRecommender,
                    theta: torch.Tensor) -> Dict[str, Any]:
    """(lr, steps) for Finetune from the meta-validation grid search (OUT/finetune.json)."""
    key = {"global": _global_key(cfg), "lrs": list(cfg.eval.finetune_lrs), "steps": list(cfg.eval.finetune_steps),
           "block_size": cfg.eval.block_size}

    def choose(valid: List[EvalTask]) -> Dict[str, Any]:
        device = theta.device
        grid = FinetuneGrid(lrs=cfg.eval.finetune_lrs, steps=cfg.eval.finetune_steps)
        choice = select_finetune(model, theta, prepared.user_emb.to(device), prepared.item_emb.to(device), valid,
                                 grid, seed=cfg.run.seed, block_size=cfg.eval.block_size)
        log.info("finetune: chose lr=%g, steps=%d (validation %s %.4f)", choice["lr"], choice["steps"], grid.metric,
                 choice["score"])
        return choice
    return _chosen_on_validation(cfg, prepared, os.path.join(cfg.run.out, run_folder.FINETUNE_FILE), key,
                                 "Finetune needs meta-validation scenarios to choose its lr and steps", choose)


def _chosen_on_validation(cfg: Config, prepared: PreparedData, path: str, key: Dict[str, Any], needs: str,
                          choose: Callable[[List[EvalTask]], Dict[str, Any]]) -> Dict[str, Any]:
    """A baseline's hyper-parameters, chosen by `choose` on the meta-validation scenarios and kept
    in `path` with `key` (reused while the key matches: same data, seed and grid)."""
    cached = run_folder.read_json(path)
    if cached is not None and cached.get("key") == key:
        return cached
    valid = eval_tasks(prepared, "valid", cfg.run.seed)
    if not valid:
        raise DataError(f"{prepared.name}: {needs}; the split has none "
                        f"(evaluate without it: --methods s2meta itempop global)")
    choice = choose(valid)
    choice["key"] = key
    run_folder.write_json(path, choice)
    return choice


def cross_domain_grid(cfg: Config, name: str) -> Dict[str, list]:
    """The grid searched for a cross-domain baseline: the paper's, or its reduced form."""
    grid = CROSS_DOMAIN[name].GRID if cfg.eval.baseline_grid == "paper" else reduced_grid(name)
    return {k: list(v) for k, v in grid.items()}


def cross_domain_choice(cfg: Config, prepared: PreparedData, name: str, domains: Any) -> Dict[str, Any]:
    """A cross-domain baseline's hyper-parameters, chosen on the meta-validation scenarios
    (OUT/baselines/<name>.json, reused while data, seed and grid are unchanged)."""
    grid = cross_domain_grid(cfg, name)
    key = {"data": cfg.to_dict()["data"], "seed": cfg.run.seed, "grid": grid, "block_size": cfg.eval.block_size}

    def choose(valid: List[EvalTask]) -> Dict[str, Any]:
        device = domains.users.device
        start = time.perf_counter()
        choice = select_cross_domain(name, domains, prepared.user_emb.to(device), prepared.item_emb.to(device),
                                     valid, grid, seed=cfg.run.seed, block_size=cfg.eval.block_size,
                                     progress=not cfg.run.quiet)
        choice["seconds"] = time.perf_counter() - start
        log.info("%s: chose %s (validation %s %.4f) in %.1f s", name, choice["hp"], choice["metric"],
                 choice["score"], choice["seconds"])
        return choice
    return _chosen_on_validation(cfg, prepared, os.path.join(cfg.run.out, BASELINES_DIR, f"{name}.json"), key,
                                 f"{name} needs meta-validation scenarios to choose its hyper-parameters", choose)


BASELINES_DIR = "baselines"


def make_method(name: str, cfg: Config, prepared: PreparedData, learner: Optional[MetaLearner] = None) -> Method:
    """The method `name` (a key of :data:`s2meta_fast.eval.METHODS`), ready to evaluate."""
    device = torch.device(cfg.run.device)
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {tuple(METHODS)}")
    if name == "itempop":
        return ItemPop(global_item_counts(prepared), device=device)
    if name == "s2meta":
        if learner is None:
            raise ValueError("s2meta needs a trained learner")
        return S2Meta(learner, stop=cfg.stop_at_evaluation)
    if name == "neumf":
        neumf = NeuMF(prepared.n_users, prepared.n_items, device=device)
        neumf.fit(prepared, eval_tasks(prepared, "test", cfg.run.seed), seed=cfg.run.seed, progress=not cfg.run.quiet)
        neumf.hyperparameters = {k: list(v) if isinstance(v, tuple) else v
                                 for k, v in dataclasses.asdict(neumf.cfg).items()}
        return neumf
    if name in CROSS_DOMAIN:
        domains = build_domains(prepared, device)
        hp = cross_domain_choice(cfg, prepared, name, domains)["hp"]
        method = CROSS_DOMAIN[name](domains, prepared.user_emb.to(device), prepared.item_emb.to(device), hp)
        method.hyperparameters = hp
        return method
    model = build_model(cfg.train.model, prepared.embed_dim, fused=cfg.meta.fused)
    theta = global_theta(cfg, prepared, model, device)
    user_emb, item_emb = prepared.user_emb.to(device), prepared.item_emb.to(device)
    if name == "global":
        return GlobalModel(model, theta, user_emb, item_emb)
    choice = finetune_choice(cfg, prepared, model, theta)
    method = Finetune(model, theta, user_emb, item_emb, choice["lr"], choice["steps"])
    method.hyperparameters = {"lr": choice["lr"], "steps": choice["steps"]}
    return method


# --------------------------------------------------------------------------------------------
# evaluation


def evaluate_methods(cfg: Config, prepared: PreparedData, learner: Optional[MetaLearner] = None,
                     stage_seconds: Optional[Mapping[str, float]] = None, group: Group = SINGLE) -> Dict[str, Any]:
    """Evaluates cfg.eval.methods on the meta-test scenarios and writes results.json/.md.

    `stage_seconds` (e.g. prepare, meta-training wall times of this process) go into the
    results' ``timings`` next to each method's. Under torchrun (`group`) the test scenarios are
    sharded over the ranks, rank 0 builds the baselines first (the others then read its cached
    files) and writes every file.
    """
    tasks = eval_tasks(prepared, "test", cfg.run.seed)
    if not tasks:
        raise DataError(f"{prepared.name}: no meta-test scenario; lower --min-items or raise --max-items")
    methods: Dict[str, Dict[str, float]] = {}
    timings: Dict[str, Any] = {k: round(v, 3) for k, v in (stage_seconds or {}).items()}
    n_users = None
    chosen: Dict[str, Any] = {}
    for name in cfg.eval.methods:
        path = run_folder.method_path(cfg.run.out, name)
        cached = distributed.from_writer(lambda: run_folder.read_json(path), group) if cfg.run.resume else None
        if cached is None:
            start = time.perf_counter()
            method = distributed.writer_first(lambda: make_method(name, cfg, prepared, learner), group)
            res = evaluate(method, tasks, cfg.eval.ks, seed=cfg.run.seed, device=cfg.run.device,
                           block_size=cfg.eval.block_size, max_pairs=cfg.eval.max_pairs,
                           progress=not cfg.run.quiet, desc=f"evaluate {name}", group=group)
            res["total_seconds"] = time.perf_counter() - start
            if getattr(method, "hyperparameters", None) is not None:
                res["hyperparameters"] = method.hyperparameters
            if group.is_writer:
                run_folder.write_json(path, res)
            cached = res
        methods[name] = cached["metrics"]
        if "hyperparameters" in cached:
            chosen[name] = cached["hyperparameters"]
        timings[name] = {"evaluate_s": round(cached["seconds"], 3),
                         "setup_and_evaluate_s": round(cached.get("total_seconds", cached["seconds"]), 3)}
        n_users = cached["n_users"]
        log.info("%-8s %s", name, "  ".join(f"{k}={v:.4f}" for k, v in cached["metrics"].items()
                                             if k.startswith("recall")))
    doc = build_results(prepared.name, cfg.run.seed, len(tasks), n_users, methods,
                        backend=_extension.backend().name, device=cfg.run.device, timings=timings,
                        hyperparameters=chosen, config=cfg.to_dict(), world_size=group.world_size,
                        dist_backend=group.backend)
    if group.is_writer:
        write_results(cfg.run.out, doc)
    return doc


# --------------------------------------------------------------------------------------------
# several processes (torchrun)


def data_fingerprint(prepared: PreparedData) -> str:
    """A digest of what meta-training reads: embeddings and the scenarios of each split."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(prepared.name.encode("utf-8"))
    for tensor in (prepared.user_emb, prepared.item_emb):
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for split in ("train", "valid", "test"):
        for scenario in prepared.scenarios(split):
            digest.update(f"{split}:{scenario.name}:{len(scenario.users)};".encode("utf-8"))
    return digest.hexdigest()


def check_ranks_agree(cfg: Config, prepared: Optional[PreparedData], group: Group) -> None:
    """Every rank runs the same config, software and (when given) data, or all stop with a ConfigError.

    Run control that may differ per process (quiet, resume) is left out.
    """
    if not group.active:
        return
    options = {k: v for k, v in cfg.options().items() if k not in ("quiet", "resume")}
    parts = {"config": "\n".join(f"{k}: {v!r}" for k, v in options.items()),
             "software": f"torch {torch.__version__}; kernels {_extension.backend().name}"}
    if prepared is not None:
        parts["data"] = data_fingerprint(prepared)
    distributed.check_same(parts, group)


__all__ = ["adaptation_stage", "build_learner", "check_device", "check_ranks_agree", "cross_domain_choice", "cross_domain_grid",
           "data_fingerprint", "eval_tasks", "evaluate_methods", "finetune_choice", "global_theta", "load_learner",
           "make_method", "prepare_data", "train_meta", "validation_fn", "warm_start_omega"]
