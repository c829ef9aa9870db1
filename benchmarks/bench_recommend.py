"""pytest-benchmark: serving a new scenario with a Recommender, fused vs reference.

One request (workload in ``benchmarks/workloads.py``): ``adapt`` from 64 support pairs with 20
fixed inner updates, then ``recommend`` the top 20 of 1,000 candidates for 100 users, raw ids in
and a DataFrame out. Before timing, the reference and fused paths (identical random draws) must
give the same top-20. The adapt_many rows adapt 64 scenarios in one call against 64 single calls
(fused). p50 / p99 over many requests and the op profile: ``benchmarks/studies/serving_latency.py``.
Run:
    python -m pytest benchmarks/bench_recommend.py --benchmark-columns=min,median,rounds
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from harness import DEVICES, sync
from workloads import make_recommender, make_requests, serve

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

SCENARIOS = 64


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_recommend_request(benchmark, device, impl):
    request = make_requests(1, seed=99)[0]
    want = serve(make_recommender(False, device), request, 5)[1]
    rec = make_recommender(impl == "fused", device)
    got = serve(rec, request, 5)[1]
    assert (got["item_id"].to_numpy() == want["item_id"].to_numpy()).mean() > 0.99
    np.testing.assert_allclose(got["score"], want["score"], rtol=1e-3, atol=1e-4)

    requests = make_requests(8)
    state = {"n": 0}

    def run():
        serve(rec, requests[state["n"] % len(requests)], state["n"])
        sync(device)
        state["n"] += 1

    benchmark.group = f"recommend: adapt 64 pairs + rank 1000 items x 100 users {device}"
    benchmark.pedantic(run, rounds=8 if impl == "fused" or device == "cuda" else 3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("calls", ["adapt_many", "single"])
def test_adapt_many_scenarios(benchmark, device, calls):
    rec = make_recommender(True, device)
    requests = make_requests(SCENARIOS, seed=7)
    supports, candidates = [r[0] for r in requests], [r[1] for r in requests]

    def run():
        if calls == "adapt_many":
            rec.adapt_many(supports, candidates, seed=0)
        else:
            for s, (support, items) in enumerate(zip(supports, candidates)):
                rec.adapt(support, items, seed=s)
        sync(device)

    benchmark.group = f"adapt {SCENARIOS} scenarios, fused {device}"
    benchmark.extra_info.update(scenarios=SCENARIOS)
    benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=1)
