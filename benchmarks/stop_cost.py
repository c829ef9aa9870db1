"""What stopped scenarios cost: the masked inner loop against the compact one, with the stop as trained.

Loads a finished run folder (`s2meta run ... --out OUT`: its config, data and best.pt), then
times, for each inner-loop mode (``masked``: every scenario computed for all T_max steps;
``compact``: stopped scenarios dropped between steps, loop ended when none is left):

* meta-training: ``--steps`` meta-steps of ``meta_batch`` scenarios drawn by the run's task
  sampler (inner loop + query loss + REINFORCE + backward + grad clip + Adam), from the trained
  learner, the stop sampled as trained; both modes get the same batches and draws;
* evaluation: the protocol on the meta-test scenarios (s²Meta only), its Recall@20 checked equal.

Usage (results: docs/performance.md):

    OMP_NUM_THREADS=1 python benchmarks/stop_cost.py OUT [--steps 40] [--repeats 3]
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
from s2meta_fast.eval.pipeline import eval_tasks, load_learner, prepare_data, task_sampler
from s2meta_fast.eval.protocol import evaluate
from s2meta_fast.meta.graphs import eager_meta_step
from s2meta_fast.meta.trainer import build_optimizer


def meta_train(learner, cfg, prepared, steps: int, compact: bool):
    learner = copy.deepcopy(learner)
    learner.compact_stopped = compact
    tcfg = cfg.train.trainer_config()
    optimizer = build_optimizer(learner, tcfg)
    sampler = task_sampler(prepared, cfg.run.seed)
    generator = torch.Generator().manual_seed(cfg.run.seed)
    params = [p for p in learner.parameters() if p.requires_grad]
    batches = [sampler.train_batch(prepared.train, tcfg.meta_batch) for _ in range(steps)]
    total_steps = 0.0
    start = time.perf_counter()
    for batch in batches:
        noise = learner.draw_noise(batch, generator)
        terms = eager_meta_step(learner, batch, noise)
        torch.nn.utils.clip_grad_value_(params, tcfg.grad_clip)
        optimizer.step()
        total_steps += float(terms.steps.float().mean())
    seconds = time.perf_counter() - start
    return {"scenarios_per_s": steps * tcfg.meta_batch / seconds, "seconds": seconds,
            "mean_updates": total_steps / steps, "omega": learner.omega.detach().clone()}


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
    train = {mode: meta_train(learner, cfg, prepared, args.steps, mode) for mode in (False, True)}
    same = torch.equal(train[False]["omega"], train[True]["omega"])
    for mode in (False, True):
        r = train[mode]
        print(f"meta-train {'compact' if mode else 'masked '}: {r['scenarios_per_s']:7.1f} scenarios/s "
              f"({args.steps} meta-steps in {r['seconds']:.1f} s, mean {r['mean_updates']:.2f} updates)")
    print(f"  speed-up {train[True]['scenarios_per_s'] / train[False]['scenarios_per_s']:.2f}x; "
          f"ω_R after {args.steps} meta-steps identical: {same}")
    ev = {}
    for mode in (False, True):
        runs = [evaluation(learner, cfg, tasks, mode) for _ in range(args.repeats)]
        ev[mode] = max(runs, key=lambda r: r["scenarios_per_s"])
        print(f"evaluate   {'compact' if mode else 'masked '}: {ev[mode]['scenarios_per_s']:7.1f} scenarios/s "
              f"({len(tasks)} scenarios in {ev[mode]['seconds']:.2f} s, best of {args.repeats}); "
              f"Recall@20 {100 * ev[mode]['recall@20']:.4f}")
    print(f"  speed-up {ev[True]['scenarios_per_s'] / ev[False]['scenarios_per_s']:.2f}x; Recall@20 identical: "
          f"{ev[True]['recall@20'] == ev[False]['recall@20']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
