"""Seeds of one benchmark side by side: Recall@20 per method, paired differences with 95 % CIs.

Reads finished run folders (`s2meta run --seed N --out DIR`, same settings but the seed): each
folder's results.json (every method evaluated on the same meta-test scenarios and users of that
seed) and adaptation.json (s²Meta's adaptation gain: Recall@20 of the adapted θ minus ω_R's).
A paired difference is s²Meta − method per seed; its 95 % interval is mean ± t(0.975, n−1)·sd/√n
over the n seeds (the seed is the unit: it redraws the split, the embeddings' users, training
and evaluation draws). Beside it, the interval `s2meta compare` reports (test scenarios
resampled, trained models fixed). * marks an interval that excludes 0.

Usage (results: docs/results.md):

    python benchmarks/studies/seed_table.py --name ml100k /tmp/runs/ml100k-s0 /tmp/runs/ml100k-s1 ...
    python benchmarks/studies/seed_table.py --plot curves.png ml100k=/tmp/runs/ml100k-s0,... planted1=...
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, List, Optional

from s2meta_fast.app.compare import paired_bootstrap, per_scenario

# two-sided 95 % Student t quantiles, by degrees of freedom (beyond 30: t975)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
        29: 2.045, 30: 2.042}
NAMES = {"s2meta": "s²Meta", "itempop": "ItemPop", "global": "Global", "finetune": "Finetune"}


def mean_ci(values: List[float]) -> tuple:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t975(n - 1) * sd / math.sqrt(n)


def t975(df: int) -> float:
    """The 97.5 % Student t quantile: the table, else the Cornish-Fisher expansion around the
    normal's 1.96 (within 1e-3 from 30 degrees of freedom on)."""
    if df in T975:
        return T975[df]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def load(run: str) -> Dict:
    with open(os.path.join(run, "results.json")) as fh:
        res = json.load(fh)
    out = {"seed": res["seed"], "recall": {m: 100 * v["recall@20"] for m, v in res["methods"].items()},
           "n_test": res["n_test_scenarios"], "n_users": res["n_test_users"]}
    path = os.path.join(run, "adaptation.json")
    if os.path.exists(path):
        with open(path) as fh:
            ad = json.load(fh)
        s = ad["summary"]
        out["gain"] = 100 * s["gain_pooled"]
        out["steps"] = s["steps"]["mean"]
        out["before"] = 100 * s["recall@20_before"]
        hist = [h for h in ad.get("validation_history", []) if "valid_score" in h]
        if hist:
            best = max(hist, key=lambda h: h["valid_score"])
            out["best_valid_step"] = best["step"]
    ft = os.path.join(run, "finetune.json")
    if os.path.exists(ft):
        with open(ft) as fh:
            choice = json.load(fh)
        out["finetune"] = f"lr {choice['lr']:g} × {choice['steps']}"
    return out


def table(name: str, runs: List[str]) -> str:
    rows = [load(r) for r in runs]
    methods = [m for m in ("itempop", "global", "finetune", "s2meta") if all(m in r["recall"] for r in rows)]
    lines = [f"**{name}**, {len(rows)} seeds", "",
             "| seed | test scenarios | pairs | " + " | ".join(NAMES[m] for m in methods)
             + " | s²Meta ω_R (0 updates) | adaptation gain | mean updates | Finetune choice | best valid. step |",
             "|---:|---:|---:|" + "---:|" * len(methods) + "---:|---:|---:|---|---:|"]
    for r in sorted(rows, key=lambda r: r["seed"]):
        lines.append(f"| {r['seed']} | {r['n_test']} | {r['n_users']} | "
                     + " | ".join(f"{r['recall'][m]:.2f}" for m in methods)
                     + f" | {r.get('before', float('nan')):.2f} | {r.get('gain', float('nan')):+.2f} | "
                       f"{r.get('steps', float('nan')):.1f} | {r.get('finetune', '')} | {r.get('best_valid_step', '')} |")
    means = {m: mean_ci([r["recall"][m] for r in rows]) for m in methods}
    gain = mean_ci([r["gain"] for r in rows]) if all("gain" in r for r in rows) else None
    lines.append("| mean ± 95 % CI | | | " + " | ".join(f"{means[m][0]:.2f} ± {means[m][1]:.2f}" for m in methods)
                 + " | | " + (f"{gain[0]:+.2f} ± {gain[1]:.2f}" if gain else "") + " | | | |")
    lines += ["", "| paired difference (Recall@20 points) | mean | 95 % CI over seeds (t) | "
                  "95 % CI, scenarios resampled | per seed |", "|---|---:|---|---|---|"]
    ours = [per_scenario(run, "s2meta") for run in runs]
    for m in methods:
        if m == "s2meta":
            continue
        diffs = [r["recall"]["s2meta"] - r["recall"][m] for r in sorted(rows, key=lambda r: r["seed"])]
        mean, half = mean_ci(diffs)
        lines.append(f"| s²Meta − {NAMES[m]} | {mean:+.2f} | [{mean - half:+.2f}, {mean + half:+.2f}]"
                     + (" *" if abs(mean) > half else "") + f" | {scenario_interval(ours, runs, m)} | " + ", ".join(f"{d:+.2f}" for d in diffs) + " |")
    return "\n".join(lines)


