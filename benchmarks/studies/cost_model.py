"""Cost model of a fused meta-training step: measured time next to its compute floor.

Grows one factor at a time from the MovieLens configuration (B = 8 scenarios, interaction
recommender d = 64, T_max = 20) and prints ms per meta-step, µs per (scenario, inner step,
coordinate), and the floor set by the update controller's arithmetic at the machine's peak.

The controller dominates: per coordinate and inner step the forward is a 4H x (5 + H) matvec
plus 2H for the gate heads (2 * (4*16*21 + 32) = 2,752 FLOP at H = 16), and the fused backward
recomputes it and adds W_hh^T dz, dW_ih and dW_hh (about 3x the forward). So one scenario's meta-step
costs about 11,000 * N * T FLOP; `--peak-gflops` is the machine's rate (default: measured, a
2048 x 2048 fp32 torch.mm at the threads used on the CPU, i.e. the vendor BLAS's practical rate;
60,000 on CUDA, an H100's fp32 FMA peak). Transcendentals (≈ 5H exp/log per coordinate) are not in
the floor, so the measured/floor ratio also shows how far the activations keep us from it.

Usage: python benchmarks/studies/cost_model.py [--device cpu|cuda] [--threads N] [--steps N]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from workloads import MetaStep, make_batch, make_learner  # noqa: E402

from s2meta_fast.meta.host import training_host  # noqa: E402

HIDDEN = 16
FLOP_PER_COORD_STEP = 4 * 2 * (4 * HIDDEN * (5 + HIDDEN) + 2 * HIDDEN)  # forward + ~3x backward


def time_step(batch_size: int, dim: int, t_max: int, device: str, steps: int) -> tuple[float, int]:
    learner = make_learner(True, device, t_max=t_max, dim=dim)
    step = MetaStep(learner, graphs=device == "cuda")
    batch = make_batch(batch_size, 0).to(device)
    with training_host(torch.device(device)):  # what MetaTrainer.fit runs its loop under
        step(batch)
        step(batch)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step(batch)
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps, learner.model.n_params


def gemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """The best of `repeats` n x n x n fp32 matrix products on the CPU, in GFLOP/s."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--peak-gflops", type=float, default=0.0,
                        help="machine rate in GFLOP/s (default: measured fp32 GEMM rate on the CPU; 60,000 on CUDA, "
                             "fp32 FMA of an H100)")
    args = parser.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)
    torch.set_num_threads(args.threads)
    peak = args.peak_gflops or (gemm_gflops() if args.device == "cpu" else 60_000.0)
    grid = [(8, 64, 20), (1, 64, 20), (32, 64, 20), (8, 32, 20), (8, 128, 20), (8, 64, 5), (8, 64, 10)]
    import s2meta_fast
    print(s2meta_fast.backend(), f"| device {args.device}, {torch.get_num_threads()} thread(s), peak {peak:.0f} GFLOP/s")
    print(f"{'B':>3s} {'d':>4s} {'T':>3s} {'N':>7s} {'ms/step':>9s} {'scen/s':>8s} {'ns/coord-step':>14s} "
          f"{'floor ms':>9s} {'x floor':>8s}")
    for batch_size, dim, t_max in grid:
        seconds, n_params = time_step(batch_size, dim, t_max, args.device, args.steps)
        work = batch_size * t_max * n_params
        floor = work * FLOP_PER_COORD_STEP / (peak * 1e9)
        print(f"{batch_size:3d} {dim:4d} {t_max:3d} {n_params:7d} {seconds * 1e3:9.1f} {batch_size / seconds:8.2f} "
              f"{seconds / work * 1e9:14.1f} {floor * 1e3:9.2f} {seconds / floor:8.1f}", flush=True)


if __name__ == "__main__":
    main()
