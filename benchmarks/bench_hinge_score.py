"""hinge_score (forward + backward) and score_matrix: fused kernel vs reference vs torch.compile.

Run: ``pytest benchmarks/bench_hinge_score.py --benchmark-columns=min,median,mean,rounds``.
Each row is checked against the reference before it is timed. The backward is the inner loop's:
gradients w.r.t. the MLP only (the embeddings are frozen); "fused" goes through autograd,
"fused_direct" calls the forward and backward ops itself, "fused_one_pass" calls hinge_score_grad. Set OMP_NUM_THREADS=1 for stable
numbers on a shared machine. CUDA rows are skipped without a GPU;
on the GPU the compiled reference uses mode="reduce-overhead" (CUDA graphs).
"""
from __future__ import annotations

import functools

import pytest
import torch

import s2meta_fast  # noqa: F401  (loads torch.ops.s2meta)
from s2meta_fast.ops import reference
from harness import DEVICES

IMPLS = ["fused", "reference", "compiled"]
HINGE_IMPLS = ["fused", "fused_direct", "fused_one_pass", "reference", "compiled"]


def interaction_mlp(dim, device, gen):
    sizes = [2 * dim, dim, dim // 2, dim // 4, 1]
    weights = [torch.randn(o, i, generator=gen).div_(i ** 0.5).to(device) for i, o in zip(sizes, sizes[1:])]
    biases = [torch.randn(o, generator=gen).mul_(0.1).to(device) for o in sizes[1:]]
    return weights, biases


def fused_hinge(user, pos, neg, weights, biases):
    return torch.ops.s2meta.hinge_score(user, pos, neg, weights, biases, 1.0)


@functools.lru_cache(maxsize=None)
def compiled(fn, device):
    mode = "reduce-overhead" if device == "cuda" else None
    return torch.compile(fn, mode=mode, dynamic=False)


def train_step(hinge, user, pos, neg, params):
    """One inner-loop step's scoring work: the loss and its gradient w.r.t. every MLP tensor."""
    half = len(params) // 2
    loss, _, _ = hinge(user, pos, neg, params[:half], params[half:])
    return (loss, *torch.autograd.grad(loss, params))


def direct_step(user, pos, neg, params):
    """The same through the two ops without autograd, as a first-order inner loop can call them
    (docs/spec.md §5: the inner gradient is a constant), skipping ~100 us of autograd bookkeeping."""
    half = len(params) // 2
    weights, biases = [p.detach() for p in params[:half]], [p.detach() for p in params[half:]]
    loss, pos_score, neg_score = torch.ops.s2meta.hinge_score(user, pos, neg, weights, biases, 1.0)
    d_weights, d_biases, _, _, _ = torch.ops.s2meta.hinge_score_backward(
        torch.ones_like(loss), torch.zeros_like(pos_score), torch.zeros_like(neg_score), user, pos, neg,
        weights, biases, 1.0, False)
    return (loss, *d_weights, *d_biases)


def one_pass_step(user, pos, neg, params):
    """Loss and MLP gradient from hinge_score_grad: the backward's single fused pass."""
    half = len(params) // 2
    weights, biases = [p.detach() for p in params[:half]], [p.detach() for p in params[half:]]
    loss, _, _, d_weights, d_biases = torch.ops.s2meta.hinge_score_grad(user, pos, neg, weights, biases, 1.0)
    return (loss, *d_weights, *d_biases)


def timed(fn, device):
    if device != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", HINGE_IMPLS)
@pytest.mark.parametrize("batch,dim", [(128, 64), (128, 128), (4096, 64), (4096, 128)])
def test_hinge_score_train_step(benchmark, batch, dim, impl, device):
    gen = torch.Generator().manual_seed(0)
    weights, biases = interaction_mlp(dim, device, gen)
    params = [t.requires_grad_() for t in weights + biases]
    user, pos, neg = (torch.randn(batch, dim, generator=gen).to(device) for _ in range(3))
    if impl in ("fused_direct", "fused_one_pass"):
        step = functools.partial(direct_step if impl == "fused_direct" else one_pass_step, user, pos, neg, params)
    else:
        hinge = {"fused": fused_hinge, "reference": reference.hinge_score,
                 "compiled": compiled(reference.hinge_score, device)}[impl]
        step = functools.partial(train_step, hinge, user, pos, neg, params)
    for got, want in zip(step(), train_step(reference.hinge_score, user, pos, neg, params)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    benchmark.group = f"hinge_score fwd+bwd N={batch} d={dim} {device}"
    benchmark(timed(step, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_score_matrix_scenario(benchmark, impl, device):
    gen = torch.Generator().manual_seed(0)
    weights, biases = interaction_mlp(64, device, gen)
    users = torch.randn(300, 64, generator=gen).to(device)
    items = torch.randn(500, 64, generator=gen).to(device)
    fn = {"fused": torch.ops.s2meta.score_matrix, "reference": reference.score_matrix,
          "compiled": compiled(reference.score_matrix, device)}[impl]
    step = functools.partial(fn, users, items, weights, biases)
    with torch.no_grad():
        torch.testing.assert_close(step(), reference.score_matrix(users, items, weights, biases),
                                   rtol=1e-4, atol=1e-5)
        benchmark.group = f"score_matrix 300 users x 500 items d=64 {device}"
        benchmark(timed(step, device))
