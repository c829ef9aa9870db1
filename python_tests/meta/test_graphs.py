"""The CUDA-graph inner loop: replay equals eager; without a GPU it falls back and says why."""
from __future__ import annotations

import logging

import pytest
import torch

from planted_tasks import planted_batch, planted_world
from s2meta_fast.meta import MetaConfig, MetaLearner
from s2meta_fast.meta.graphs import GraphedInnerLoop, eager_meta_step, padded_pool
from s2meta_fast.models import build_model

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DIM = 8


def make(device="cpu", dtype=torch.float32, **config):
    torch.manual_seed(0)
    user_emb, item_emb = planted_world(dim=DIM, dtype=dtype)
    learner = MetaLearner(build_model("interaction", DIM), user_emb, item_emb, MetaConfig(**config)).to(device)
    with torch.no_grad():
        learner.stop_controller.head.bias.fill_(-1.0)  # stops spread over the loop
    return learner, item_emb


def grads_of(learner):
    return {name: None if p.grad is None else p.grad.detach().clone() for name, p in learner.named_parameters()}


def test_cpu_falls_back_to_eager_and_says_why():
    learner, items = make()
    runner = GraphedInnerLoop(learner, "meta_step")
    assert not runner.active and "CUDA graphs need a CUDA device" in runner.fallback_reason
    batch = planted_batch(items, 40, 3)
    noise = learner.draw_noise(batch, torch.Generator().manual_seed(0))
    terms = runner(batch, noise)
    got = grads_of(learner)
    expect_terms = eager_meta_step(learner, batch, noise)
    torch.testing.assert_close(terms.total, expect_terms.total, rtol=0, atol=0)
    for name, grad in grads_of(learner).items():
        torch.testing.assert_close(got[name], grad, rtol=0, atol=0, msg=name)


def test_cpu_adapt_mode_falls_back_to_eager_adapt():
    learner, items = make()
    runner = GraphedInnerLoop(learner, "adapt", stop="threshold")
    batch = planted_batch(items, 40, 3)
    noise = learner.draw_noise(batch, torch.Generator().manual_seed(0))
    out = runner(batch, noise)
    expect = learner.adapt(batch, stop="threshold", noise=noise)
    assert not runner.active and not out.theta.requires_grad
    torch.testing.assert_close(out.theta, expect.theta.detach(), rtol=0, atol=0)
    assert torch.equal(out.steps, expect.steps)


def test_pool_is_padded_to_a_power_of_two_with_its_first_item():
    learner, items = make()
    batch = planted_batch(items, 40, 2, pool_sizes=[12, 13])
    pool = padded_pool(batch)
    assert pool.shape == (2, 16)
    assert torch.equal(pool[:, :13], batch.pool) and (pool[:, 13:] == batch.pool[:, :1]).all()


@cuda
@pytest.mark.cuda
def test_graph_replayed_meta_step_equals_eager():
    learner, items = make("cuda")
    runner = GraphedInnerLoop(learner, "meta_step")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for seed in range(3):  # capture on the first batch, replay on the others
        batch = planted_batch(items, 40, 4, seed=seed, pool_sizes=[10 + seed, 12, 9, 11]).to("cuda")
        noise = learner.draw_noise(batch, gen)
        terms = runner(batch, noise)
        graphed = grads_of(learner)
        eager = eager_meta_step(learner, batch, noise)
        assert runner.active, runner.fallback_reason
        torch.testing.assert_close(terms.total, eager.total, rtol=1e-6, atol=1e-7)
        assert torch.equal(terms.steps, eager.steps)
        for name, grad in grads_of(learner).items():
            if grad is None:
                assert graphed[name] is None
            else:
                torch.testing.assert_close(graphed[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert len(runner.graphs) == 1


@cuda
@pytest.mark.cuda
def test_graph_replayed_adapt_equals_eager():
    learner, items = make("cuda")
    runner = GraphedInnerLoop(learner, "adapt", stop="sample")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for seed in range(2):
        batch = planted_batch(items, 40, 5, seed=seed).to("cuda")
        noise = learner.draw_noise(batch, gen)
        out = runner(batch, noise)
        with torch.no_grad():
            eager = learner.adapt(batch, noise=noise)
        assert runner.active, runner.fallback_reason
        torch.testing.assert_close(out.theta, eager.theta, rtol=1e-6, atol=1e-7)
        assert torch.equal(out.steps, eager.steps)


@cuda
@pytest.mark.cuda
def test_no_host_sync_in_the_cuda_inner_loop():
    learner, items = make("cuda")
    batch = planted_batch(items, 40, 3).to("cuda")
    noise = learner.draw_noise(batch, torch.Generator(device="cuda").manual_seed(0))
    learner.meta_loss(batch, noise=noise)  # warm up lazy initialisation outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        terms = learner.meta_loss(batch, noise=noise)
        terms.total.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
@pytest.mark.cuda
def test_capture_failure_falls_back_and_logs(caplog, monkeypatch):
    learner, items = make("cuda")
    runner = GraphedInnerLoop(learner, "meta_step")

    def broken(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(runner, "_capture", broken)
    batch = planted_batch(items, 40, 2).to("cuda")
    noise = learner.draw_noise(batch, torch.Generator(device="cuda").manual_seed(0))
    with caplog.at_level(logging.WARNING):
        terms = runner(batch, noise)
    assert not runner.active and "capture failed" in caplog.text
    assert torch.isfinite(terms.total)
