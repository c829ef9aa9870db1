"""``s2meta compare``: the paper's comparison (Tables 3 and 4, the architecture study) over seeds.

A study folder DIR (``--out``) holds one run folder per (unit, seed), where a unit is the main
run (every method asked for), an ablation (s²Meta only, trained with the ablation's settings and
evaluated as trained) or an extra recommender architecture (s²Meta only):

    DIR/study.json                    the settings shared by every run (a rerun must match them)
    DIR/runs/<unit>-seed<k>/          an ordinary run folder (config.yaml, checkpoints, methods/, results.json)
    DIR/compare.json, compare.md      the study's results (written last, atomically)
    DIR/recall20.png                  Recall@20 per method, mean and std over seeds

Each run folder resumes on its own (meta-training from its checkpoint, every finished method
from methods/<name>.json), so an interrupted study continues where it stopped; a (unit, seed)
whose results.json already covers what is asked is not run again. Prepared data and embeddings
are cached by the data layer and shared by every unit of a seed.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from ..config import Config, build_config
from ..errors import ConfigError
from ..eval.methods import DISPLAY, METHODS
from ..eval.metrics import metric_keys
from ..fileio import atomic_write, atomic_write_text
from ..models import MODELS
from . import run_folder

log = logging.getLogger("s2meta_fast")

# Table 4: each ablation's options over the study's (the paper's settings: SGD at 0.01, 20 steps).
# RandInit has no ω_R, so nothing to warm-start: it turns the warm start off whatever the study's.
ABLATIONS: Dict[str, Dict[str, Any]] = {"randinit": {"init": "random", "warm_start": False, "warm_start_data": "all"},
                                        "fixedlr": {"update": "sgd", "inner_lr": 0.01},
                                        "fixedstep": {"stop": "fixed", "steps": 20}}
ABLATION_DISPLAY = {"randinit": "RandInit", "fixedlr": "FixedLr", "fixedstep": "FixedStep"}
STUDY_FILE = "study.json"
RUNS_DIR = "runs"
HEADROOM_GRID = {"lrs": (0.001, 0.01, 0.1, 1.0, 10.0), "steps": (1, 2, 5, 10, 20, 50, 100, 200)}
BOOTSTRAP = 2000

# Options every run of a study shares; the rest are set per unit or may change between sessions.
_PER_RUN = {"seed", "out", "resume", "quiet", "device", "methods", "keep_freed_memory", "model", "init", "update",
            "inner_lr", "stop", "steps"}


@dataclass(frozen=True)
class Study:
    """What to compare: methods of the main run, ablations, extra architectures, seeds."""

    methods: Tuple[str, ...]
    ablations: Tuple[str, ...] = ()
    architectures: Tuple[str, ...] = ()
    seeds: Tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ConfigError(f"--methods: unknown method {', '.join(map(repr, bad)) or '(none given)'}; "
                              f"valid: all, {', '.join(METHODS)}")
        bad = [a for a in self.ablations if a not in ABLATIONS]
        if bad:
            raise ConfigError(f"--ablations: unknown ablation {', '.join(map(repr, bad))}; valid: all, "
                              f"{', '.join(ABLATIONS)}")
        bad = [a for a in self.architectures if a not in MODELS]
        if bad:
            raise ConfigError(f"--architectures: unknown architecture {', '.join(map(repr, bad))}; valid: all, "
                              f"{', '.join(MODELS)}")
        if not self.seeds:
            raise ConfigError("--seeds: no seed given; e.g. --seeds 0,1,2")
        if any(not isinstance(s, int) or s < 0 for s in self.seeds) or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"--seeds: need distinct non-negative integers, got {list(self.seeds)}")
        if (self.ablations or self.architectures) and "s2meta" not in self.methods:
            raise ConfigError("--methods: ablations and architectures are compared with s²Meta; include s2meta")


def parse_names(text: Optional[str], valid: Sequence[str]) -> Tuple[str, ...]:
    """``all`` → every valid name; ``a,b c`` → (a, b, c) in the order given; None/"" → ()."""
    if text is None:
        return ()
    names = [n for part in text.replace(",", " ").split() for n in [part.strip()] if n]
    return tuple(valid) if names == ["all"] else tuple(dict.fromkeys(names))


def parse_seeds(text: str) -> Tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.replace(",", " ").split())
    except ValueError:
        raise ConfigError(f"--seeds: expected integers like 0,1,2, got {text!r}") from None


def _units(cfg: Config, study: Study) -> List[Tuple[str, str, Dict[str, Any]]]:
    """(kind, unit name, option overrides) in report order."""
    units = [("main", "main", {"methods": study.methods})]
    units += [("ablation", a, {**ABLATIONS[a], "methods": ("s2meta",)}) for a in study.ablations]
    units += [("architecture", m, {"model": m, "methods": ("s2meta",)}) for m in study.architectures
              if m != cfg.train.model]
    return units


def _shared_options(cfg: Config) -> Dict[str, Any]:
    return {k: v for k, v in cfg.options().items() if k not in _PER_RUN}


def check_study_folder(cfg: Config) -> None:
    """Refuses a folder holding a study made with other shared settings (naming the first flag)."""
    stored = run_folder.read_json(os.path.join(cfg.run.out, STUDY_FILE))
    if stored is None:
        return
    current = _shared_options(cfg)
    for name, value in current.items():
        if name in stored["options"] and stored["options"][name] != value:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag}: {cfg.run.out!r} holds a study made with {name}={stored['options'][name]!r} "
                              f"(now {value!r}); use the same settings or another --out")
    if stored.get("model") not in (None, cfg.train.model):
        raise ConfigError(f"--model: {cfg.run.out!r} holds a study of model={stored['model']!r} (now "
                          f"{cfg.train.model!r}); use the same settings or another --out")


def _done(out: str, methods: Sequence[str]) -> Optional[Dict[str, Any]]:
    doc = run_folder.read_json(os.path.join(out, "results.json"))
    if doc is None or any(m not in doc["methods"] for m in methods):
        return None
    return doc


def compare(cfg: Config, study: Study, run: Callable[[Config], Dict[str, Any]],
            headroom: Optional[Callable[[Config], Dict[str, Any]]] = None) -> Dict[str, Any]:
    """Runs every (unit, seed) not yet done, then writes compare.json/.md and the chart.

    `run` is :func:`s2meta_fast.app.commands.run`; `headroom(cfg)` (optional) measures the oracle
    fine-tuning bound in a main run folder. Returns the compare.json document.
    """
    out = cfg.run.out
    check_study_folder(cfg)
    units = _units(cfg, study)
    atomic_write_text(os.path.join(out, STUDY_FILE),
                      json.dumps({"options": _shared_options(cfg), "model": cfg.train.model}, indent=2) + "\n")
    grid = [(u, seed) for u in units for seed in study.seeds]
    results: Dict[Tuple[str, int], Dict[str, Any]] = {}
    walls: Dict[str, Dict[int, float]] = {}
    bar = tqdm(grid, desc="compare", unit="run", disable=cfg.run.quiet)
    for (kind, name, overrides), seed in bar:
        bar.set_postfix_str(f"{name} seed {seed}")
        folder = os.path.join(out, RUNS_DIR, f"{name}-seed{seed}")
        doc = _done(folder, overrides["methods"])
        if doc is None:
            resume = os.path.exists(os.path.join(folder, run_folder.CONFIG_FILE))
            ucfg = cfg.replace(seed=seed, out=folder, resume=resume, quiet=True, **overrides)
            start = time.perf_counter()
            doc = run(ucfg)
            log.info("compare: %s seed %d in %.1f s", name, seed, time.perf_counter() - start)
        results[(name, seed)] = doc
        if kind == "main" and headroom is not None:
            path = os.path.join(folder, "headroom.json")
            if run_folder.read_json(path) is None:
                run_folder.write_json(path, headroom(build_config(doc["config"], {"out": folder, "quiet": True})))
    bar.close()
    document = build_compare(cfg, study, units, results, out)
    atomic_write_text(os.path.join(out, "compare.json"), json.dumps(document, indent=2) + "\n")
    atomic_write_text(os.path.join(out, "compare.md"), compare_markdown(document))
    draw_chart(document, os.path.join(out, "recall20.png"))
    return document


# --------------------------------------------------------------------------------------------
# statistics


def _mean_std(values: Sequence[Mapping[str, float]]) -> Tuple[Dict[str, float], Dict[str, float]]:
    keys = list(values[0])
    arr = np.array([[v[k] for k in keys] for v in values], dtype=np.float64)
    std = arr.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(len(keys))
    return dict(zip(keys, arr.mean(axis=0).tolist())), dict(zip(keys, std.tolist()))


def paired_bootstrap(ours: Sequence[Mapping[str, Any]], theirs: Sequence[Mapping[str, Any]], metric: str,
                     n: int = BOOTSTRAP, seed: int = 0) -> Dict[str, Any]:
    """Mean over seeds of (ours − theirs) on the pooled `metric`, with a 95 % percentile bootstrap
    interval: each resample draws every seed's test scenarios with replacement (the same draw for
    both methods, which saw the same scenarios) and pools their per-scenario sums.

    `ours` / `theirs`: per seed, ``{scenario: {"count", "sums"}}`` (protocol.evaluate's per_scenario).
    """
    rng = np.random.default_rng(seed)
    point, draws = [], np.zeros(n)
    for a, b in zip(ours, theirs):
        names = sorted(a)
        if sorted(b) != names:
            raise ValueError("paired_bootstrap: the two methods were evaluated on different scenarios")
        sa = np.array([a[s]["sums"][metric] for s in names])
        sb = np.array([b[s]["sums"][metric] for s in names])
        cnt = np.array([a[s]["count"] for s in names], dtype=np.float64)
        point.append((sa.sum() - sb.sum()) / cnt.sum())
        idx = rng.integers(0, len(names), size=(n, len(names)))
        draws += (sa[idx].sum(1) - sb[idx].sum(1)) / np.maximum(cnt[idx].sum(1), 1.0)
    draws /= len(point)
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return {"metric": metric, "diff": float(np.mean(point)), "ci95": [float(lo), float(hi)],
            "excludes_zero": bool(lo > 0 or hi < 0), "n_bootstrap": n}


def per_scenario(folder: str, method: str) -> Optional[Dict[str, Any]]:
    """A run folder's per-scenario metric sums of `method` (None when it was not evaluated)."""
    doc = run_folder.read_json(run_folder.method_path(folder, method))
    return None if doc is None else doc.get("per_scenario")


def build_compare(cfg: Config, study: Study, units: Sequence[Tuple[str, str, Dict[str, Any]]],
                  results: Mapping[Tuple[str, int], Mapping[str, Any]], out: str) -> Dict[str, Any]:
    seeds = list(study.seeds)
    rows: Dict[str, Dict[str, Any]] = {"methods": {}, "ablations": {}, "architectures": {}}
    section = {"main": "methods", "ablation": "ablations", "architecture": "architectures"}
    scen: Dict[Tuple[str, str], List[Any]] = {}
    for kind, name, overrides in units:
        for method in overrides["methods"]:
            row_name = method if kind == "main" else name
            per_seed = {seed: results[(name, seed)]["methods"][method] for seed in seeds}
            mean, std = _mean_std([per_seed[s] for s in seeds])
            row: Dict[str, Any] = {"mean": mean, "std": std, "per_seed": {str(s): v for s, v in per_seed.items()}}
            hps = {str(s): results[(name, s)].get("hyperparameters", {}).get(method) for s in seeds}
            if any(v is not None for v in hps.values()):
                row["hyperparameters"] = hps
            row["seconds"] = {str(s): results[(name, s)].get("timings", {}).get(method) for s in seeds}
            rows[section[kind]][row_name] = row
            scen[(section[kind], row_name)] = [
                per_scenario(os.path.join(out, RUNS_DIR, f"{name}-seed{s}"), method) for s in seeds]
    if "s2meta" in rows["methods"]:
        rows["architectures"] = {cfg.train.model: rows["methods"]["s2meta"], **rows["architectures"]}
        rows["ablations"] = {"complete": rows["methods"]["s2meta"], **rows["ablations"]}
    paired: Dict[str, Any] = {}
    ours = scen.get(("methods", "s2meta"))
    if ours is not None and all(x is not None for x in ours):
        for (sec, name), theirs in scen.items():
            if (sec, name) == ("methods", "s2meta") or any(x is None for x in theirs):
                continue
            paired[f"{sec}/{name}"] = paired_bootstrap(ours, theirs, "recall@20")
    headroom = {str(s): run_folder.read_json(os.path.join(out, RUNS_DIR, f"main-seed{s}", "headroom.json"))
                for s in seeds}
    first = results[(units[0][1], seeds[0])]
    return {"dataset": first["dataset"], "seeds": seeds, "n_test_scenarios": {str(s): results[("main", s)]
                                                                               ["n_test_scenarios"] for s in seeds},
            "study": {"methods": list(study.methods), "ablations": list(study.ablations),
                      "architectures": list(study.architectures)},
            **rows, "paired_vs_s2meta": paired,
            "headroom": {k: v for k, v in headroom.items() if v is not None},
            "options": _shared_options(cfg)}


# --------------------------------------------------------------------------------------------
# report


def _cell(row: Mapping[str, Any], key: str) -> str:
    return f"{100 * row['mean'][key]:.2f} ± {100 * row['std'][key]:.2f}"


def _table(rows: Mapping[str, Mapping[str, Any]], names: Mapping[str, str], keys: Sequence[str]) -> List[str]:
    head = ["Method"] + [k.replace("hit", "HitRate").replace("recall", "Recall").replace("ndcg", "NDCG")
                         for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(keys)) + "|"]
    for name, row in rows.items():
        lines.append(f"| {names.get(name, name)} | " + " | ".join(_cell(row, k) for k in keys) + " |")
    return lines


