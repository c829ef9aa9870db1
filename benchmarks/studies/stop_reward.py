"""What the stop controller is trained on, against what it is judged by (stop-reward study).

The stop controller learns by REINFORCE from the meta-train *query hinge loss*: continuing is
rewarded when the loss after the last update is below the loss where the step started. The run is
judged by Recall@20. This re-evaluates a finished run folder's learner (``best.pt``), trains
nothing, never changes the folder, reads the meta-test scenarios only with ``--test``, and prints,
after t forced updates of its learned update controller (no stop):

* ``query hinge``   the mean query hinge loss of meta-train tasks (drawn with a fixed seed, so
                    every t sees the same tasks and negatives): the quantity REINFORCE compares;
* ``valid hinge``   the same loss on tasks drawn the same way from the meta-validation scenarios,
                    which neither Global nor ω_R trained on (``test hinge`` with ``--test``: from
                    the meta-test scenarios, a diagnostic);
* ``valid R@20``    meta-validation Recall@20 under the protocol of the run's validation;

and the mean stop probability p⁽ᵗ⁾ of the loop as trained. Where the hinge loss bottoms out
early while Recall@20 keeps rising, a stop controller that learned its reward well stops too
early for the metric (docs/results.md §3, planted05).

Usage (one intra-op thread; a few seconds per run folder on the planted benchmarks):

    OMP_NUM_THREADS=1 python benchmarks/studies/stop_reward.py runs/planted05-9 [runs/planted05-6 ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Dict, Sequence

import torch

from run_folders import fixed_step_results, load_run
from s2meta_fast.app import eval_tasks
from s2meta_fast.data import TaskSampler

STEPS = (0, 2, 4, 5, 6, 8, 10, 15, 20)


def study(out_dir: str, batches: int = 8, meta_batch: int = 8, draw_seed: int = 123,
          test: bool = False) -> Dict[str, Any]:
    cfg, prepared, learner = load_run(out_dir, "stop_reward")
    t_max = cfg.meta.t_max
    steps = [t for t in STEPS if t <= t_max]
    as_trained = learner.config

    def tasks(scenarios):
        sampler, gen = TaskSampler(prepared, draw_seed), torch.Generator().manual_seed(draw_seed)
        for _ in range(batches):
            yield sampler.train_batch(scenarios, meta_batch), gen

    def hinge(scenarios) -> torch.Tensor:
        """Mean query hinge after t = 0 … t_max forced updates."""
        learner.config = dataclasses.replace(as_trained, steps=t_max)
        query = [learner.adapt(batch, stop="fixed", generator=gen, record=True).trajectory.query_loss.mean(1)
                 for batch, gen in tasks(scenarios)]
        learner.config = as_trained
        return torch.stack(query).mean(0)

    splits = {"train": prepared.train, "valid": prepared.valid, **({"test": prepared.test} if test else {})}
    with torch.no_grad():
        hinges = {split: hinge(scenarios) for split, scenarios in splits.items() if scenarios}
        stop_prob = [learner.adapt(batch, stop="sample", generator=gen, record=True).trajectory.stop_prob.nanmean(1)
                     for batch, gen in tasks(prepared.train)]
    query_t = hinges["train"]
    prob_t = torch.stack(stop_prob).nanmean(0)

    # one T_max-step loop per block gives every t; t = 0 (ω_R) has no recall row, as "fixed" runs >= 1 update
    fixed = fixed_step_results(cfg, learner, eval_tasks(prepared, "valid", cfg.run.seed), steps[1:])
    recall = {t: 100 * res["metrics"]["recall@20"] for t, res in fixed.items()}
    return {"run": out_dir, "steps": steps, "query_hinge": [float(query_t[t]) for t in steps],
            **{f"{split}_hinge": [float(h[t]) for t in steps] for split, h in hinges.items() if split != "train"},
            "valid_recall@20": [recall.get(t) for t in steps],
            "stop_prob": [float(p) for p in prob_t[:t_max]]}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders of `s2meta run`")
    parser.add_argument("--batches", type=int, default=8, help="meta-train batches of 8 tasks (default 8)")
    parser.add_argument("--test", action="store_true", help="also the meta-test scenarios' hinge (a diagnostic)")
    args = parser.parse_args(argv)
    for run in args.runs:
        r = study(run, batches=args.batches, test=args.test)
        print(f"\n== {run}")
        print(f"{'forced updates t':<18}" + "".join(f"{t:>8}" for t in r["steps"]))
        print(f"{'query hinge':<18}" + "".join(f"{v:>8.4f}" for v in r["query_hinge"]))
        for split in ("valid", "test"):
            if f"{split}_hinge" in r:
                print(f"{split + ' hinge':<18}" + "".join(f"{v:>8.4f}" for v in r[f"{split}_hinge"]))
        print(f"{'valid R@20':<18}" + "".join(f"{v:>8.2f}" if v is not None else f"{'-':>8}"
                                           for v in r["valid_recall@20"]))
        print("stop p(t) as trained, t = 0 ...: " + " ".join(f"{p:.2f}" for p in r["stop_prob"][:10]))


if __name__ == "__main__":
    sys.exit(main())
