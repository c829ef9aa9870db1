"""MetaTrainer: the outer loop of Algorithm 1 with meta-batches, checkpoints and resume."""
from __future__ import annotations

import dataclasses
import logging
import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import CheckpointError, ConfigError, TrainingError
from ..models import MODELS
from . import checkpoint, distributed
from .graphs import GraphedInnerLoop
from .host import training_host
from .learner import MetaLearner

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "sgd")
WARM_START_DATA = ("all", "source")
LAST = "checkpoint.pt"
BEST = "best.pt"
# The layout of a checkpoint's state; bump when a key or its meaning changes. Format 1 held one
# process's draw streams as "generator" and "sampler"; format 2 holds every rank's in "streams".
CHECKPOINT_FORMAT = 2
READABLE_FORMATS = (1, 2)
# Settings that may differ between a checkpoint and the learner restoring it: same parameters,
# same results (fused ops and their pure-PyTorch twins compute the same function).
_FREE_META = {"fused"}


def checkpoint_differences(state: Dict[str, Any], learner: MetaLearner) -> List[str]:
    """What makes a checkpoint's state unfit for `learner`: "name (checkpoint -> current)" each."""
    from .. import __version__

    diffs = []
    fmt = state.get("format", CHECKPOINT_FORMAT)
    if fmt not in READABLE_FORMATS:
        diffs.append(f"checkpoint format ({fmt}, s2meta_fast {state.get('package_version', '?')} -> "
                     f"{CHECKPOINT_FORMAT}, s2meta_fast {__version__})")
    model = {"kind": learner.model.kind, "embed_dim": learner.model.embed_dim}
    for key, value in model.items():
        stored = state.get("model", {}).get(key, value)
        if stored != value:
            diffs.append(f"model {key} ({stored!r} -> {value!r})")
    current = dataclasses.asdict(learner.config)
    for key, value in current.items():
        stored = state.get("meta_config", {}).get(key, value)
        if key not in _FREE_META and stored != value:
            diffs.append(f"{key} ({stored!r} -> {value!r})")
    return diffs


class NonFiniteMetaLoss(TrainingError):
    """Raised after `max_nonfinite` meta-steps in a row had a non-finite loss or gradient."""


class WorldSizeMismatch(CheckpointError):
    """A checkpoint holds the draw streams of another number of processes than the run resuming it."""