def _method_order(rows: Mapping[str, Any]) -> Dict[str, Any]:
    order = [m for m in METHODS if m != "s2meta"] + ["s2meta"]
    return {m: rows[m] for m in order if m in rows}


def compare_markdown(doc: Mapping[str, Any]) -> str:
    keys = metric_keys((10, 20, 50))
    keys = [k for k in keys if k in next(iter(doc["methods"].values()))["mean"]]
    seeds = ", ".join(map(str, doc["seeds"]))
    lines = [f"# Comparison on {doc['dataset']} (seeds {seeds})", "",
             "Values in %, mean ± standard deviation over seeds; each seed is an independent replicate "
             "(scenario split, embeddings, training, evaluation draws).", "",
             "## Table 3: top-N recommendation on the meta-test scenarios", ""]
    lines += _table(_method_order(doc["methods"]), DISPLAY, keys)
    if len(doc.get("ablations", {})) > 1:
        lines += ["", "## Table 4: ablations of s²Meta (each trained and evaluated with its own settings)", ""]
        lines += _table(doc["ablations"], {"complete": "Complete", **ABLATION_DISPLAY}, keys)
    if len(doc.get("architectures", {})) > 1:
        lines += ["", "## Recommender architectures under s²Meta", ""]
        lines += _table(doc["architectures"], {}, keys)
    if doc.get("paired_vs_s2meta"):
        lines += ["", "## s²Meta minus each method: Recall@20, paired over test scenarios and seeds", "",
                  "Mean difference over seeds in points, 95 % bootstrap interval (test scenarios resampled "
                  "with replacement, the same draw for both methods); * marks an interval that excludes 0.", "",
                  "| vs | difference | 95 % CI | |", "|---|---:|---:|---|"]
        for key, p in doc["paired_vs_s2meta"].items():
            sec, name = key.split("/")
            label = {"complete": "Complete", **ABLATION_DISPLAY, **DISPLAY}.get(name, name)
            label += "" if sec == "methods" else f" ({sec[:-1]})"
            lines.append(f"| {label} | {100 * p['diff']:+.2f} | [{100 * p['ci95'][0]:+.2f}, "
                         f"{100 * p['ci95'][1]:+.2f}] | {'*' if p['excludes_zero'] else ''} |")
    if doc.get("headroom"):
        lines += ["", "## Headroom (an upper-bound diagnostic, not a method)", "",
                  "Global's θ fine-tuned with the one (lr, steps) that is best **on the meta-test scenarios "
                  "themselves**: how much any adapter of this recommender could gain from 64 support pairs "
                  "on these scenarios. If the bound is close to Global, the data cannot separate adapters.", "",
                  "| seed | Global Recall@20 | oracle fine-tuning Recall@20 (chosen on test) | (lr, steps) |",
                  "|---|---:|---:|---|"]
        for seed, h in doc["headroom"].items():
            lines.append(f"| {seed} | {100 * h['global']:.2f} | {100 * h['oracle']:.2f} | "
                         f"({h['lr']:g}, {h['steps']}) |")
    hp_lines = []
    for name, row in _method_order(doc["methods"]).items():
        if "hyperparameters" in row:
            chosen = "; ".join(f"seed {s}: " + ", ".join(f"{k}={v}" for k, v in (hp or {}).items())
                               for s, hp in row["hyperparameters"].items())
            hp_lines.append(f"- {DISPLAY.get(name, name)}: {chosen}")
    if hp_lines:
        grid = doc.get("options", {}).get("baseline_grid")
        lines += ["", "## Hyper-parameters", "",
                  f"Chosen on the meta-validation scenarios (CDCF, CMF, EMCDR, CoNet from the {grid} grids; "
                  "Finetune from its grid); NeuMF's are fixed.", ""] + hp_lines
    return "\n".join(lines) + "\n"


