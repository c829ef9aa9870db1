"""What the meta learner's controllers do on a set of scenarios, and how meta-training went.

- :func:`adaptation_report` — per scenario, Recall@K of the learned initialisation ω_R (no
  update) and of the adapted θ (the inner loop exactly as evaluation runs it: same blocks, same
  per-block generator), their difference (the *adaptation gain*), the updates taken, and the mean
  input gate α and forget gate β of every adapted tensor over the updates taken.
- :func:`validation_curve` — meta-validation score against meta-steps from the trainer's
  history, drawn to a PNG (needs matplotlib, the ``plot`` extra).

The run writes both next to its results (``OUT/adaptation.json``, ``OUT/validation_curve.png``).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..fileio import atomic_write, atomic_write_text
from .metrics import topk_metric_sums
from .protocol import block_generator, make_block, plan_blocks

log = logging.getLogger(__name__)


def _recall(learner: Any, task: Any, thetas: torch.Tensor, k: int) -> tuple:
    """(n_users, [Recall@k of each row of thetas [R, N]]) on the task's evaluation users."""
    block = make_block([task]).to(thetas.device)
    n = thetas.shape[0]
    users = learner.user_emb[block.users].expand(n, -1, -1)
    items = learner.item_emb[block.items].expand(n, -1, -1)
    with torch.no_grad():
        scores = learner.model.scores(thetas, users, items)
    out = []
    for r in range(n):
        sums = topk_metric_sums(scores[r], block.relevance[0], [k], block.user_mask[0], block.item_mask[0])
        out.append(sums[f"recall@{k}"] / max(sums["count"], 1))
    return int(sums["count"]), out


def _tensor_names(learner: Any) -> List[str]:
    """W1[64x128], b1[64], ... (the recommenders list each layer's weight, then its bias)."""
    return [f"{'W' if len(shape) == 2 else 'b'}{k // 2 + 1}[{'x'.join(map(str, shape))}]"
            for k, shape in enumerate(learner.model.param_shapes)]


def adaptation_report(learner: Any, tasks: Sequence[Any], *, k: int = 20, seed: int = 0, block_size: int = 16,
                      stop: str = "sample") -> Dict[str, Any]:
    """Adaptation gain, steps and gates per scenario under the evaluation protocol's draws.

    Returns ``{"k", "stop", "scenarios": [...], "summary": {...}}``. ``summary`` pools the
    recalls over (scenario, user) pairs like the results table, and gives the distribution (over
    scenarios) of the steps and of each tensor's mean α and β.
    """
    from ..data.tasks import support_batch

    device = learner.user_emb.device
    names = _tensor_names(learner)
    rows: List[Dict[str, Any]] = []
    for index, group in enumerate(plan_blocks(list(tasks), block_size)):
        batch = support_batch(list(group)).to(device)
        noise = learner.draw_noise(batch, block_generator(seed, index, device), stop)
        with torch.no_grad():
            out = learner.adapt(batch, stop=stop, noise=noise, record=True)
        traj = out.trajectory
        for s, task in enumerate(group):
            steps = int(out.steps[s])
            thetas = torch.stack([traj.thetas[0, s], out.theta[s].detach().cpu()]).to(device)
            n_users, (before, after) = _recall(learner, task, thetas, k)
            taken = traj.updated[:, s]
            alpha = traj.alpha_mean[:, s][taken].mean(0) if steps else torch.full((len(names),), float("nan"))
            beta = traj.beta_mean[:, s][taken].mean(0) if steps else torch.full((len(names),), float("nan"))
            rows.append({"scenario": task.name, "n_users": n_users, "steps": steps,
                         f"recall@{k}_before": before, f"recall@{k}_after": after, "gain": after - before,
                         "alpha_mean": dict(zip(names, alpha.tolist())), "beta_mean": dict(zip(names, beta.tolist()))})
    return {"k": k, "stop": stop, "scenarios": rows, "summary": summarize(rows, k, names)}


