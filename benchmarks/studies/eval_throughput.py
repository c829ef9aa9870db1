"""Evaluation throughput: scenarios/s of the Table-3 protocol for s²Meta, pure vs fused.

One evaluated scenario = adapt on its 64 support pairs (T = 20 inner updates, the stop
controller bypassed with ``stop="fixed"`` so every configuration does the same work) + score all
its items for all its evaluation users + Recall/NDCG/HitRate@{10,20,50}.

Configurations:
  pure        reference ops + UpdateController, one scenario per block (like the authors' code)
  fused B=k   fused ops + FastUpdateController, k scenarios adapted and scored per call

Workload (benchmarks/workloads.py): the MovieLens-sized recommender (interaction, d = 64),
scenarios of 300 items and 300 evaluation users with 10 positives each (90,000 scores per scenario).
Before timing, pure and fused at B = 1 (identical random draws) must give the same metrics.

Usage:
  python benchmarks/studies/eval_throughput.py                         # CPU (and CUDA when available)
  python benchmarks/studies/eval_throughput.py --device cuda --blocks 1,8,64 --scenarios 256
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workloads import make_eval_learner, make_eval_tasks  # noqa: E402


def run(fused: bool, block: int, tasks: list, device: str) -> dict:
    from s2meta_fast.eval import S2Meta, evaluate

    method = S2Meta(make_eval_learner(fused, device), stop="fixed")
    evaluate(method, tasks[:block], (20,), device=device, block_size=block, progress=False)   # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    res = evaluate(method, tasks, (10, 20, 50), device=device, block_size=block, progress=False)
    seconds = time.perf_counter() - start
    return {"config": "fused" if fused else "pure", "block": block, "device": device, "scenarios": len(tasks),
            "seconds": seconds, "scenarios_per_s": len(tasks) / seconds, "recall@20": res["metrics"]["recall@20"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), action="append")
    parser.add_argument("--blocks", default="1,8,64", help="fused block sizes (scenarios per call)")
    parser.add_argument("--scenarios", type=int, default=0, help="scenarios per configuration (default: 16 CPU, 256 GPU)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", RuntimeWarning)
    import s2meta_fast
    print(s2meta_fast.backend())
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows = []
    for device in devices:
        n = args.scenarios or (256 if device == "cuda" else 16)
        tasks = make_eval_tasks(n)
        # correctness before timing: same draws (B = 1) must give the same metrics on both paths
        check = make_eval_tasks(2, seed=99)
        pure = run(False, 1, check, device)["recall@20"]
        fused = run(True, 1, check, device)["recall@20"]
        if abs(pure - fused) > 1e-4:
            print(f"FAIL: pure and fused evaluation disagree on {device}: recall@20 {pure} vs {fused}")
            return 1
        rows.append(run(False, 1, tasks[: max(2, n // 4)], device))
        for block in (int(b) for b in args.blocks.split(",")):
            rows.append(run(True, min(block, n), tasks, device))
    base = {r["device"]: r["scenarios_per_s"] for r in rows if r["config"] == "pure"}
    print(f"{'device':6} {'config':6} {'block':>5} {'scen':>5} {'seconds':>8} {'scen/s':>9} {'vs pure':>8} {'R@20':>7}")
    for r in rows:
        print(f"{r['device']:6} {r['config']:6} {r['block']:5d} {r['scenarios']:5d} {r['seconds']:8.2f} "
              f"{r['scenarios_per_s']:9.2f} {r['scenarios_per_s'] / base[r['device']]:7.1f}x {r['recall@20']:7.4f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
