"""The paper's Fig. 2 for one scenario: how the meta learner drives its inner loop.

Left: training (support) loss, stop probability and test recall per inner step. Then four panels:
mean input gate α and forget gate β, for the weights and for the biases, one line per layer.
Everything comes from ``MetaLearner.adapt(..., record=True)``; the test recall of step t is the
protocol's Recall@K of θ⁽ᵗ⁾ on the scenario's evaluation users, all θ⁽ᵗ⁾ scored in one call.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from .eval.metrics import topk_metric_sums
from .eval.protocol import make_block
from .fileio import atomic_write


def step_recalls(learner: Any, task: Any, thetas: torch.Tensor, k: int = 20) -> List[float]:
    """Recall@k of each θ⁽ᵗ⁾ (``thetas [T+1, N]``) on the task's evaluation users."""
    block = make_block([task]).to(thetas.device)
    n = thetas.shape[0]
    users = learner.user_emb[block.users].expand(n, -1, -1)
    items = learner.item_emb[block.items].expand(n, -1, -1)
    with torch.no_grad():
        scores = learner.model.scores(thetas, users, items)          # one [T+1, A, B] call
    out = []
    for t in range(n):
        sums = topk_metric_sums(scores[t], block.relevance[0], [k], block.user_mask[0], block.item_mask[0])
        out.append(sums[f"recall@{k}"] / max(sums["count"], 1))
    return out


def record_scenario(learner: Any, task: Any, support_batch: Any, stop: str = "sample", seed: int = 0,
                    k: int = 20) -> Dict[str, Any]:
    """Adapts `learner` to one evaluation task with ``record=True`` and gathers the Fig. 2 series."""
    device = learner.user_emb.device
    generator = torch.Generator(device=device).manual_seed(int(seed))
    batch = support_batch([task]).to(device)
    with torch.no_grad():   # the learner enables grad itself where the inner loop needs it
        out = learner.adapt(batch, stop=stop, generator=generator, record=True)
    record = out.trajectory.scenario(0)
    thetas = out.trajectory.thetas[:, 0].to(device)
    record["test_recall"] = step_recalls(learner, task, thetas, k)
    record["k"] = k
    record["scenario"] = task.name
    record["layers"] = len(learner.model.param_shapes) // 2
    return record


def draw_figure(record: Dict[str, Any], path: str, title: str = "") -> str:
    """Draws the five panels of Fig. 2 from a :func:`record_scenario` dict into a PNG at `path`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps_taken = int(record["steps"])
    # Steps past the stop repeat the frozen θ: show the loop up to and including the stopping step.
    shown = min(len(record["train_loss"]), steps_taken + 1)
    t = np.arange(shown)
    fig, axes = plt.subplots(1, 5, figsize=(22, 4.2))
    ax = axes[0]
    ax.plot(t, record["train_loss"][:shown], "o-", color="tab:blue", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss", color="tab:blue")
    twin = ax.twinx()
    twin.plot(t, record["stop_prob"][:shown], "s--", color="tab:red", label="stop probability")
    recall = record["test_recall"][:shown]
    twin.plot(t, recall, "^-", color="tab:green", label=f"test recall@{record['k']}")
    twin.set_ylim(0, 1)
    twin.set_ylabel("probability / recall")
    lines = ax.get_lines() + twin.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="best", fontsize=8, framealpha=0.8)
    ax.set_title(f"learning process ({steps_taken} updates)")

    # Gates only act on steps that updated θ; the stopping step's gates are computed but unused.
    gated = max(1, min(shown, steps_taken))
    alpha = np.asarray(record["alpha_mean"])[:gated]   # [T, K]; tensors alternate weight, bias
    beta = np.asarray(record["beta_mean"])[:gated]
    n_layers = alpha.shape[1] // 2
    panels = [(alpha[:, 0::2], "input gate α, weights"), (alpha[:, 1::2], "input gate α, biases"),
              (beta[:, 0::2], "forget gate β, weights"), (beta[:, 1::2], "forget gate β, biases")]
    for ax, (values, name) in zip(axes[1:], panels):
        for layer in range(n_layers):
            label = "output layer" if layer == n_layers - 1 else f"hidden layer {layer + 1}"
            ax.plot(t[:gated], values[:, layer], "o-", markersize=3, label=label)
        ax.set_title(name)
        ax.set_xlabel("step (updates only)")
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(title or f"s²Meta inner loop on scenario {record.get('scenario', '')!r}")
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path


def finite(values: Sequence[float]) -> bool:
    return all(math.isfinite(v) for v in values)