def _quantiles(values: Sequence[float]) -> Dict[str, float]:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if v.size == 0:
        return {}
    q = np.quantile(v, [0.0, 0.25, 0.5, 0.75, 1.0])
    return {"mean": float(v.mean()), "min": float(q[0]), "q25": float(q[1]), "median": float(q[2]),
            "q75": float(q[3]), "max": float(q[4])}


def summarize(rows: Sequence[Dict[str, Any]], k: int, names: Sequence[str]) -> Dict[str, Any]:
    if not rows:
        return {}
    n = np.array([r["n_users"] for r in rows], dtype=float)
    before = np.array([r[f"recall@{k}_before"] for r in rows])
    after = np.array([r[f"recall@{k}_after"] for r in rows])
    return {
        "n_scenarios": len(rows), "n_users": int(n.sum()),
        f"recall@{k}_before": float((n * before).sum() / n.sum()),
        f"recall@{k}_after": float((n * after).sum() / n.sum()),
        "gain_pooled": float((n * (after - before)).sum() / n.sum()),
        "gain_per_scenario": _quantiles(after - before),
        "scenarios_gaining": int((after > before).sum()), "scenarios_losing": int((after < before).sum()),
        "steps": _quantiles([r["steps"] for r in rows]),
        "alpha_mean": {t: _quantiles([r["alpha_mean"][t] for r in rows]) for t in names},
        "beta_mean": {t: _quantiles([r["beta_mean"][t] for r in rows]) for t in names},
    }


def validation_curve(history: Sequence[Dict[str, float]], path: str, title: str = "") -> Optional[str]:
    """Meta-validation score vs meta-step (and the meta-train query loss) as a PNG; None without matplotlib."""
    points = [(h["step"], h["valid_score"]) for h in history if "valid_score" in h]
    if not points:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("validation curve not drawn: matplotlib is not installed (pip install 's2meta_fast[plot]')")
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    steps, scores = zip(*points)
    ax.plot(steps, [100 * s for s in scores], "o-", color="tab:green", label="meta-validation Recall@20")
    best = int(np.argmax(scores))
    ax.plot([steps[best]], [100 * scores[best]], "*", color="black", markersize=12, label="best (checkpoint)")
    ax.set_xlabel("meta-step")
    ax.set_ylabel("Recall@20 (%)")
    losses = [(h["step"], h["query_loss"]) for h in history if "query_loss" in h]
    if losses:
        twin = ax.twinx()
        twin.plot(*zip(*losses), "-", color="tab:blue", alpha=0.5, label="meta-train query loss")
        twin.set_ylabel("query hinge loss", color="tab:blue")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or "meta-training")
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
    return path


def write_adaptation(out_dir: str, learner: Any, tasks: Sequence[Any], history: Sequence[Dict[str, float]], *,
                     seed: int, block_size: int, stop: str, k: int = 20, extra: Optional[Dict[str, Any]] = None
                     ) -> Dict[str, Any]:
    """Writes OUT/adaptation.json (report on `tasks` + the validation history) and the curve PNG."""
    report = adaptation_report(learner, tasks, k=k, seed=seed, block_size=block_size, stop=stop)
    report["validation_history"] = [dict(h) for h in history]
    report.update(extra or {})
    atomic_write_text(os.path.join(out_dir, "adaptation.json"), json.dumps(report, indent=1) + "\n")
    validation_curve(history, os.path.join(out_dir, "validation_curve.png"))
    s = report["summary"]
    if s:
        log.info("adaptation on %d scenarios: Recall@%d %.4f -> %.4f (gain %+.4f), mean %.1f updates", s["n_scenarios"],
                 k, s[f"recall@{k}_before"], s[f"recall@{k}_after"], s["gain_pooled"], s["steps"]["mean"])
    return report


__all__ = ["adaptation_report", "summarize", "validation_curve", "write_adaptation"]
