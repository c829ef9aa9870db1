"""Meta-training throughput: scenarios/s and peak memory per scenario, pure vs fused.

Configurations:
  pure        reference ops + UpdateController, B = 1, eager (like the authors' code)
  fused B=k   fused ops + FastUpdateController, B scenarios per meta-step, CUDA graphs on GPU
Workload: the MovieLens-sized recommender (interaction, d = 64, 10,881 adapted scalars), 64 support
pairs, 128 query triples, a 300-item pool, T_max = 20 with the stop controller pinned to p ≈ 0 so
every scenario takes all 20 inner updates. A meta-step is draws + inner loop + query loss +
REINFORCE + backward + grad clip + Adam.

Each configuration runs in its own subprocess so that its peak memory is its own
(CPU: peak RSS above the RSS before the first step; CUDA: max_memory_allocated above the same point).

Usage:
  python benchmarks/studies/throughput.py                      # CPU, and CUDA when available
  python benchmarks/studies/throughput.py --device cuda --batches 1,8,64 --steps 20
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workloads import MetaStep, make_batch, make_learner  # noqa: E402


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_one(path: str, batch_size: int, device: str, steps: int, warmup: int, threads: int) -> dict:
    """Times one configuration in this process; returns a JSON-able record."""
    warnings.simplefilter("ignore", RuntimeWarning)  # the reference-fallback warning; we report the backend
    import s2meta_fast
    from s2meta_fast.meta.host import training_host

    if threads:
        torch.set_num_threads(threads)
    fused = path == "fused"
    learner = make_learner(fused, device)
    step = MetaStep(learner, graphs=fused and device == "cuda")
    batches = [make_batch(batch_size, seed).to(device) for seed in range(2)]
    # the baseline is taken before the warm-up, so graph capture and allocator caches count too
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    with training_host(torch.device(device)):  # what MetaTrainer.fit runs its loop under
        for k in range(warmup):
            step(batches[k % 2])
        start = time.perf_counter()
        for k in range(steps):
            terms = step(batches[k % 2])
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    mean_steps = float(terms.steps.float().mean())
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"path": path, "B": batch_size, "device": device, "steps": steps,
            "seconds_per_step": elapsed / steps, "scenarios_per_s": steps * batch_size / elapsed,
            "peak_mib_per_scenario": max(peak, 0) / batch_size / 2 ** 20, "inner_updates": mean_steps,
            "graphs": step.runner.active, "threads": torch.get_num_threads(),
            "backend": str(s2meta_fast.backend()),
            "fused_kernels": s2meta_fast._extension.kernels_for(torch.device(device))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--batches", default="1,8,64", help="fused meta-batch sizes, comma-separated")
    parser.add_argument("--steps", type=int, default=0, help="timed meta-steps (0: 5 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: at these sizes OpenMP wake-ups cost more than the "
                             "extra core gives; 0 keeps torch's default)")
    parser.add_argument("--json", help="also write the records to this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: path:B:device in a subprocess
    args = parser.parse_args()

    if args.one:
        path, batch_size, device = args.one.split(":")
        steps = args.steps or (20 if device == "cuda" else 5)
        print(json.dumps(run_one(path, int(batch_size), device, steps, args.warmup, args.threads)))
        return

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        print("no CUDA device: CPU only", file=sys.stderr)
        devices.remove("cuda")
    configs = [(d, "pure", 1) for d in devices]
    configs += [(d, "fused", int(b)) for d in devices for b in args.batches.split(",")]
    records = []
    for device, path, batch_size in configs:
        command = [sys.executable, __file__, "--one", f"{path}:{batch_size}:{device}", "--warmup", str(args.warmup),
                   "--steps", str(args.steps), "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{device} {path} B={batch_size}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        records.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  done: {device} {path} B={batch_size}", file=sys.stderr, flush=True)
    if not records:
        sys.exit("no configuration ran")
    print(records[0]["backend"])
    print(f"{'device':6s} {'path':6s} {'B':>4s} {'graphs':>6s} {'kernels':>7s} {'ms/step':>9s} "
          f"{'scen/s':>9s} {'vs pure':>8s} {'MiB/scen':>9s} {'updates':>7s}")
    for rec in records:
        pure = next((r for r in records if r["device"] == rec["device"] and r["path"] == "pure"), None)
        ratio = f"{rec['scenarios_per_s'] / pure['scenarios_per_s']:7.1f}x" if pure else "       -"
        print(f"{rec['device']:6s} {rec['path']:6s} {rec['B']:4d} {str(rec['graphs']):>6s} "
              f"{str(rec['fused_kernels']):>7s} {rec['seconds_per_step'] * 1e3:9.1f} "
              f"{rec['scenarios_per_s']:9.2f} {ratio} {rec['peak_mib_per_scenario']:9.1f} {rec['inner_updates']:7.1f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(records, handle, indent=1)


if __name__ == "__main__":
    main()
