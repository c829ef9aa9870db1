"""pytest-benchmark: evaluating s²Meta on a block of scenarios, fused vs reference.

One round evaluates the same 8 scenarios under the Table-3 protocol: adapt each on its 64 support
pairs (20 fixed inner updates, so every path does the same work), score all its items for all its
300 evaluation users, Recall/NDCG/HitRate@{10,20,50} (workload in ``benchmarks/workloads.py``).
  reference  reference ops + UpdateController, one scenario per block (as the authors' code)
  fused      fused ops + FastUpdateController, 1 or 8 scenarios adapted and scored per call
There is no torch.compile row, for the reason given in bench_meta_step.py (the inner loop takes
``torch.autograd.grad`` at every step). Before timing, the reference and the fused path at
block 1 (identical random draws) must give the same metrics. Scenarios/s for larger runs and
more block sizes: ``benchmarks/studies/eval_throughput.py``. Run:
    python -m pytest benchmarks/bench_eval.py --benchmark-columns=min,median,rounds
"""
from __future__ import annotations

import functools

import pytest
import torch

from s2meta_fast.eval import S2Meta, evaluate
from harness import DEVICES, sync
from workloads import make_eval_learner, make_eval_tasks

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

SCENARIOS = 8
KS = (10, 20, 50)


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Per-scenario tensors are small: intra-op threads cost more in wake-ups than they save."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _evaluate(method, tasks, block: int, device: str) -> dict:
    result = evaluate(method, tasks, KS, device=device, block_size=block, progress=False)
    sync(device)
    return result


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block", [1, SCENARIOS])
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_eval_block(benchmark, device, block, impl):
    if impl == "reference" and block > 1:
        pytest.skip("the reference path is timed one scenario per block, as the authors' code")
    fused = impl == "fused"
    check = make_eval_tasks(2, seed=99)
    want = _evaluate(S2Meta(make_eval_learner(False, device), stop="fixed"), check, 1, device)["metrics"]
    method = S2Meta(make_eval_learner(fused, device), stop="fixed")
    got = _evaluate(method, check, 1, device)["metrics"]
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-4), key

    tasks = make_eval_tasks(SCENARIOS)
    run = functools.partial(_evaluate, method, tasks, block, device)
    run()  # warm-up (allocator, CUDA graphs)
    benchmark.group = f"eval {SCENARIOS} scenarios {device}"
    benchmark.extra_info.update(scenarios=SCENARIOS, block=block)
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