def checkpoint_streams(state: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The draw streams a checkpoint holds, one ``{"generator", "sampler"}`` per rank in rank order."""
    if "streams" in state:
        return list(state["streams"])
    return [{"generator": state["generator"], "sampler": state["sampler"]}]   # format 1: one process


def check_world_size(state: Dict[str, Any], group: distributed.Group, path: Any = "the checkpoint") -> None:
    """Raises :class:`WorldSizeMismatch` unless `state` holds one draw stream per rank of `group`:
    each rank continues its own stream, so another process count has no stream to continue."""
    written = len(checkpoint_streams(state))
    if written == group.world_size:
        return
    def processes(n: int) -> str:
        return "1 process" if n == 1 else f"{n} processes"
    launch = ("one process (no torchrun)" if written == 1
              else f"{written} processes (torchrun --nnodes x --nproc-per-node = {written})")
    raise WorldSizeMismatch(f"cannot resume from {path}: it holds the draw streams of {processes(written)} and this "
                            f"run has {processes(group.world_size)}; every rank continues its own stream, so resume "
                            f"on {launch} or start a new run")


@dataclass(frozen=True)
class TrainConfig:
    """Meta-training settings (the outer loop of Algorithm 1, docs/spec.md §5). Defaults follow the authors' code.

    These defaults are the one set the library and the command line share; the command line
    starts from a named preset on top of them (``s2meta_fast.config.PRESETS``: "demo", sized for a
    minutes-long CPU run, and "paper", the authors' settings). docs/method.md lists the
    departures from the authors' code and the option that restores each.

    Attributes:
        model: the recommender kind the learner is built around (a name in
            :data:`s2meta_fast.models.MODELS`); read by whoever builds the learner (the
            application), not by :class:`MetaTrainer`, which trains the learner it is given.
        meta_steps: meta-steps in total (each adapts ``meta_batch`` scenarios); what
            :meth:`MetaTrainer.fit` trains to when not given a count.
        optimizer: "adam" (authors' code) or "sgd" (the paper: lr 1e-4, weight decay 1e-5).
        lr_init, lr_update, lr_stop: Adam learning rates for ω_R, the update controller and the
            stop controller.
        weight_decay: Adam's L2 weight decay on every meta-parameter. 0 by default; the authors'
            code uses 1e-5 (1e-6 on Amazon), see docs/method.md.
        sgd_lr, sgd_weight_decay: the SGD settings (one learning rate for everything).
        grad_clip: gradient *value* clip (``clip_grad_value_``).
        meta_batch: B scenarios per meta-step; the meta-gradient is their mean.
        validate_every, checkpoint_every, log_every: in meta-steps; 0 disables.
        keep_checkpoints: how many of the latest periodic checkpoints are kept (``checkpoint.pt``
            newest, then ``checkpoint.1.pt``, ...), besides ``best.pt``; ``--resume`` falls back
            through them when the newest is damaged.
        plateau_factor, plateau_patience, min_lr: ReduceLROnPlateau on the validation score (max).
        max_nonfinite: abort after this many non-finite meta-steps in a row.
        seed: seeds the torch generator of the inner loops' random draws.
        cuda_graphs: capture the meta-step as a CUDA graph on CUDA devices.
        quiet: no progress bar and no info log lines.
        warm_start: ω_R starts from the Global baseline's θ (the same recommender trained on
            the meta-train scenarios and every source-domain interaction) instead of a random
            init. A departure from the paper (docs/method.md); the application layer trains
            Global and applies it, since only it has the data. On in the demo preset, where it
            won on meta-validation (docs/results.md).
        warm_start_data: what the warm start's θ is trained on: "all" (the Global baseline's θ
            itself) or "source" (the same recommender and Global settings on the source-domain
            interactions alone, so that ω_R starts without having seen the meta-train scenarios'
            pairs, from which the meta-train tasks' queries are drawn).
    """

    model: str = "interaction"
    meta_steps: int = 400
    optimizer: str = "adam"
    lr_init: float = 1e-4
    lr_update: float = 1e-4
    lr_stop: float = 5e-5
    weight_decay: float = 0.0
    sgd_lr: float = 1e-4
    sgd_weight_decay: float = 1e-5
    grad_clip: float = 0.25
    meta_batch: int = 1
    validate_every: int = 500
    checkpoint_every: int = 500
    log_every: int = 100
    keep_checkpoints: int = 2
    plateau_factor: float = 0.2
    plateau_patience: int = 2
    min_lr: float = 1e-6
    max_nonfinite: int = 10
    seed: int = 0
    cuda_graphs: bool = True
    quiet: bool = False
    warm_start: bool = False
    warm_start_data: str = "all"

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig: {message}")

        need(self.model in MODELS, f"model must be one of {tuple(MODELS)}, got {self.model!r}")
        need(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        need(self.warm_start_data in WARM_START_DATA,
             f"warm_start_data must be one of {WARM_START_DATA}, got {self.warm_start_data!r}")
        need(self.warm_start or self.warm_start_data == "all",
             f"warm_start_data {self.warm_start_data!r} has no effect without the warm start (warm_start: true, "
             f"--warm-start)")
        for name in ("lr_init", "lr_update", "lr_stop", "sgd_lr", "grad_clip"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        for name in ("weight_decay", "sgd_weight_decay"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("meta_batch", "max_nonfinite", "plateau_patience", "keep_checkpoints"):
            need(_is_int(getattr(self, name)) and getattr(self, name) >= 1,
                 f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        for name in ("meta_steps", "validate_every", "checkpoint_every", "log_every"):
            need(_is_int(getattr(self, name)) and getattr(self, name) >= 0,
                 f"{name} must be an int >= 0{'' if name == 'meta_steps' else ' (0 disables)'}, "
                 f"got {getattr(self, name)!r}")
        need(0 < self.plateau_factor < 1, f"plateau_factor must lie in (0, 1), got {self.plateau_factor}")

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _package_version() -> str:
    from .. import __version__
    return __version__


def build_optimizer(learner: MetaLearner, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam with per-part learning rates, or SGD with the paper's settings; empty groups dropped."""
    parts = [(learner.init_parameters(), cfg.lr_init, "init"), (learner.update_parameters(), cfg.lr_update, "update"),
             (learner.stop_parameters(), cfg.lr_stop, "stop")]
    if cfg.optimizer == "adam":
        groups = [{"params": params, "lr": lr, "name": name} for params, lr, name in parts if params]
        return torch.optim.Adam(groups, weight_decay=cfg.weight_decay)
    groups = [{"params": params, "name": name} for params, _, name in parts if params]
    return torch.optim.SGD(groups, lr=cfg.sgd_lr, weight_decay=cfg.sgd_weight_decay)


def _sampler_state(sampler) -> Any:
    if hasattr(sampler, "state_dict"):
        return sampler.state_dict()
    rng = getattr(sampler, "rng", None)
    if isinstance(rng, np.random.Generator):
        return {"rng": rng.bit_generator.state}
    return None


def _rank_stream(sampler, rank: int) -> None:
    """Gives `sampler` rank `rank`'s stream (rank 0 keeps the one it was built with)."""
    rng = getattr(sampler, "rng", None)
    if not isinstance(rng, np.random.Generator):
        raise ConfigError(f"distributed meta-training needs a task sampler that draws from a numpy Generator "
                          f"`rng`, from which each rank derives its own stream; {type(sampler).__name__} has none")
    sampler.rng = distributed.rank_rng(rng, rank)


def _restore_sampler(sampler, state) -> None:
    if state is None:
        warnings.warn("the checkpoint holds no task-sampler state (the sampler has neither state_dict() nor a "
                      "numpy `rng`): the resumed run draws different tasks than an uninterrupted one would")
        return
    if hasattr(sampler, "load_state_dict"):
        sampler.load_state_dict(state)
    else:
        sampler.rng.bit_generator.state = state["rng"]


class MetaTrainer:
    """Meta-trains a :class:`MetaLearner` on scenarios drawn by a task sampler.

    Args:
        learner: the MetaLearner (already on its device).
        sampler: an object with ``train_batch(scenarios, S) -> TaskBatch`` (s2meta_fast.data.TaskSampler).
            Its random state is checkpointed through ``state_dict()/load_state_dict()`` or, failing
            that, its numpy Generator attribute ``rng``. A distributed run needs the ``rng``: each
            rank other than 0 replaces it by its own stream (:func:`distributed.rank_rng`).
        train_scenarios: what ``sampler.train_batch`` draws from.
        cfg: a :class:`TrainConfig`.
        out_dir: where ``checkpoint.pt`` (every ``checkpoint_every`` steps and at the end) and
            ``best.pt`` (at the best validation score) go.
        validate: ``validate(learner) -> float``, higher is better (e.g. validation Recall@20);
            drives the plateau scheduler and the best checkpoint. Never pass a test metric.
        keep_freed_memory: on a CPU device, let :meth:`fit` set glibc's allocator to keep freed
            memory (:func:`s2meta_fast.meta.host.keep_freed_memory`): a CPU meta-step no longer
            faults its few hundred MB of saved states back in (docs/performance.md). Process-wide
            and never undone, hence off by default; ``s2meta`` turns it on.
        group: the :class:`~s2meta_fast.meta.distributed.Group` of a torchrun launch: each rank
            draws and adapts ``meta_batch / world_size`` scenarios from its own streams (seeded
            from ``cfg.seed`` and the rank) and the meta-gradients are averaged over ranks
            (docs/distributed.md); only rank 0 writes checkpoints and shows progress. Default:
            one process.
    """

    def __init__(self, learner: MetaLearner, sampler, train_scenarios, cfg: TrainConfig = TrainConfig(),
                 out_dir: str | Path = "checkpoints", validate: Optional[Callable[[MetaLearner], float]] = None,
                 keep_freed_memory: bool = False, group: distributed.Group = distributed.SINGLE):
        distributed.check_divisible(cfg.meta_batch, group)
        self.group = group
        self.learner, self.sampler, self.train_scenarios, self.cfg = learner, sampler, train_scenarios, cfg
        self.out_dir = Path(out_dir)
        self.validate = validate
        self.keep_freed_memory = keep_freed_memory
        self.device = learner.user_emb.device
        self.optimizer = build_optimizer(learner, cfg)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience, min_lr=cfg.min_lr)
        self.generator = torch.Generator(device=self.device).manual_seed(distributed.rank_seed(cfg.seed, group.rank))
        if group.active:
            _rank_stream(sampler, group.rank)
        self.step_fn = GraphedInnerLoop(learner, "meta_step", enabled=cfg.cuda_graphs)
        if self.device.type == "cuda" and not self.step_fn.active:
            log.info("meta-steps run eagerly: %s", self.step_fn.fallback_reason)
        self.step = 0
        self.best_score = -math.inf
        self.nonfinite_streak = 0
        self.history: List[Dict[str, float]] = []
        self._saved_step: Optional[int] = None

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The whole training state. In a distributed run every rank must call it together: it
        gathers every rank's draw streams (``"streams"``, in rank order)."""
        mine = {"generator": self.generator.get_state(), "sampler": _sampler_state(self.sampler)}
        return {
            "step": self.step,
            "learner": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "streams": distributed.gather_objects(mine, self.group),
            "python_rng": random.getstate(),
            "numpy_rng": np.random.get_state(),
            "torch_rng": torch.get_rng_state(),
            "best_score": self.best_score,
            "nonfinite_streak": self.nonfinite_streak,
            "history": list(self.history),
            "meta_config": dataclasses.asdict(self.learner.config),
            "train_config": dataclasses.asdict(self.cfg),
            "model": {"kind": self.learner.model.kind, "embed_dim": self.learner.model.embed_dim},
            "format": CHECKPOINT_FORMAT,
            "package_version": _package_version(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores a :meth:`state_dict`; this rank continues its own stream of the checkpoint's."""
        check_world_size(state, self.group)
        mine = checkpoint_streams(state)[self.group.rank]
        self.learner.load_state_dict(state["learner"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        generator = mine["generator"]
        self.generator.set_state(generator.cpu() if hasattr(generator, "cpu") else generator)
        _restore_sampler(self.sampler, mine["sampler"])
        random.setstate(state["python_rng"])
        np.random.set_state(state["numpy_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.best_score = state["step"], state["best_score"]
        self.nonfinite_streak, self.history = state["nonfinite_streak"], list(state["history"])

    def save(self, name: str = LAST) -> Path:
        if name == LAST:
            self._saved_step = self.step
        state = self.state_dict()   # on every rank: it gathers their streams for rank 0 to write
        if not self.group.is_writer:
            return self.out_dir / name
        if name == LAST:
            return checkpoint.rotate_save(state, self.out_dir / name, self.cfg.keep_checkpoints)
        return checkpoint.save_atomic(state, self.out_dir / name)

    def checkpoint_files(self) -> List[Path]:
        """Every checkpoint this trainer may have written: the kept series, then ``best.pt``."""
        return checkpoint.series(self.out_dir / LAST, self.cfg.keep_checkpoints) + [self.out_dir / BEST]

    def _resume(self) -> None:
        """Continues from the newest intact checkpoint, saying which damaged ones were passed over.

        Rank 0 reads and checks it and hands the state (or the error) to every rank, so all ranks
        resume from the same checkpoint, each rank with its own stream from it.
        """
        def read():
            files = self.checkpoint_files()
            path, state, damaged = checkpoint.newest_intact(files, map_location="cpu")
            if path is None and not damaged:
                return None
            if path is None:
                raise CheckpointError(f"cannot resume: no intact checkpoint in {self.out_dir}: "
                                      + "; ".join(reason for _, reason in damaged)
                                      + ". Delete them to start over, or start a new run without --resume")
            diffs = checkpoint_differences(state, self.learner)
            if diffs:
                raise CheckpointError(f"cannot resume from {path}: it was written with other settings: "
                                      f"{', '.join(diffs)}; resume with the same settings or start a new run")
            check_world_size(state, self.group, path)
            if damaged:
                log.warning("%s; resuming from %s (meta-step %d), the newest intact checkpoint",
                            "; ".join(reason for _, reason in damaged), path, state["step"])
            return str(path), state

        found = distributed.from_writer(read, self.group)
        if found is None:
            self._info("no checkpoint in %s; starting from scratch", self.out_dir)
            return
        path, state = found
        self.load_state_dict(state)
        self._info("resumed from %s at meta-step %d", path, self.step)

    # -- training -----------------------------------------------------------------------------
    def fit(self, meta_steps: Optional[int] = None, resume: bool = False) -> Dict[str, Any]:
        """Trains until `meta_steps` meta-steps in total have been taken.

        Args:
            meta_steps: the total step count (a resumed run continues to the same total);
                default ``cfg.meta_steps``.
            resume: continue from the newest intact checkpoint in ``out_dir`` (the kept series and
                ``best.pt``) when there is one; every one there damaged is a CheckpointError.

        Returns:
            ``{"step", "best_score", "history"}``.
        """
        cfg = self.cfg
        meta_steps = cfg.meta_steps if meta_steps is None else meta_steps
        if resume:
            self._resume()
        if self.step == 0 and self.validate is not None and cfg.validate_every and not self.history:
            # The learner as it starts (ω_R warm-started from Global, say) is a candidate
            # for best.pt too; the score does not drive the plateau scheduler.
            self._record({"step": 0, "valid_score": self._validate(schedule=False)})
        running: Dict[str, float] = {"loss": 0.0, "query": 0.0, "reinforce": 0.0, "steps": 0.0, "n": 0}
        params = [p for p in self.learner.parameters() if p.requires_grad]
        bar = tqdm(total=meta_steps, initial=self.step, disable=cfg.quiet or not self.group.is_writer,
                   desc="meta-train", unit="step")
        try:
            with training_host(self.device, keep_memory=self.keep_freed_memory):
                self._train_until(meta_steps, running, params, bar)
        finally:
            bar.close()
        if self._saved_step != self.step:   # a periodic save at the last step already holds this state
            self.save()
        distributed.barrier(self.group)   # the final checkpoint is on disk before any rank reads it
        return {"step": self.step, "best_score": self.best_score, "history": self.history}

    def _train_until(self, meta_steps: int, running: Dict[str, float], params, bar) -> None:
        cfg = self.cfg
        share = cfg.meta_batch // self.group.world_size
        while self.step < meta_steps:
            batch = self.sampler.train_batch(self.train_scenarios, share).to(self.device)
            noise = self.learner.draw_noise(batch, self.generator)
            terms = self.step_fn(batch, noise)
            if self.group.active:
                stats = torch.stack([terms.total, terms.query_loss.mean(), terms.reinforce.mean(),
                                     terms.steps.to(terms.total.dtype).mean()])
                stats = distributed.average_gradients(params, stats, self.group)
                terms = dataclasses.replace(terms, total=stats[0], query_loss=stats[1:2], reinforce=stats[2:3],
                                            steps=stats[3:4])   # the global batch's means, for the log
            if self._finite(terms.total, params):
                self.nonfinite_streak = 0
                torch.nn.utils.clip_grad_value_(params, cfg.grad_clip)
                self.optimizer.step()
                running["loss"] += float(terms.total)
                running["query"] += float(terms.query_loss.mean())
                running["reinforce"] += float(terms.reinforce.mean())
                running["steps"] += float(terms.steps.float().mean())
                running["n"] += 1
            else:
                self._skip_nonfinite(terms, params)
            self.step += 1
            bar.update(1)
            self._periodic(running)

    def _finite(self, total: torch.Tensor, params) -> bool:
        checks = [torch.isfinite(total).all()]
        checks += [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
        return bool(torch.stack(checks).all())  # the one host sync per meta-step

    def _skip_nonfinite(self, terms, params) -> None:
        self.nonfinite_streak += 1
        for param in params:
            param.grad = None
        warnings.warn(f"meta-step {self.step + 1}: non-finite meta-loss or meta-gradient "
                      f"(loss {float(terms.total)}); step skipped "
                      f"({self.nonfinite_streak}/{self.cfg.max_nonfinite} in a row)", RuntimeWarning)
        if self.nonfinite_streak >= self.cfg.max_nonfinite:
            raise NonFiniteMetaLoss(
                f"{self.nonfinite_streak} meta-steps in a row had a non-finite meta-loss or gradient "
                f"(last at meta-step {self.step + 1}); aborting. The last good checkpoint is "
                f"{self.out_dir / LAST}; lower the learning rates or check the embeddings for NaN/inf.")

    def _periodic(self, running: Dict[str, float]) -> None:
        cfg, step = self.cfg, self.step
        record: Dict[str, float] = {}
        if cfg.log_every and step % cfg.log_every == 0 and running["n"]:
            n = running["n"]
            record = {"step": step, "loss": running["loss"] / n, "query_loss": running["query"] / n,
                      "reinforce": running["reinforce"] / n, "mean_steps": running["steps"] / n}
            running.update(loss=0.0, query=0.0, reinforce=0.0, steps=0.0, n=0)
        if self.validate is not None and cfg.validate_every and step % cfg.validate_every == 0:
            record.setdefault("step", step)
            record["valid_score"] = self._validate()
        if record:
            self._record(record)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            self.save()

    def _validate(self, schedule: bool = True) -> float:
        """Scores the learner on meta-validation; a new best is saved as ``best.pt``."""
        score = float(self.validate(self.learner))
        if schedule:
            self.scheduler.step(score)
        if score > self.best_score:
            self.best_score = score
            self.save(BEST)
        return score

    def _record(self, record: Dict[str, float]) -> None:
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        self.history.append(record)
        self._info("meta-step %d: %s", record["step"],
                   "  ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "step"))

    def _info(self, message: str, *args) -> None:
        if not self.cfg.quiet and self.group.is_writer:
            log.info(message, *args)
