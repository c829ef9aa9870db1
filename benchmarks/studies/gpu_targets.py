"""The GPU targets, measured side by side in one process (benchmarks/device_check.sh runs it).

1. One update-controller step at paper size (interaction recommender d = 128, 43,265 scalars,
   S = 1, H = 16): fused kernel vs the pure-PyTorch reference vs torch.compile of the reference,
   each eager (back-to-back launches timed with CUDA events) and as a CUDA graph of 20 steps
   (graph replay; torch.compile's mode="reduce-overhead" is its own graphing). Forward and
   forward + backward. Target: fused forward <= 20 us.
2. The same step at 8M scalars (8 tensors of 2^20): time against the bytes the step must move
   (fp32: reads theta, grad, h, c = 2*4 + 2*16*4 B and writes theta', alpha, beta, h', c' =
   3*4 + 2*16*4 B per coordinate, 276 B in all) over the measured device-to-device copy
   bandwidth (bytes read + written). Target: >= 70 %.
3. The CUDA-graph meta-step replays with no host sync: torch.cuda.set_sync_debug_mode("error")
   around graph replays of GraphedInnerLoop, and the replay equals the eager meta-step.

Usage: python benchmarks/studies/gpu_targets.py [--json FILE] [--no-compile]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from s2meta_fast.ops import reference as ref  # noqa: E402

from s2meta_fast.ops.sample_inputs import DIFFERENTIABLE, interaction_sizes, make_multi_args, with_grad  # noqa: E402

H = 16
BYTES_PER_COORD_FP32 = (2 + 3) * 4 + 2 * 2 * H * 4  # 276


def events_us(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def graph_us(fn, steps: int = 20, replays: int = 20) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(steps):
            fn()
    return events_us(graph.replay, replays) / steps


def copy_bandwidth() -> float:
    """Device-to-device copy of 2 GiB, bytes read + written per second."""
    src = torch.empty(1 << 29, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    us = events_us(lambda: dst.copy_(src), 10)
    return 2 * src.numel() * 4 / (us * 1e-6)


def step_fns(args: dict, impl: str, backward: bool):
    if impl == "fused":
        fn = torch.ops.s2meta.lstm_update_multi
    elif impl == "reference":
        fn = ref.lstm_update_multi
    else:
        torch._dynamo.reset()
        fn = torch.compile(ref.lstm_update_multi, mode="reduce-overhead" if impl == "compiled-ro" else None,
                           dynamic=False)
    if not backward:
        def step():
            with torch.no_grad():
                return fn(*args.values())
        return step
    leaves = with_grad(args)
    inputs = [leaves[k] for k in DIFFERENTIABLE if leaves[k] is not None]

    def step():
        out = fn(*leaves.values())
        return torch.autograd.grad(out[0].sum() + out[1].sum() + out[2].sum(), inputs)
    return step


def controller_rows(compile_too: bool) -> list:
    rows = []
    args = make_multi_args(S=1, sizes=interaction_sizes(128), dtype=torch.float32, seed=0, device="cuda")
    impls = ["fused", "reference"] + (["compiled", "compiled-ro"] if compile_too else [])
    for backward in (False, True):
        for impl in impls:
            t0 = time.perf_counter()
            step = step_fns(args, impl, backward)
            row = {"case": "paper-d128", "scalars": 43265, "impl": impl,
                   "mode": "forward+backward" if backward else "forward"}
            try:
                row["eager_us"] = events_us(step, 200 if impl != "reference" else 50)
                if impl in ("fused", "reference"):
                    row["graph_us"] = graph_us(step)
            except Exception as err:  # report and go on: one failing variant must not hide the others
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            row["setup_s"] = time.perf_counter() - t0
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def bandwidth_rows(compile_too: bool) -> list:
    rows = []
    copy = copy_bandwidth()
    print(json.dumps({"copy_bandwidth_GBps": copy / 1e9}), flush=True)
    sizes = [1 << 20] * 8
    n = sum(sizes)
    args = make_multi_args(S=1, sizes=sizes, dtype=torch.float32, seed=0, device="cuda")
    for impl in ["fused", "reference"] + (["compiled"] if compile_too else []):
        step = step_fns(args, impl, False)
        try:
            us = events_us(step, 20 if impl == "fused" else 5)
            moved = n * BYTES_PER_COORD_FP32
            row = {"case": "8M", "scalars": n, "impl": impl, "mode": "forward", "eager_us": us,
                   "GBps": moved / (us * 1e-6) / 1e9, "of_copy_bw": moved / (us * 1e-6) / copy}
        except Exception as err:
            row = {"case": "8M", "impl": impl, "error": f"{type(err).__name__}: {str(err)[:200]}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows + [{"copy_bandwidth_GBps": copy / 1e9}]


def sync_free_replay() -> dict:
    from workloads import make_batch, make_learner
    from s2meta_fast.meta.graphs import GraphedInnerLoop

    learner = make_learner(True, "cuda")
    with torch.no_grad():  # a live stop controller, so stopping masks are exercised too
        learner.stop_controller.head.bias.fill_(-1.0)
    runner = GraphedInnerLoop(learner, "meta_step")
    gen = torch.Generator(device="cuda").manual_seed(0)
    batch = make_batch(8, 0).to("cuda")
    noise = learner.draw_noise(batch, gen)
    runner(batch, noise)  # capture
    runner(batch, noise)
    torch.cuda.synchronize()
    result = {"check": "graph replay without host sync", "graphs_active": bool(runner.active)}
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):  # _replay, not __call__: __call__ would swallow the error into its eager fallback
            terms = runner._replay(batch, noise)
        result["sync_free"] = True
    except RuntimeError as err:
        result["sync_free"] = False
        result["error"] = str(err).splitlines()[0][:300]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graphed = {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}
    learner.zero_grad(set_to_none=True)
    eager = learner.meta_loss(batch, noise=noise)
    eager.total.backward()
    result["total_graph"], result["total_eager"] = float(terms.total), float(eager.total)
    result["steps_equal"] = bool(torch.equal(terms.steps, eager.steps))
    worst = 0.0
    for n, p in learner.named_parameters():
        if p.grad is not None and n in graphed:
            scale = float(p.grad.abs().max()) + 1e-12
            worst = max(worst, float((graphed[n] - p.grad).abs().max()) / scale)
    result["max_rel_grad_diff"] = worst
    print(json.dumps(result), flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--only", choices=["controller", "bandwidth", "sync"], action="append")
    args = parser.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    import s2meta_fast
    print(s2meta_fast.backend(), "|", torch.cuda.get_device_name(), "| torch", torch.__version__, flush=True)
    parts = args.only or ["sync", "controller", "bandwidth"]
    out = {}
    for part, fn in (("controller", lambda: controller_rows(not args.no_compile)),
                     ("bandwidth", lambda: bandwidth_rows(not args.no_compile)), ("sync", sync_free_replay)):
        if part in parts:
            try:
                out[part] = fn()
            except Exception as err:  # one broken part must not hide the others' numbers
                import traceback
                traceback.print_exc()
                print(f"{part}: FAILED: {type(err).__name__}: {str(err)[:300]}", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=1)
    print("\n== GPU targets ==")
    for row in out.get("controller", []):
        if row["impl"] == "fused" and row["mode"] == "forward" and "eager_us" in row:
            print(f"controller step d=128 fused: {row['eager_us']:.1f} us eager, {row.get('graph_us', float('nan')):.1f} us "
                  f"graphed (target <= 20 us: {'met' if min(row['eager_us'], row.get('graph_us', 1e9)) <= 20 else 'MISSED'})")
    for row in out.get("bandwidth", []):
        if row.get("impl") == "fused" and "of_copy_bw" in row:
            print(f"8M scalars fused: {row['eager_us']:.0f} us, {row['GBps']:.0f} GB/s = {100 * row['of_copy_bw']:.0f} % of copy "
                  f"(target >= 70 %: {'met' if row['of_copy_bw'] >= 0.7 else 'MISSED'})")
    if "sync" in out:
        s = out["sync"]
        s.setdefault("max_rel_grad_diff", float("nan"))
        print(f"graph replay sync-free: {s.get('sync_free')}, equals eager: steps {s['steps_equal']}, "
              f"max rel grad diff {s['max_rel_grad_diff']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
