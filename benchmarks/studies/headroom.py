"""How much can adaptation on the 64 support pairs gain over the unadapted model? (headroom study)

Re-evaluates a finished run folder (`s2meta run ... --out OUT`) on its meta-test scenarios; it
trains nothing and never changes the folder. Reported, per method/configuration, pooled
Recall@20 (and NDCG@20) under the exact protocol of `s2meta evaluate` (same tasks, same
per-block generators):

* ``global``                  the run's Global θ (OUT/global.pt), no adaptation
* ``finetune (val choice)``   Finetune with the (lr, steps) of OUT/finetune.json (as in results.json)
* ``finetune oracle pooled``  Finetune with the one (lr, steps) that is best **on the meta-test
                              scenarios themselves** — an optimistic bound, not a fair method
* ``finetune oracle per-scen`` the best (lr, steps) chosen per test scenario (more optimistic still)
* ``s2meta omega_R (0 steps)`` the meta learner's learned initialisation, no inner update
* ``s2meta fixed t``           ω_R plus t updates of the learned LSTM update controller (no stop)
* ``s2meta sample``            the learner as evaluated by the run (stop controller sampled),
                              with the mean number of updates it made

If even the oracles gain little over ``global`` the test scenarios leave no room for
scenario-specific adaptation from 64 pairs, whatever the method.

Usage (one intra-op thread; 10-20 s of CPU per run folder on ml100k; results: docs/results.md):

    OMP_NUM_THREADS=1 python benchmarks/studies/headroom.py runs/demo [/tmp/seed1 ...] [--json out.json]
    OMP_NUM_THREADS=1 python benchmarks/studies/headroom.py OUT --heldout-user-frac 0   # a shared-user run
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from s2meta_fast.app import eval_tasks, load_learner, prepare_data
from s2meta_fast.config import build_config, load_yaml
from s2meta_fast.data.tasks import support_batch
from s2meta_fast.eval.baselines import Finetune, GlobalModel, S2Meta
from s2meta_fast.eval.protocol import block_generator, evaluate, plan_blocks
from s2meta_fast.meta.checkpoint import load
from s2meta_fast.models import build_model

FT_LRS = (0.001, 0.01, 0.1, 1.0, 10.0)
FT_STEPS = (1, 2, 5, 10, 20, 50, 100, 200)
KS = (20,)


class Fixed:
    """A Method replaying per-scenario θ rows computed beforehand (keyed by scenario name)."""

    name = "fixed"

    def __init__(self, scorer: Any, theta_by_name: Dict[str, torch.Tensor]):
        self.scorer, self.theta_by_name = scorer, theta_by_name

    def adapt(self, tasks: Sequence[Any], generator: torch.Generator) -> torch.Tensor:
        return torch.stack([self.theta_by_name[t.name] for t in tasks])

    def score(self, theta: torch.Tensor, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.scorer.score(theta, users, items)


def per_scenario(method: Any, tasks: List[Any]) -> Dict[str, tuple]:
    """{scenario: (n_users, recall@20, ndcg@20)} — θ is fixed per scenario, so no generator matters."""
    out = {}
    for t in tasks:
        r = evaluate(method, [t], KS, progress=False)
        out[t.name] = (r["n_users"], r["metrics"]["recall@20"], r["metrics"]["ndcg@20"])
    return out


def pooled(per: Dict[str, tuple]) -> tuple:
    n = np.array([v[0] for v in per.values()], dtype=float)
    rec = np.array([v[1] for v in per.values()])
    ndcg = np.array([v[2] for v in per.values()])
    return float((n * rec).sum() / n.sum()), float((n * ndcg).sum() / n.sum())


def blockwise(tasks: List[Any], seed: int, block_size: int, fn) -> Dict[str, Any]:
    """Runs fn(group, generator) -> per-group results over the protocol's blocks (same draws)."""
    res = {}
    for index, group in enumerate(plan_blocks(tasks, block_size)):
        for name, value in fn(group, block_generator(seed, index, torch.device("cpu"))).items():
            res[name] = value
    return res