def draw_chart(doc: Mapping[str, Any], path: str) -> None:
    """A bar chart of Recall@20 (mean, std error bars over seeds) per method, ablation, architecture."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(DISPLAY.get(n, n), r) for n, r in _method_order(doc["methods"]).items()]
    bars += [(ABLATION_DISPLAY[n], r) for n, r in doc.get("ablations", {}).items() if n in ABLATION_DISPLAY]
    bars += [(f"s²Meta/{n}", r) for n, r in doc.get("architectures", {}).items()
             if r is not doc["methods"].get("s2meta")]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(bars)), 4.0))
    means = [100 * r["mean"]["recall@20"] for _, r in bars]
    stds = [100 * r["std"]["recall@20"] for _, r in bars]
    ax.bar(range(len(bars)), means, yerr=stds, capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(bars)), [n for n, _ in bars], rotation=30, ha="right")
    low = min(m - s for m, s in zip(means, stds))
    ax.set_ylim(max(0.0, math.floor(low / 10) * 10 - 5), 100)
    ax.set_ylabel("Recall@20 (%)")
    ax.set_title(f"{doc['dataset']}: Recall@20, mean ± std over seeds {doc['seeds']}")
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


__all__ = ["ABLATIONS", "Study", "build_compare", "check_study_folder", "compare", "compare_markdown", "draw_chart",
           "paired_bootstrap", "parse_names", "parse_seeds", "per_scenario"]
