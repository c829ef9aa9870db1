"""Every CUDA op, forward and backward, once at small and awkward sizes: the workload that
`compute-sanitizer --tool memcheck|racecheck|synccheck|initcheck` runs over (benchmarks/device_check.sh).

Sizes are chosen to reach the kernels' edge paths, not to be fast: tails that do not fill a block,
an empty tensor among the K, S > 1, LayerNorm on and off, d = 64 / 128 / 256 (scoring weights in
shared memory and from global memory), partial strips of score_matrix, many-scenario hinge backward.
Each result is also compared with the pure-PyTorch reference so a sanitizer-clean but wrong
kernel still fails. Exit status 0 only if every comparison held.

Usage: compute-sanitizer --tool memcheck python benchmarks/studies/gpu_sanitize.py
"""
from __future__ import annotations

import os
import sys

import torch

from s2meta_fast import ops
from s2meta_fast.ops import reference as ref

from s2meta_fast.ops.sample_inputs import DIFFERENTIABLE, make_embeddings, make_mlp, make_multi_args, with_grad

DEV = os.environ.get("GPU_SANITIZE_DEVICE", "cuda")  # "cpu" smoke-tests this script without a GPU
failures: list = []


def check(name, got, want, dtype):
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    try:
        torch.testing.assert_close(got.detach().cpu().double(), want.detach().cpu().double(), **tol)
    except AssertionError as err:
        failures.append(f"{name}: {str(err).splitlines()[0]}")


def lstm_cases():
    for dtype in (torch.float32, torch.float64):
        for S, sizes, ln in (((1, [7, 0, 33, 1], True)), (3, [300, 5, 129, 1], False), (2, [1030, 64, 17], True)):
            yield dtype, S, sizes, ln


def run_lstm():
    for dtype, S, sizes, ln in lstm_cases():
        args = make_multi_args(S=S, sizes=sizes, dtype=dtype, layer_norm=ln, seed=S, device=DEV)
        name = f"lstm_update_multi[{dtype}-S{S}-{sizes}-ln{ln}]"
        # the reference runs in fp64 on the CPU: fp32 sums over a thousand coordinates differ by order
        fused, want = with_grad(args), with_grad({k: (v.cpu().double() if isinstance(v, torch.Tensor) and
                                                      v.is_floating_point() else v) for k, v in args.items()})
        out = torch.ops.s2meta.lstm_update_multi(*fused.values())
        exp = ref.lstm_update_multi(*want.values())
        for i, (a, b) in enumerate(zip(out, exp)):
            check(f"{name} out{i}", a, b, dtype)
        ins_f = [fused[k] for k in DIFFERENTIABLE if fused[k] is not None]
        ins_r = [want[k] for k in DIFFERENTIABLE if want[k] is not None]
        grads_f = torch.autograd.grad(sum((o * (i + 1)).sum() for i, o in enumerate(out)), ins_f, allow_unused=True)
        grads_r = torch.autograd.grad(sum((o * (i + 1)).sum() for i, o in enumerate(exp)), ins_r, allow_unused=True)
        for k, a, b in zip([k for k in DIFFERENTIABLE if fused[k] is not None], grads_f, grads_r):
            if a is not None and b is not None:
                check(f"{name} d{k}", a, b, dtype)


def on_device(tensors):
    return [t.to(DEV) for t in tensors]


def run_scoring():
    for dtype in (torch.float32, torch.float64):
        for S, n, dim, layers in ((None, 130, 64, 4), (3, 64, 128, 4), (2, 7, 256, 4), (1, 0, 8, 2), (40, 33, 64, 4)):
            name = f"hinge_score[{dtype}-S{S}-n{n}-d{dim}-L{layers}]"
            ws, bs = (on_device(ts) for ts in make_mlp(dim, layers, S, dtype))
            u, p, q = on_device(make_embeddings(3, n, dim, S, dtype))
            leaves = [t.clone().requires_grad_() for t in (u, p, q, *ws, *bs)]
            cpu = [t.detach().cpu().requires_grad_() for t in leaves]
            k = len(ws)
            out = ops.hinge_score(leaves[0], leaves[1], leaves[2], leaves[3:3 + k], leaves[3 + k:], 1.0)
            exp = ref.hinge_score(cpu[0], cpu[1], cpu[2], cpu[3:3 + k], cpu[3 + k:], 1.0)
            for i, (a, b) in enumerate(zip(out, exp)):
                check(f"{name} out{i}", a, b, dtype)
            ga = torch.autograd.grad(out[0].sum() + out[1].sum() * 0.5, leaves, allow_unused=True)
            gb = torch.autograd.grad(exp[0].sum() + exp[1].sum() * 0.5, cpu, allow_unused=True)
            for i, (a, b) in enumerate(zip(ga, gb)):
                if a is not None and b is not None:
                    check(f"{name} grad{i}", a, b, dtype)
            if n:
                got = torch.ops.s2meta.hinge_score_grad(u, p, q, ws, bs, 1.0)
                want = torch.ops.s2meta.hinge_score_grad(u.cpu(), p.cpu(), q.cpu(), [w.cpu() for w in ws],
                                                         [b.cpu() for b in bs], 1.0)
                flat = lambda o: [*o[:3], *o[3], *o[4]]  # noqa: E731
                for i, (a, b) in enumerate(zip(flat(got), flat(want))):
                    check(f"hinge_score_grad[{dtype}-S{S}-n{n}-d{dim}] {i}", a, b, dtype)
        for S, A, B, dim, layers in ((None, 300, 500, 64, 4), (3, 7, 130, 128, 4), (2, 5, 9, 256, 4),
                                     (None, 3, 7, 8, 1), (1, 7, 0, 8, 2)):
            ws, bs = (on_device(ts) for ts in make_mlp(dim, layers, S, dtype, seed=4))
            (u,), (it,) = on_device(make_embeddings(1, A, dim, S, dtype, seed=5)), on_device(
                make_embeddings(1, B, dim, S, dtype, seed=6))
            got = ops.score_matrix(u, it, ws, bs)
            want = ref.score_matrix(u.cpu(), it.cpu(), [w.cpu() for w in ws], [b.cpu() for b in bs])
            check(f"score_matrix[{dtype}-S{S}-{A}x{B}-d{dim}-L{layers}]", got, want, dtype)
        x = torch.randn(1031, dtype=dtype, device=DEV) * torch.logspace(-8, 2, 1031, dtype=dtype, device=DEV)
        x = x.requires_grad_()
        xc = x.detach().cpu().requires_grad_()
        check(f"grad_preprocess[{dtype}]", ops.grad_preprocess(x), ref.grad_preprocess(xc), dtype)
        check(f"grad_preprocess[{dtype}] grad", torch.autograd.grad(ops.grad_preprocess(x).sum(), x)[0],
              torch.autograd.grad(ref.grad_preprocess(xc).sum(), xc)[0], dtype)
        empty = torch.empty(0, dtype=dtype, device=DEV)
        assert ops.grad_preprocess(empty).shape == (0, 2)


def main() -> int:
    if DEV == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    run_lstm()
    run_scoring()
    if DEV == "cuda":
        torch.cuda.synchronize()
    for line in failures:
        print("MISMATCH", line)
    print(f"gpu_sanitize: {len(failures)} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
