"""pytest-benchmark: one meta-training step, fused vs reference, on the MovieLens-sized recommender.

Each case first checks that the fused and pure paths compute the same meta-loss and
meta-gradient from the same weights and draws, then times a full meta-step (draws, 20 inner
updates, query loss, REINFORCE, backward, clip, Adam; workload in ``benchmarks/workloads.py``):
  reference     reference ops + UpdateController, B = 1 (what the authors' code does)
  fused         fused ops + FastUpdateController, B = 1 and B = 8 scenarios per step
  fused-graphs  the same captured as one CUDA graph (CUDA only)
There is no torch.compile row: the step takes ``torch.autograd.grad`` inside a 20-step loop,
where Dynamo breaks the graph, so compiling it times eager PyTorch plus compiler guards; CUDA
graphs are the whole-step analogue. Run:
    python -m pytest benchmarks/bench_meta_step.py --benchmark-columns=min,median,rounds
``benchmarks/summarize.py`` prints the fused/reference ratios per case; divide by B (in each
case's name and extra_info) for per-scenario figures.
"""
from __future__ import annotations

import pytest
import torch

from s2meta_fast.meta.host import training_host
from harness import DEVICES, sync
from workloads import MetaStep, make_batch, make_learner

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

IMPLS = {"reference": (False, False), "fused": (True, False), "fused-graphs": (True, True)}  # fused, graphs


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """At these sizes intra-op threads cost more in OpenMP wake-ups than they save (10x on a
    shared 2-core machine), for both paths alike; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _check_fused_equals_pure(device: str) -> None:
    batch = make_batch(2, 0).to(device)
    results = []
    for fused in (True, False):
        learner = make_learner(fused, device, t_max=5)
        noise = learner.draw_noise(batch, torch.Generator(device=device).manual_seed(0))
        terms = learner.meta_loss(batch, noise=noise)
        results.append((terms.total.detach(), torch.autograd.grad(terms.total, learner.omega)[0]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_size", [1, 8])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_meta_step(benchmark, device, batch_size, impl):
    fused, graphs = IMPLS[impl]
    if graphs and device != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    if batch_size > 1 and not fused:
        pytest.skip("the reference path is timed at B = 1 (one scenario per step, as the authors' code)")
    _check_fused_equals_pure(device)
    benchmark.group = f"meta_step B={batch_size} {device}"
    learner = make_learner(fused, device)
    step = MetaStep(learner, graphs=graphs)
    batch = make_batch(batch_size, 0).to(device)
    step(batch)  # capture / warm up outside the timing

    def run():
        step(batch)
        sync(device)

    with training_host(torch.device(device)):  # what MetaTrainer.fit runs its loop under
        benchmark.pedantic(run, rounds=3 if device == "cpu" else 20, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(scenarios=batch_size, graphs=step.runner.active)