def study(out_dir: str, heldout_user_frac: float | None = None) -> Dict[str, Any]:
    cfg = build_config(load_yaml(os.path.join(out_dir, "config.yaml")), where=out_dir)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out=out_dir, device="cpu", quiet=True))
    seed, bs = cfg.run.seed, cfg.eval.block_size
    if heldout_user_frac is None:
        prepared = prepare_data(cfg)
    else:  # not a config option: the data layer's keyword, for runs made through the Python API
        import s2meta_fast.data as data
        original = data.prepare
        data.prepare = functools.partial(original, heldout_user_frac=heldout_user_frac)
        try:
            prepared = prepare_data(cfg)
        finally:
            data.prepare = original
    tasks = eval_tasks(prepared, "test", seed)
    rows: Dict[str, Any] = {}

    model = build_model(cfg.train.model, prepared.embed_dim, fused=cfg.meta.fused)
    theta_g = load(os.path.join(out_dir, "global.pt"), map_location="cpu")["theta"]
    ue, ie = prepared.user_emb, prepared.item_emb
    glob = GlobalModel(model, theta_g, ue, ie)
    base = per_scenario(Fixed(glob, {t.name: theta_g for t in tasks}), tasks)
    rows["global"] = pooled(base)

    # Finetune: one SGD run per lr, snapshots at every step count of the grid (protocol draws).
    grid: Dict[tuple, Dict[str, tuple]] = {}
    for lr in FT_LRS:
        tuner = Finetune(model, theta_g, ue, ie, lr, max(FT_STEPS))
        snaps = blockwise(tasks, seed, bs, lambda g, gen: _ft_block(tuner, g, gen))
        for s in FT_STEPS:
            grid[(lr, s)] = per_scenario(Fixed(glob, {n: snaps[n][s] for n in snaps}), tasks)
    choice = json.load(open(os.path.join(out_dir, "finetune.json")))
    val = (choice["lr"], choice["steps"])
    if val in grid:
        rows[f"finetune (val choice lr={val[0]:g}, steps={val[1]})"] = pooled(grid[val])
    else:  # the validation grid's choice is outside our grid: rerun it under the protocol
        r = evaluate(Finetune(model, theta_g, ue, ie, *val), tasks, KS, seed=seed, block_size=bs, progress=False)
        rows[f"finetune (val choice lr={val[0]:g}, steps={val[1]})"] = (r["metrics"]["recall@20"], float("nan"))
    best = max(grid, key=lambda k: pooled(grid[k])[0])
    rows[f"finetune oracle pooled (lr={best[0]:g}, steps={best[1]})"] = pooled(grid[best])
    # per scenario: the best of the whole grid and of no fine-tuning at all (Global)
    per_best = {t.name: max([base[t.name]] + [grid[k][t.name] for k in grid], key=lambda v: v[1]) for t in tasks}
    rows["finetune oracle per-scenario (incl. 0 steps)"] = pooled(per_best)

    # s²Meta: ω_R, then t updates of the learned controller (fixed mode), then the run's own stop.
    learner = load_learner(cfg, prepared).cpu().eval()
    t_max = cfg.meta.t_max
    fixed_config = dataclasses.replace(learner.config, steps=t_max)

    def s2_traj(group, gen):
        batch = support_batch(list(group))
        saved, learner.config = learner.config, fixed_config
        try:
            with torch.no_grad():
                out = learner.adapt(batch, stop="fixed", generator=gen, record=True)
        finally:
            learner.config = saved
        thetas = out.trajectory.thetas  # [T+1, S, N]
        return {t.name: thetas[:, i] for i, t in enumerate(group)}

    traj = blockwise(tasks, seed, bs, s2_traj)
    scorer = S2Meta(learner, stop="sample", cuda_graphs=False)
    for t in (0, 1, 2, 3, 5, 10, 15, 20):
        if t <= t_max:
            label = "s2meta omega_R (0 steps)" if t == 0 else f"s2meta fixed {t} steps"
            rows[label] = pooled(per_scenario(Fixed(scorer, {n: traj[n][t] for n in traj}), tasks))

    steps_taken: List[int] = []

    def s2_sample(group, gen):
        batch = support_batch(list(group))
        noise = learner.draw_noise(batch, gen, "sample")
        with torch.no_grad():
            out = learner.adapt(batch, stop="sample", noise=noise)
        steps_taken.extend(out.steps.tolist())
        return {t.name: out.theta[i].detach() for i, t in enumerate(group)}

    sampled = blockwise(tasks, seed, bs, s2_sample)
    rows[f"s2meta sample (as evaluated; mean {np.mean(steps_taken):.1f} updates)"] = pooled(
        per_scenario(Fixed(scorer, sampled), tasks))
    results = json.load(open(os.path.join(out_dir, "results.json")))["methods"]
    return {"run": out_dir, "seed": seed, "n_test_scenarios": len(tasks),
            "n_test_users": int(sum(v[0] for v in base.values())),
            "results_json_recall@20": {k: v["recall@20"] for k, v in results.items()},
            "rows": rows, "finetune_grid_test_recall@20": {f"lr={k[0]:g},steps={k[1]}": pooled(v)[0]
                                                         for k, v in grid.items()}}


def _ft_block(tuner: Finetune, group, gen) -> Dict[str, Dict[int, torch.Tensor]]:
    snaps = tuner.trajectory(group, gen, FT_STEPS)
    return {t.name: {s: snaps[s][i] for s in FT_STEPS} for i, t in enumerate(group)}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders of `s2meta run`")
    ap.add_argument("--json", help="also write all numbers to this file")
    ap.add_argument("--heldout-user-frac", type=float, default=None,
                    help="the data layer's heldout_user_frac the run was prepared with, if not the default "
                         "(0 = the paper's shared-user protocol)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    docs = []
    for run in args.runs:
        doc = study(run, args.heldout_user_frac)
        docs.append(doc)
        print(f"\n== {run} (seed {doc['seed']}, {doc['n_test_scenarios']} test scenarios, "
              f"{doc['n_test_users']} users); results.json R@20: "
              + ", ".join(f"{k} {100 * v:.2f}" for k, v in doc["results_json_recall@20"].items()))
        g = doc["rows"]["global"][0]
        print(f"{'configuration':58s} {'R@20':>7s} {'vs global':>9s} {'N@20':>7s}")
        for name, (rec, ndcg) in doc["rows"].items():
            print(f"{name:58s} {100 * rec:7.2f} {100 * (rec - g):+9.2f} {100 * ndcg:7.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(docs, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
