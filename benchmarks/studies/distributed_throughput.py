"""Data-parallel meta-training throughput against the number of processes, the all-reduce, and
the cost model of docs/performance.md.

Launches itself under torchrun once per process count (``--procs 1,2``); each launch runs
``MetaTrainer.fit`` (the real loop: each rank draws its B/N scenarios and their noise from its own
stream, runs the fused inner loop on them, all-reduces the flat gradient buffer, clips and steps
Adam) on the MovieLens-sized workload of ``workloads.py`` with the global meta-batch ``--batch``,
then times ``distributed.average_gradients`` alone. Prints one row per process count: ms per
meta-step, scenarios/s (global), the ms per meta-step a rank spends drawing its batch, the
all-reduce's bytes and time.

``--cost-model`` then times ``TaskSampler.train_batch`` on MovieLens-100K for the B/N scenarios
one rank draws, and prints the efficiency ``t_c / (t_c + t_d + t_ar)`` of a meta-step per setting:
compute ``t_c = (B/N)·c``, drawing ``t_d`` (measured), all-reduce
``t_ar = 2·⌈log₂ N⌉·α + 2·(N−1)/N · bytes/β``. The CPU row takes c (1-process ms per scenario)
and t_ar (2 processes) from the rows above; the GPU rows assume c and the links' α, β (printed).

Usage: python benchmarks/studies/distributed_throughput.py [--procs 1,2] [--batch 8] [--steps 6]
           [--threads-per-proc 1] [--device cpu|cuda] [--cost-model]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from workloads import make_batch, make_learner  # noqa: E402

from s2meta_fast.meta import distributed  # noqa: E402
from s2meta_fast.meta.trainer import MetaTrainer, TrainConfig  # noqa: E402

# (setting, N, B, c in s per scenario, α in s, β in bytes/s): typical published link figures, and
# GPU step times that bracket a CUDA-graph replay of B/N = 8 scenarios (1 and 4.8 ms)
NVLINK, INFINIBAND = (10e-6, 100e9), (20e-6, 25e9)
GPU_SETTINGS = [("8 GPUs, NVLink", 8, 64, 0.125e-3, *NVLINK), ("8 GPUs, NVLink", 8, 64, 0.6e-3, *NVLINK),
                ("64 GPUs, IB", 64, 512, 0.125e-3, *INFINIBAND), ("64 GPUs, IB", 64, 512, 0.6e-3, *INFINIBAND),
                ("64 GPUs, IB", 64, 4096, 0.125e-3, *INFINIBAND)]


class RandomSampler:
    """Random batches seeded from a numpy Generator ``rng``, from which each rank derives its own
    stream (as from TaskSampler's); counts the seconds spent drawing."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.seconds = 0.0

    def train_batch(self, scenarios, n_scenarios):
        start = time.perf_counter()
        batch = make_batch(n_scenarios, int(self.rng.integers(1 << 31)))
        self.seconds += time.perf_counter() - start
        return batch


def worker(args) -> None:
    torch.set_num_threads(args.threads_per_proc)
    with distributed.session(args.device, "auto") as group:
        learner = make_learner(True, args.device)
        cfg = TrainConfig(meta_batch=args.batch, log_every=0, validate_every=0, checkpoint_every=0, quiet=True,
                          cuda_graphs=args.device == "cuda")
        sampler = RandomSampler()
        with tempfile.TemporaryDirectory() as out:
            trainer = MetaTrainer(learner, sampler, ["x"], cfg, out, keep_freed_memory=True, group=group)
            trainer.fit(args.warmup)
            distributed.barrier(group)
            sampler.seconds = 0.0
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
        draw_ms = distributed.gather_objects(1e3 * sampler.seconds / args.steps, group)
        if group.is_writer:
            print("RESULT " + json.dumps({
                "procs": group.world_size, "backend": group.backend, "batch": args.batch,
                "per_rank": args.batch // group.world_size, "ms_per_step": 1e3 * seconds / args.steps,
                "scenarios_per_s": args.batch * args.steps / seconds, "draw_ms": max(draw_ms),
                "allreduce_bytes": n_floats * 4, "allreduce_ms": 1e3 * reduce_s}), flush=True)


def draw_seconds(sampler, scenarios, n_scenarios: int, repeats: int = 20) -> float:
    """Median time of one ``sampler.train_batch`` of `n_scenarios` (after one that builds its index)."""
    sampler.train_batch(scenarios, n_scenarios)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sampler.train_batch(scenarios, n_scenarios)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def allreduce_seconds(n: int, n_bytes: int, alpha: float, beta: float) -> float:
    """Tree latency plus ring bandwidth."""
    return 2 * math.ceil(math.log2(n)) * alpha + 2 * (n - 1) / n * n_bytes / beta


def cost_model(rows) -> None:
    from s2meta_fast.data import TaskSampler, prepare

    prepared = prepare("ml100k", progress=False)
    sampler = TaskSampler(prepared, 0)
    by_procs = {r["procs"]: r for r in rows}
    n_bytes = rows[0]["allreduce_bytes"]
    settings = []
    if 1 in by_procs and 2 in by_procs:
        one, two = by_procs[1], by_procs[2]
        settings.append(("CPU, gloo (measured here)", 2, two["batch"], one["ms_per_step"] / one["batch"] / 1e3,
                         two["allreduce_ms"] / 1e3))
    settings += [(name, n, b, c, allreduce_seconds(n, n_bytes, alpha, beta))
                 for name, n, b, c, alpha, beta in GPU_SETTINGS]
    print(f"\nlinks: NVLink α = {NVLINK[0] * 1e6:g} µs, β = {NVLINK[1] / 1e9:g} GB/s; "
          f"InfiniBand α = {INFINIBAND[0] * 1e6:g} µs, β = {INFINIBAND[1] / 1e9:g} GB/s; all-reduce {n_bytes:,} bytes")
    print("| setting | N | B | B/N | c | t_c | t_d | t_ar | efficiency |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    draws = {}
    for name, n, b, c, t_ar in settings:
        share = b // n
        if share not in draws:
            draws[share] = draw_seconds(sampler, prepared.train, share)
        t_c, t_d = share * c, draws[share]
        print(f"| {name} | {n} | {b} | {share} | {duration(c)} | {duration(t_c)} | {duration(t_d)} | {duration(t_ar)} "
              f"| {100 * t_c / (t_c + t_d + t_ar):.1f} % |", flush=True)


def duration(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} µs" if seconds < 1e-3 else f"{seconds * 1e3:.3g} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", default="1,2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads-per-proc", type=int, default=1)
    parser.add_argument("--reduce-repeats", type=int, default=50)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--cost-model", action="store_true", help="then print the cost model (needs recbole for "
                                                                  "MovieLens-100K)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        # A gloo worker thread may still be dropping a finished collective's tensors, which takes
        # the GIL; a process finalizing Python meanwhile aborts (std::terminate from
        # ProcessGroupGloo::runLoop, pytorch/pytorch#190489) and torchrun reports the launch as
        # failed. The worker has printed its result and owns nothing else, so it skips finalization.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
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
    print("| processes | backend | B (global) | B per rank | ms / meta-step | scenarios/s | draw ms / step (rank) "
          "| all-reduce bytes | all-reduce ms |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['procs']} | {r['backend']} | {r['batch']} | {r['per_rank']} | {r['ms_per_step']:.1f} "
              f"| {r['scenarios_per_s']:.1f} | {r['draw_ms']:.2f} | {r['allreduce_bytes']:,} "
              f"| {r['allreduce_ms']:.3f} |", flush=True)
    if args.cost_model:
        cost_model(rows)


if __name__ == "__main__":
    main()
