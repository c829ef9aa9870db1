"""pytest-benchmark: one meta-training step, fused vs pure, on the MovieLens-sized recommender.

Each case first checks that the fused and pure paths compute the same meta-loss and
meta-gradient from the same weights and draws, then times a full meta-step (draws, 20 inner
updates, query loss, REINFORCE, backward, clip, Adam). Run:
    python -m pytest benchmarks/bench_meta_step.py --benchmark-columns=min,median,rounds
``benchmarks/summarize.py`` prints the fused/pure ratios per step (the pure case's name contains
"reference"); divide by B (in each case's name and extra_info) for per-scenario figures.
"""
from __future__ import annotations

import pytest
import torch

from throughput import MetaStep, make_batch, make_learner

from s2meta_fast.meta.host import training_host

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [  # (id, fused, B, CUDA graphs)
    ("reference-B1", False, 1, False),
    ("fused-B1", True, 1, False),
    ("fused-B8", True, 8, False),
    ("fused-graph-B1", True, 1, True),
    ("fused-graph-B8", True, 8, True),
]


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """At these sizes intra-op threads cost more in OpenMP wake-ups than they save (10x on a
    shared 2-core machine), for both paths alike; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


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
@pytest.mark.parametrize("name,fused,batch_size,graphs", CASES, ids=[c[0] for c in CASES])
def test_meta_step(benchmark, device, name, fused, batch_size, graphs):
    if graphs and device != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    if device == "cpu" and batch_size > 1 and not fused:
        pytest.skip("the pure path is B = 1 only")
    _check_fused_equals_pure(device)
    benchmark.group = f"meta_step-{device}"
    benchmark.name = f"{name}-{device}"
    learner = make_learner(fused, device)
    step = MetaStep(learner, graphs=graphs)
    batch = make_batch(batch_size, 0).to(device)
    step(batch)  # capture / warm up outside the timing

    def run():
        step(batch)
        _sync(device)

    with training_host(torch.device(device)):  # what MetaTrainer.fit runs its loop under
        benchmark.pedantic(run, rounds=3 if device == "cpu" else 20, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(scenarios=batch_size, graphs=step.runner.active)
