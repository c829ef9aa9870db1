"""FastUpdateController vs UpdateController, forward only, at 1 and 2 CPU threads.

Shows how each path uses the second core: the reference's MKL GEMMs scale well, so the fused
kernel's advantage is largest on one thread. Minimum of 7 calls after 2 warm-ups, no autograd,
under the trainer's heap setting (meta/host.py): without it, each call's fresh outputs (44 MB at
d = 128, S = 8) are a new mapping faulted in page by page, which more than doubled that row.

Usage: python benchmarks/studies/controller_threads.py
"""
from __future__ import annotations

import time
import warnings

import torch

from s2meta_fast.meta import FastUpdateController, UpdateController
from s2meta_fast.meta.host import keep_freed_memory
from s2meta_fast.models import build_model


def best_ms(controller, args, repeats: int = 7) -> float:
    with torch.no_grad():
        for _ in range(2):
            controller(*args)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            controller(*args)
            times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    warnings.simplefilter("ignore", RuntimeWarning)
    keep_freed_memory()
    print(f"{'d':>4s} {'S':>2s} {'threads':>7s} {'fused ms':>9s} {'reference ms':>13s} {'ratio':>6s}")
    for dim in (64, 128):
        model = build_model("interaction", dim)
        for scenarios in (1, 8):
            fused = FastUpdateController(model.param_shapes)
            reference = UpdateController(model.param_shapes)
            reference.load_state_dict(fused.state_dict())
            theta = torch.randn(scenarios, model.n_params)
            grad = torch.randn(scenarios, model.n_params) * 0.01
            loss = torch.rand(scenarios)
            h, c = (t.contiguous() for t in fused.initial_state(scenarios))
            for threads in (1, 2):
                torch.set_num_threads(threads)
                args = (theta, grad, loss, (h, c))
                fast, slow = best_ms(fused, args), best_ms(reference, args)
                print(f"{dim:4d} {scenarios:2d} {threads:7d} {fast:9.2f} {slow:13.2f} {slow / fast:5.1f}x", flush=True)


if __name__ == "__main__":
    main()