def scenario_interval(ours: List[Optional[dict]], runs: List[str], method: str) -> str:
    """The interval `s2meta compare` reports: test scenarios resampled with replacement in every
    seed (the same draw for both methods), pooled, averaged over seeds. It holds the trained
    models fixed, so it is narrower than the interval over seeds, which also varies training.
    `ours`: s²Meta's per-scenario sums of the same runs."""
    theirs = [per_scenario(run, method) for run in runs]
    if any(doc is None for doc in ours + theirs):
        return "n/a"
    res = paired_bootstrap(ours, theirs, "recall@20")
    lo, hi = (100 * v for v in res["ci95"])
    return f"[{lo:+.2f}, {hi:+.2f}]" + (" *" if res["excludes_zero"] else "")


def controllers(name: str, runs: List[str]) -> str:
    """One markdown row: mean α / β per tensor, updates and per-scenario gain over the runs' test scenarios."""
    alpha: Dict[str, List[float]] = {}
    beta: Dict[str, List[float]] = {}
    steps: List[int] = []
    gains: List[float] = []
    for run in runs:
        with open(os.path.join(run, "adaptation.json")) as fh:
            rows = json.load(fh)["scenarios"]
        for row in rows:
            steps.append(row["steps"])
            gains.append(100 * row["gain"])
            for t, v in row["alpha_mean"].items():
                alpha.setdefault(t, []).append(v)
            for t, v in row["beta_mean"].items():
                beta.setdefault(t, []).append(v)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    cells = [f"{mean(alpha[t]):.3f} / {mean(beta[t]):.3f}" for t in alpha]
    return (f"| {name} ({len(steps)} scenarios) | " + " | ".join(cells) + f" | {mean(steps):.2f} ({min(steps)}–{max(steps)}) | "
            f"{mean(gains):+.2f} ({min(gains):+.2f} … {max(gains):+.2f}) |  <!-- tensors: {', '.join(alpha)} -->")


def plot_curves(groups: Dict[str, List[str]], path: str) -> None:
    """Meta-validation Recall@20 against meta-steps, one panel per group, one line per seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), squeeze=False)
    for ax, (name, runs) in zip(axes[0], groups.items()):
        for run in runs:
            with open(os.path.join(run, "adaptation.json")) as fh:
                ad = json.load(fh)
            with open(os.path.join(run, "finetune.json")) as fh:
                ft = json.load(fh)
            hist = [h for h in ad["validation_history"] if "valid_score" in h]
            line, = ax.plot([h["step"] for h in hist], [100 * h["valid_score"] for h in hist], "o-", markersize=3,
                            label=f"seed {load(run)['seed']}")
            ax.axhline(100 * ft["score"], color=line.get_color(), linestyle=":", linewidth=1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("meta-step")
        ax.set_ylabel("meta-validation Recall@20 (%)")
        ax.legend(fontsize=7)
    fig.suptitle("s²Meta meta-validation curves (dotted: Finetune's validation score, same seed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders; NAME=DIR,DIR,... groups them when --plot is given")
    ap.add_argument("--name", default="benchmark")
    ap.add_argument("--plot", help="write the groups' validation curves to this PNG instead of a table")
    ap.add_argument("--controllers", action="store_true",
                    help="one row of mean α / β per tensor, updates and adaptation gain instead of the table")
    args = ap.parse_args(argv)
    if args.controllers:
        print(controllers(args.name, args.runs))
        return 0
    if args.plot:
        groups = dict(arg.split("=", 1) for arg in args.runs)
        plot_curves({k: v.split(",") for k, v in groups.items()}, args.plot)
        return 0
    print(table(args.name, args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
