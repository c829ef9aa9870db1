"""pytest-benchmark: one update-controller step (lstm_update_multi), fused vs reference vs torch.compile.

Three implementations of the same step, timed in the same run:
  fused      torch.ops.s2meta.lstm_update_multi (one kernel launch / one parallel CPU pass)
  reference  the pure-PyTorch twin (a loop over the K tensors), what the authors' code does
  compiled   torch.compile of the reference (on the GPU with mode="reduce-overhead": CUDA graphs)
Sizes: the interaction recommender with d=64 (10,881 scalars) and d=128 (43,265), all 8 tensors,
H=16, and 1M / 8M scalars split over 8 tensors. Every case first checks that the fused output
equals the reference before it is timed. Run:
    python -m pytest benchmarks/bench_lstm_update.py --benchmark-columns=min,median,rounds
The 8M case is skipped on the CPU: the reference alone needs ~10 GB of intermediates and
seconds per call there.
"""
from __future__ import annotations

import pytest
import torch

from s2meta_fast.ops import reference as ref
from s2meta_fast.ops.sample_inputs import DIFFERENTIABLE, interaction_sizes, make_multi_args, with_grad
from harness import DEVICES, compile_reference, sync

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

SIZES = {
    "paper-d64": interaction_sizes(64),
    "paper-d128": interaction_sizes(128),
    "1M": [1 << 17] * 8,
    "8M": [1 << 20] * 8,
}
IMPLS = ["fused", "reference", "compiled"]


def _fn(impl: str, device: str):
    if impl == "fused":
        return torch.ops.s2meta.lstm_update_multi
    if impl == "reference":
        return ref.lstm_update_multi
    return compile_reference(ref.lstm_update_multi, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_lstm_update_step(benchmark, device, size, impl, mode):
    n = sum(SIZES[size])
    if device == "cpu" and size == "8M":
        pytest.skip("8M scalars: the CPU reference needs ~10 GB and seconds per call")
    if mode == "forward+backward" and not size.startswith("paper"):
        pytest.skip("forward+backward is timed at the paper sizes only")
    if device == "cpu" and size == "1M" and impl == "compiled":
        pytest.skip("compiling the reference at 1M scalars takes minutes on 2 cores")
    args = make_multi_args(S=1, sizes=SIZES[size], dtype=torch.float32, seed=0, device=device)
    fn = _fn(impl, device)

    fused_out = torch.ops.s2meta.lstm_update_multi(*args.values())
    with torch.no_grad():
        check = fn(*args.values())
    for got, want in zip(fused_out, check):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    if mode == "forward":
        def step():
            with torch.no_grad():
                out = fn(*args.values())
            sync(device)
            return out
    else:
        leaves = with_grad(args)
        inputs = [leaves[k] for k in DIFFERENTIABLE if leaves[k] is not None]

        def step():
            out = fn(*leaves.values())
            grads = torch.autograd.grad(out[0].sum() + out[1].sum() + out[2].sum(), inputs)
            sync(device)
            return grads

    step()  # warm-up (compilation, CUDA-graph recording, allocator)
    benchmark.extra_info.update(scalars=n, tensors=len(SIZES[size]), hidden=16, device=device)
    rounds = 3 if (impl == "reference" and n > 100_000) else 20
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
