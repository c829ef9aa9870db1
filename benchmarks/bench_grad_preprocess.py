"""pytest-benchmark: grad_preprocess (paper Eq. 12), fused vs reference vs torch.compile.

  fused      torch.ops.s2meta.grad_preprocess (one elementwise pass)
  reference  the pure-PyTorch twin (abs, log, sign, two wheres and a stack)
  compiled   torch.compile of the reference (on the GPU with mode="reduce-overhead": CUDA graphs)
Sizes: the interaction recommender's θ at d = 64 (10,881 scalars) and d = 128 (43,265), and 1M
scalars. Values span both branches of Eq. 12 (|x| from 1e-7 to 1e2). Every case first checks
the output (and, for forward+backward, the gradient) against the reference. At these sizes an
OpenMP thread that the OS has descheduled costs milliseconds, so on a shared machine set
OMP_NUM_THREADS=1 for stable numbers. Run:
    python -m pytest benchmarks/bench_grad_preprocess.py --benchmark-columns=min,median,rounds
"""
from __future__ import annotations

import pytest
import torch

import s2meta_fast  # noqa: F401  (loads torch.ops.s2meta)
from s2meta_fast.ops import reference as ref
from harness import DEVICES, compile_reference, sync

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

SIZES = {"paper-d64": 10_881, "paper-d128": 43_265, "1M": 1 << 20}
IMPLS = ["fused", "reference", "compiled"]


def _fn(impl: str, device: str):
    if impl == "fused":
        return torch.ops.s2meta.grad_preprocess
    if impl == "reference":
        return ref.grad_preprocess
    return compile_reference(ref.grad_preprocess, device)


def _inputs(n: int, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    magnitude = torch.exp(torch.empty(n).uniform_(-16.0, 4.6, generator=gen))  # e^-16 < e^-10 < ... < 1e2
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    return (magnitude * sign).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_grad_preprocess(benchmark, device, size, impl, mode):
    x = _inputs(SIZES[size], device)
    fn = _fn(impl, device)
    weight = torch.randn(SIZES[size], 2, generator=torch.Generator().manual_seed(1)).to(device)

    with torch.no_grad():
        torch.testing.assert_close(fn(x, 10.0), ref.grad_preprocess(x, 10.0), rtol=1e-6, atol=1e-6)

    if mode == "forward":
        def step():
            with torch.no_grad():
                out = fn(x, 10.0)
            sync(device)
            return out
    else:
        leaf = x.clone().requires_grad_()
        want = torch.autograd.grad((ref.grad_preprocess(leaf, 10.0) * weight).sum(), leaf)[0]
        got = torch.autograd.grad((fn(leaf, 10.0) * weight).sum(), leaf)[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

        def step():
            out = torch.autograd.grad((fn(leaf, 10.0) * weight).sum(), leaf)[0]
            sync(device)
            return out

    step()  # warm-up (compilation, CUDA-graph recording, allocator)
    benchmark.group = f"grad_preprocess {mode} {size} {device}"
    benchmark.extra_info.update(scalars=SIZES[size], device=device)
    benchmark(step)
