"""What stopped scenarios cost: the masked inner loop against the compact one, with the stop as trained.

Loads a finished run folder (`s2meta run ... --out OUT`: its config, data and best.pt), then
times, for each inner-loop mode (``masked``: every scenario computed for all T_max steps;
``compact``: stopped scenarios dropped between steps, loop ended when none is left):

* meta-training: ``--steps`` meta-steps of ``meta_batch`` scenarios drawn by the run's task
  sampler (inner loop + query loss + REINFORCE + backward + grad clip + Adam), from the trained
  learner, the stop sampled as trained; both modes get the same batches and draws, and take
  their meta-steps in turn so that a shared host's changing load hits both alike;
* evaluation: the protocol on the meta-test scenarios (s²Meta only), its Recall@20 checked equal.

Usage (results: docs/performance.md):

    OMP_NUM_THREADS=1 python benchmarks/studies/stop_cost.py OUT [--steps 40] [--repeats 3]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import time

import torch

from s2meta_fast.config import build_config, load_yaml
from s2meta_fast.eval.baselines import S2Meta
from s2meta_fast.app import eval_tasks, load_learner, prepare_data
from s2meta_fast.data import TaskSampler
from s2meta_fast.eval.protocol import evaluate
from s2meta_fast.meta.graphs import eager_meta_step
from s2meta_fast.meta.trainer import build_optimizer


def meta_train(learner, cfg, prepared, steps: int):
    """Both modes side by side, one meta-step each in turn (a shared host's load hits both alike)."""
    tcfg = cfg.train
    sampler = TaskSampler(prepared, cfg.run.seed)
    batches = [sampler.train_batch(prepared.train, tcfg.meta_batch) for _ in range(steps)]
    runs = {}
    for compact in (False, True):
        copy_ = copy.deepcopy(learner)
        copy_.compact_stopped = compact
        runs[compact] = {"learner": copy_, "optimizer": build_optimizer(copy_, tcfg), "seconds": 0.0,
                         "generator": torch.Generator().manual_seed(cfg.run.seed), "updates": 0.0,
                         "params": [p for p in copy_.parameters() if p.requires_grad]}
    for batch in batches:
        for compact in (False, True):
            r = runs[compact]
            start = time.perf_counter()
            noise = r["learner"].draw_noise(batch, r["generator"])
            terms = eager_meta_step(r["learner"], batch, noise)
            torch.nn.utils.clip_grad_value_(r["params"], tcfg.grad_clip)
            r["optimizer"].step()
            r["seconds"] += time.perf_counter() - start
            r["updates"] += float(terms.steps.float().mean())
    return {compact: {"scenarios_per_s": steps * tcfg.meta_batch / r["seconds"], "seconds": r["seconds"],
                      "mean_updates": r["updates"] / steps, "omega": r["learner"].omega.detach().clone()}
            for compact, r in runs.items()}


def evaluation(learner, cfg, tasks, compact: bool):
    learner.compact_stopped = compact
    method = S2Meta(learner, stop=cfg.eval.eval_stop, cuda_graphs=False)
    start = time.perf_counter()
    res = evaluate(method, tasks, (20,), seed=cfg.run.seed, block_size=cfg.eval.block_size, progress=False)
    seconds = time.perf_counter() - start
    return {"scenarios_per_s": len(tasks) / seconds, "seconds": seconds, "recall@20": res["metrics"]["recall@20"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="a finished run folder")
    ap.add_argument("--steps", type=int, default=40, help="meta-steps timed per mode")
    ap.add_argument("--repeats", type=int, default=3, help="evaluation passes per mode (best taken)")
    args = ap.parse_args(argv)
    cfg = build_config(load_yaml(os.path.join(args.run, "config.yaml")), where=args.run)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out=args.run, device="cpu", quiet=True))
    prepared = prepare_data(cfg)
    learner = load_learner(cfg, prepared).cpu()
    tasks = eval_tasks(prepared, "test", cfg.run.seed)
    print(f"{args.run}: {cfg.data.dataset}, meta-batch {cfg.train.meta_batch}, T_max {cfg.meta.t_max}, "
          f"threads {torch.get_num_threads()}")
    train = meta_train(learner, cfg, prepared, args.steps)
    same = torch.equal(train[False]["omega"], train[True]["omega"])
    for mode in (False, True):
        r = train[mode]
        print(f"meta-train {'compact' if mode else 'masked '}: {r['scenarios_per_s']:7.1f} scenarios/s "
              f"({args.steps} meta-steps in {r['seconds']:.1f} s, mean {r['mean_updates']:.2f} updates)")
    print(f"  speed-up {train[True]['scenarios_per_s'] / train[False]['scenarios_per_s']:.2f}x; "
          f"ω_R after {args.steps} meta-steps identical: {same}")
    passes = {False: [], True: []}
    for _ in range(args.repeats):  # the modes in turn, as for meta-training
        for mode in (False, True):
            passes[mode].append(evaluation(learner, cfg, tasks, mode))
    ev = {mode: max(runs, key=lambda r: r["scenarios_per_s"]) for mode, runs in passes.items()}
    for mode in (False, True):
        print(f"evaluate   {'compact' if mode else 'masked '}: {ev[mode]['scenarios_per_s']:7.1f} scenarios/s "
              f"({len(tasks)} scenarios in {ev[mode]['seconds']:.2f} s, best of {args.repeats}); "
              f"Recall@20 {100 * ev[mode]['recall@20']:.4f}")
    print(f"  speed-up {ev[True]['scenarios_per_s'] / ev[False]['scenarios_per_s']:.2f}x; Recall@20 identical: "
          f"{ev[True]['recall@20'] == ev[False]['recall@20']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
