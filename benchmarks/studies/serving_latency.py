"""Serving latency: adapt a new scenario from 64 support pairs, then rank 1,000 items for 100 users.

One request = ``Recommender.adapt`` (64 support pairs, T = 20 inner updates: ``stop="fixed"``, the
most the default loop runs, so every path does the same work) + ``recommend(100 users, k=20)``
over the scenario's 1,000 candidates, raw ids in and a DataFrame out. Reported as p50 / p99 of
the wall time and of the process CPU time over the requests, for the fused kernels and the
pure-PyTorch path in one run, plus the throughput of ``adapt_many`` over 64 scenarios against 64
single ``adapt`` calls. ``--profile N`` instead prints each main op's share of N fused requests.

Workload (benchmarks/workloads.py): the MovieLens-sized interaction recommender (d = 64, 10,881
adapted scalars) over random frozen embeddings of 6,000 users and 4,000 items, untrained.
Before timing, fused and pure must produce the same top-20.

Usage:
  OMP_NUM_THREADS=1 python benchmarks/studies/serving_latency.py --requests 200 --pure-requests 50
  python benchmarks/studies/serving_latency.py --device cuda --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import workloads as w  # noqa: E402


def latencies(rec, requests: list, device: str) -> tuple:
    """(wall ms, process CPU ms) per request. On a shared machine the CPU time at one thread is
    what the request costs an idle core; the wall time also counts the waits for a core."""
    w.serve(rec, requests[0], 0)   # warm-up: thread pools, allocator, lazy op registration
    wall, cpu = [], []
    for n, request in enumerate(requests):
        start, start_cpu = time.perf_counter(), time.process_time()
        w.serve(rec, request, n)
        if device == "cuda":
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return np.array(wall) * 1e3, np.array(cpu) * 1e3


def batch_throughput(rec, requests: list, device: str, repeats: int) -> dict:
    supports = [r[0] for r in requests]
    candidates = [r[1] for r in requests]
    rec.adapt_many(supports[:2], candidates[:2], seed=0)
    rec.adapt(supports[0], candidates[0], seed=0)
    single, many = [], []
    for rep in range(repeats):
        start = time.perf_counter()
        for s, (sup, cand) in enumerate(zip(supports, candidates)):
            rec.adapt(sup, cand, seed=s)
        if device == "cuda":
            torch.cuda.synchronize()
        single.append(time.perf_counter() - start)
        start = time.perf_counter()
        rec.adapt_many(supports, candidates, seed=rep)
        if device == "cuda":
            torch.cuda.synchronize()
        many.append(time.perf_counter() - start)
    n = len(requests)
    result = {"scenarios": n, "single_s": min(single), "many_s": min(many),
              "single_scen_per_s": n / min(single), "many_scen_per_s": n / min(many),
              "speedup": min(single) / min(many)}
    if device == "cpu":
        # the trainer's heap setting (not undone, so measured last): a block's controller states are
        # tens of MB, which glibc otherwise maps fresh and faults in page by page on every call
        from s2meta_fast.meta.host import keep_freed_memory
        if keep_freed_memory():
            kept = []
            for rep in range(repeats):
                start = time.perf_counter()
                rec.adapt_many(supports, candidates, seed=rep)
                kept.append(time.perf_counter() - start)
            result.update(many_kept_s=min(kept), speedup_kept=min(single) / min(kept))
    return result


def check_same(device: str) -> None:
    """Fused and pure serve the same top-K (same draws) before anything is timed."""
    request = w.make_requests(1, seed=99)[0]
    fused = w.serve(w.make_recommender(True, device), request, 5)[1]
    pure = w.serve(w.make_recommender(False, device), request, 5)[1]
    same_items = (fused["item_id"].to_numpy() == pure["item_id"].to_numpy()).mean()
    if same_items < 0.99 or not np.allclose(fused["score"], pure["score"], rtol=1e-3, atol=1e-4):
        raise SystemExit(f"FAIL: fused and pure recommendations disagree on {device} "
                         f"({same_items:.1%} of the top-{w.SERVE_K} rows equal)")


def run(device: str, n_requests: int, n_pure: int, batch: int, repeats: int) -> dict:
    check_same(device)
    requests = w.make_requests(n_requests)
    rows = {}
    for name, fused, n in (("fused", True, n_requests), ("pure", False, n_pure)):
        ms, cpu = latencies(w.make_recommender(fused, device), requests[:n], device)
        rows[name] = {"requests": int(ms.size), "p50_ms": float(np.percentile(ms, 50)),
                      "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
                      "cpu_p50_ms": float(np.percentile(cpu, 50)), "cpu_p99_ms": float(np.percentile(cpu, 99))}
    rec = w.make_recommender(True, device)
    parts = []   # where a fused request's time goes
    for n, request in enumerate(requests[:50]):
        start, start_cpu = time.perf_counter(), time.process_time()
        scen = rec.adapt(request[0], request[1], seed=n)
        mid, mid_cpu = time.perf_counter(), time.process_time()
        scen.recommend(request[2], k=w.SERVE_K)
        if device == "cuda":
            torch.cuda.synchronize()
        parts.append((mid - start, time.perf_counter() - mid, mid_cpu - start_cpu, time.process_time() - mid_cpu))
    parts = np.median(np.array(parts), axis=0) * 1e3
    rows["fused"].update(adapt_p50_ms=float(parts[0]), rank_p50_ms=float(parts[1]),
                         adapt_cpu_p50_ms=float(parts[2]), rank_cpu_p50_ms=float(parts[3]))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {"device": device, "threads": torch.get_num_threads(), "cores": os.cpu_count(), "load_1min": load,
            "latency": rows,
            "speedup_p50": rows["pure"]["p50_ms"] / rows["fused"]["p50_ms"],
            "adapt_many": batch_throughput(rec, w.make_requests(batch, seed=7), device, repeats)}


def report(result: dict) -> None:
    lat = result["latency"]
    print(f"device {result['device']}, {result['threads']} threads, {result['cores']} cores, load average "
          f"{result['load_1min']:.1f} at the end; one request = adapt {w.SUPPORT} pairs (T = {w.SERVE_STEPS}) + "
          f"rank {w.CANDIDATES} items for {w.SERVE_USERS} users (k = {w.SERVE_K})")
    print(f"{'path':6} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'CPU p50':>8} {'CPU p99':>8}")
    for name in ("fused", "pure"):
        r = lat[name]
        print(f"{name:6} {r['requests']:8d} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['mean_ms']:8.2f} "
              f"{r['cpu_p50_ms']:8.2f} {r['cpu_p99_ms']:8.2f}")
    f = lat["fused"]
    print(f"fused p50 split: adapt {f['adapt_p50_ms']:.2f} ms + rank {f['rank_p50_ms']:.2f} ms (CPU time "
          f"{f['adapt_cpu_p50_ms']:.2f} + {f['rank_cpu_p50_ms']:.2f} ms); pure / fused at p50: "
          f"{result['speedup_p50']:.1f}x wall, {lat['pure']['cpu_p50_ms'] / f['cpu_p50_ms']:.1f}x CPU time")
    b = result["adapt_many"]
    print(f"adapt_many({b['scenarios']}): {b['many_s'] * 1e3:.1f} ms = {b['many_scen_per_s']:.0f} scenarios/s; "
          f"{b['scenarios']} single adapt calls: {b['single_s'] * 1e3:.1f} ms = {b['single_scen_per_s']:.0f} "
          f"scenarios/s; {b['speedup']:.1f}x")
    if "many_kept_s" in b:
        print(f"adapt_many({b['scenarios']}) after keep_freed_memory(): {b['many_kept_s'] * 1e3:.1f} ms, "
              f"{b['speedup_kept']:.1f}x the single calls")


def profile_ops(device: str, n: int) -> None:
    """Where a fused request's time goes: the main ops' share of the wall time of `n` requests."""
    from torch.profiler import ProfilerActivity, profile

    rec = w.make_recommender(True, device)
    requests = w.make_requests(n + 1, seed=3)
    w.serve(rec, requests[0], 0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for k, request in enumerate(requests[1:]):
            w.serve(rec, request, k)
        if device == "cuda":
            torch.cuda.synchronize()
        total = (time.perf_counter() - start) * 1e6
    events = {e.key: e for e in prof.key_averages()}
    print(f"profile of {n} fused requests on {device}: {total / n / 1e3:.2f} ms wall per request")
    for key in ("s2meta::lstm_update_multi", "s2meta::score_matrix", "s2meta::hinge_score_grad", "aten::topk",
                "aten::index", "aten::where"):
        if key in events:
            print(f"  {key:28} {events[key].cpu_time_total / total:6.1%}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), action="append")
    parser.add_argument("--requests", type=int, default=200, help="timed requests of the fused path")
    parser.add_argument("--pure-requests", type=int, default=200, help="timed requests of the pure path")
    parser.add_argument("--batch", type=int, default=64, help="scenarios of the adapt_many comparison")
    parser.add_argument("--repeats", type=int, default=3, help="adapt_many comparison: best of this many")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="only profile N fused requests: each main op's share of the wall time")
    args = parser.parse_args(argv)
    import s2meta_fast
    print(s2meta_fast.backend())
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if args.profile:
        for device in devices:
            profile_ops(device, args.profile)
        return 0
    results = []
    for device in devices:
        results.append(run(device, args.requests, args.pure_requests, args.batch, args.repeats))
        report(results[-1])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
