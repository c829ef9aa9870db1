"""Data-parallel meta-training throughput against the number of processes, and the all-reduce.

Launches itself under torchrun once per process count (``--procs 1,2``); each launch runs
``MetaTrainer.fit`` (the real loop: draws, each rank's share of the global meta-batch, the flat
gradient all-reduce, clip, Adam) on the MovieLens-sized workload of ``workloads.py`` with the
global meta-batch ``--batch``, then times ``distributed.average_gradients`` alone. Prints one row
per process count: ms per meta-step, scenarios/s (global), the all-reduce's bytes and time.

Usage: python benchmarks/studies/distributed_throughput.py [--procs 1,2] [--batch 8] [--steps 6]
           [--threads-per-proc 1] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from workloads import make_batch, make_learner  # noqa: E402

from s2meta_fast.meta import distributed  # noqa: E402
from s2meta_fast.meta.trainer import MetaTrainer, TrainConfig  # noqa: E402


class RandomSampler:
    """A fresh random batch per call (the same on every rank: the seed is the call count)."""

    def __init__(self):
        self.calls = 0

    def train_batch(self, scenarios, n_scenarios):
        self.calls += 1
        return make_batch(n_scenarios, self.calls)


def worker(args) -> None:
    torch.set_num_threads(args.threads_per_proc)
    with distributed.session(args.device, "auto") as group:
        learner = make_learner(True, args.device)
        cfg = TrainConfig(meta_batch=args.batch, log_every=0, validate_every=0, checkpoint_every=0, quiet=True,
                          cuda_graphs=args.device == "cuda")
        with tempfile.TemporaryDirectory() as out:
            trainer = MetaTrainer(learner, RandomSampler(), ["x"], cfg, out, keep_freed_memory=True, group=group)
            trainer.fit(args.warmup)
            distributed.barrier(group)
            start = time.perf_counter()
            trainer.fit(args.warmup + args.steps)
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        params = [p for p in learner.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.randn_like(p)
        stats = torch.zeros(4, dtype=params[0].dtype, device=params[0].device)
        n_floats = sum(p.numel() for p in params) + len(params) + 4
        reduce_s = float("nan")
        if group.active:
            for _ in range(3):
                distributed.average_gradients(params, stats, group)
            distributed.barrier(group)
            start = time.perf_counter()
            for _ in range(args.reduce_repeats):
                distributed.average_gradients(params, stats, group)
            if args.device == "cuda":
                torch.cuda.synchronize()
            reduce_s = (time.perf_counter() - start) / args.reduce_repeats
        if group.is_writer:
            print("RESULT " + json.dumps({
                "procs": group.world_size, "backend": group.backend, "batch": args.batch,
                "per_rank": args.batch // group.world_size, "ms_per_step": 1e3 * seconds / args.steps,
                "scenarios_per_s": args.batch * args.steps / seconds, "allreduce_bytes": n_floats * 4,
                "allreduce_ms": 1e3 * reduce_s}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", default="1,2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads-per-proc", type=int, default=1)
    parser.add_argument("--reduce-repeats", type=int, default=50)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    rows = []
    for procs in [int(p) for p in args.procs.split(",")]:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
                   os.path.abspath(__file__), "--worker", *sys.argv[1:]]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads_per_proc)}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            sys.exit(f"{procs} processes failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(lines[0][len("RESULT "):]))
    print("| processes | backend | B (global) | B per rank | ms / meta-step | scenarios/s | all-reduce bytes "
          "| all-reduce ms |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['procs']} | {r['backend']} | {r['batch']} | {r['per_rank']} | {r['ms_per_step']:.1f} "
              f"| {r['scenarios_per_s']:.1f} | {r['allreduce_bytes']:,} | {r['allreduce_ms']:.3f} |")


if __name__ == "__main__":
    main()
