"""The run folder: what a command finds and leaves in OUT (``--out``).

    OUT/config.yaml            the resolved configuration (a resumed run must match it)
    OUT/checkpoint.pt, best.pt meta-training checkpoints (the trainer's own layout, with
    OUT/checkpoint.1.pt          the kept older ones)
    OUT/global.pt              the Global baseline's θ
    OUT/finetune.json          the Finetune (lr, steps) chosen on meta-validation scenarios
    OUT/methods/<name>.json    each method's metrics on the meta-test scenarios
    OUT/results.json, .md      the pooled results (written last)

Every file is written atomically, so a run killed at any point resumes from the last finished
stage (and meta-training from its last checkpoint). A command works in OUT/.staging under the
lock OUT/.lock (:func:`staged`); its files replace the previous run's only when it finishes.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

from ..config import Config, build_config, load_yaml
from ..errors import ConfigError, RunFolderError
from ..fileio import atomic_write_text
from ..meta import distributed
from ..meta.trainer import BEST, LAST
from .transaction import STAGING, RunTransaction

log = logging.getLogger("s2meta_fast")

CONFIG_FILE = "config.yaml"
GLOBAL_FILE = "global.pt"
GLOBAL_SOURCE_FILE = "global_source.pt"
FINETUNE_FILE = "finetune.json"
RESULT_FILES = ("results.json", "results.md")
ADAPTATION_FILES = ("adaptation.json", "validation_curve.png")
METHODS_DIR = "methods"

# Options that may change between an interrupted run and its resumption without changing results.
RESUME_FREE = {"quiet", "resume", "device", "methods", "out", "keep_freed_memory", "keep_checkpoints",
               "dist_backend"}


def clear_results(out: str) -> None:
    """Drops per-method results and results files: they are recomputed unless resuming."""
    for stale in RESULT_FILES + ADAPTATION_FILES:
        if os.path.exists(os.path.join(out, stale)):
            os.unlink(os.path.join(out, stale))
    methods = os.path.join(out, METHODS_DIR)
    if os.path.isdir(methods):
        for name in os.listdir(methods):
            os.unlink(os.path.join(methods, name))


def check_run_folder(cfg: Config) -> None:
    """Writes OUT/config.yaml, or on ``--resume`` checks the stored one matches (except run control)."""
    out = cfg.run.out
    path = os.path.join(out, CONFIG_FILE)
    if cfg.run.resume:
        if not os.path.exists(path):
            raise ConfigError(f"--resume: {out!r} holds no run to resume (no {CONFIG_FILE}); drop --resume to "
                              f"start one")
        stored = build_config(load_yaml(path), where=path).options()
        current = cfg.options()
        changed = [f"{name} ({stored[name]!r} -> {current[name]!r})" for name in current
                   if name not in RESUME_FREE and stored[name] != current[name]]
        if changed:
            raise ConfigError(f"--resume: the run in {out!r} used different settings: {', '.join(changed)}; "
                              f"resume with the same settings or start a new run in another --out")
    else:
        # A fresh run must not pick up a previous run's stages: its baselines used other data.
        for stale in (GLOBAL_FILE, GLOBAL_SOURCE_FILE, FINETUNE_FILE, BEST, LAST):
            if os.path.exists(os.path.join(out, stale)):
                os.unlink(os.path.join(out, stale))
        clear_results(out)
    atomic_write_text(path, cfg.to_yaml())


@contextlib.contextmanager
def staged(cfg: Config, carry: bool = False, group: distributed.Group = distributed.SINGLE) -> Iterator[Config]:
    """Runs a command's stages as a transaction on OUT (:mod:`.transaction`): yields the config
    of the staged run, whose files replace the previous run's only when the body returns.

    carry: start from the committed run's files (``evaluate`` rewrites only the results).
    group: under torchrun rank 0 holds the lock and commits; the other ranks work in the same
        staging folder (they read what rank 0 wrote there), and every rank is done before the commit.
    """
    if group.active and not group.is_writer:
        distributed.barrier(group)   # rank 0 has prepared the staging folder
        yield cfg.replace(out=os.path.join(cfg.run.out, STAGING))
        distributed.barrier(group)
        return
    with _transaction(cfg, carry) as staged_cfg:
        distributed.barrier(group)
        yield staged_cfg
        distributed.barrier(group)


@contextlib.contextmanager
def _transaction(cfg: Config, carry: bool) -> Iterator[Config]:
    with RunTransaction(cfg.run.out, resume=cfg.run.resume, carry=carry) as folder:
        if cfg.run.resume and not folder.has_run():
            raise ConfigError(f"--resume: {cfg.run.out!r} holds no run to resume (no {CONFIG_FILE}); drop --resume "
                              f"to start one")
        yield cfg.replace(out=folder.staging)
        # The staged files name the staging folder as `out`; the committed run names its own.
        config_path = os.path.join(folder.staging, CONFIG_FILE)
        if os.path.exists(config_path):
            stored = load_yaml(config_path)
            stored["out"] = cfg.run.out
            atomic_write_text(config_path, build_config(stored, where=config_path).to_yaml())
        results_path = os.path.join(folder.staging, RESULT_FILES[0])
        if os.path.exists(results_path):
            with open(results_path, encoding="utf-8") as fh:
                doc = json.load(fh)
            if isinstance(doc.get("config", {}).get("run"), dict):
                doc["config"]["run"]["out"] = cfg.run.out
            write_json(results_path, doc)
        folder.commit()


def stored_options(out: str) -> Optional[Dict[str, Any]]:
    """The options of OUT/config.yaml, or None when the folder holds none."""
    path = os.path.join(out, CONFIG_FILE)
    return load_yaml(path) if os.path.exists(path) else None


def find_checkpoint(out: str) -> str:
    """OUT/best.pt (the best validation score: model selection), else OUT/checkpoint.pt (the last state)."""
    for name in (BEST, LAST):
        candidate = os.path.join(out, name)
        if os.path.exists(candidate):
            return candidate
    raise RunFolderError(f"no trained meta learner in {out!r} ({BEST} or {LAST}); run `s2meta train --out {out}` first")


def checkpoint_and_config(checkpoint: str, overrides: Mapping[str, Any]) -> Tuple[str, Config]:
    """A checkpoint file (or a run folder's best one) and the run's config with `overrides` applied.

    The run's config.yaml must lie next to the checkpoint: it says how to rebuild the learner.
    """
    folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))
    if os.path.isdir(checkpoint):
        checkpoint = find_checkpoint(folder)
    elif not os.path.exists(checkpoint):
        raise RunFolderError(f"checkpoint {checkpoint!r} does not exist")
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.exists(path):
        raise RunFolderError(f"{path!r} is missing: the run's config must lie next to its checkpoint")
    return checkpoint, build_config(load_yaml(path), {**overrides, "out": folder}, where=path)


def read_json(path: str) -> Optional[Dict[str, Any]]:
    """A finished stage's JSON, or None when absent or damaged (the stage then runs again)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (ValueError, UnicodeDecodeError) as error:
        log.warning("%s is damaged (%s); recomputing it", path, str(error).splitlines()[0] if str(error) else error)
        return None
    return doc if isinstance(doc, dict) else None


def method_path(out: str, name: str) -> str:
    return os.path.join(out, METHODS_DIR, f"{name}.json")


def write_json(path: str, doc: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")


__all__ = ["CONFIG_FILE", "RESUME_FREE", "check_run_folder", "checkpoint_and_config", "clear_results",
           "find_checkpoint", "method_path", "read_json", "staged", "stored_options", "write_json"]
