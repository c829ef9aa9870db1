"""results.json and results.md: the run's outputs, written atomically (temp file + os.replace)."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Sequence

from ..fileio import atomic_write_text
from .methods import DISPLAY, METHODS
from .metrics import METRIC_NAMES

# Table 3 lists baselines first and s²Meta last, followed by its improvement over the best one;
# results.json lists s²Meta first (the documented file layout).
JSON_ORDER = tuple(METHODS)
METHOD_ORDER = JSON_ORDER[1:] + JSON_ORDER[:1]
HEADINGS = {"recall": "Recall", "ndcg": "NDCG", "hit": "HitRate"}


def build_results(dataset: str, seed: int, n_test_scenarios: int, n_test_users: int,
                  methods: Mapping[str, Mapping[str, float]], **extra: Any) -> Dict[str, Any]:
    """The results.json document: the fixed keys first, anything else (timings, backend) after."""
    doc: Dict[str, Any] = {"dataset": dataset, "seed": int(seed), "n_test_scenarios": int(n_test_scenarios),
                           "n_test_users": int(n_test_users),
                           "methods": {name: {k: float(v) for k, v in methods[name].items()}
                                       for name in _ordered(methods, JSON_ORDER)}}
    for key, value in extra.items():
        if key in doc:
            raise ValueError(f"extra result key {key!r} would overwrite a fixed key")
        doc[key] = value
    return doc


def _ordered(methods: Mapping[str, Any], order: Sequence[str] = METHOD_ORDER) -> list:
    known = [m for m in order if m in methods]
    return known + sorted(m for m in methods if m not in order)


def _ks(methods: Mapping[str, Mapping[str, float]], metric: str) -> list:
    keys = next(iter(methods.values())).keys() if methods else []
    return sorted(int(k.split("@")[1]) for k in keys if k.startswith(metric + "@"))


def markdown_table(doc: Mapping[str, Any], metrics: Sequence[str] = METRIC_NAMES) -> str:
    """Table 3's layout: one row per method, metric@K columns in percent, then s²Meta's improvement
    over the best baseline per column (relative, in percent, as in the paper)."""
    methods = doc["methods"]
    order = _ordered(methods)
    columns = [(m, k) for m in metrics for k in _ks(methods, m)]
    head = ["Method"] + [f"{HEADINGS.get(m, m)}@{k}" for m, k in columns]
    lines = [f"Top-N results on the {doc['n_test_scenarios']} meta-test scenarios of {doc['dataset']} "
             f"(seed {doc['seed']}, {doc['n_test_users']} (scenario, user) pairs), in %.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|"]
    for name in order:
        cells = [f"{100.0 * methods[name][f'{m}@{k}']:.2f}" for m, k in columns]
        lines.append(f"| {DISPLAY.get(name, name)} | " + " | ".join(cells) + " |")
    baselines = [name for name in order if name != "s2meta"]
    if "s2meta" in methods and baselines:
        cells = []
        for m, k in columns:
            best = max(methods[b][f"{m}@{k}"] for b in baselines)
            ours = methods["s2meta"][f"{m}@{k}"]
            cells.append(f"{100.0 * (ours - best) / best:+.2f}" if best > 0 else "n/a")
        lines.append("| Improve | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(out_dir: str, doc: Mapping[str, Any]) -> tuple:
    """Writes OUT/results.json and OUT/results.md atomically; returns their paths."""
    json_path = os.path.join(out_dir, "results.json")
    md_path = os.path.join(out_dir, "results.md")
    atomic_write_text(json_path, json.dumps(doc, indent=2) + "\n")
    atomic_write_text(md_path, markdown_table(doc))
    return json_path, md_path
