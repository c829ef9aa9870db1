"""lstm_update_multi / lstm_update: fused kernels against the pure-PyTorch reference."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import s2meta_fast
from s2meta_fast import ops
from s2meta_fast.ops import reference as ref
from s2meta_fast.ops.sample_inputs import DIFFERENTIABLE, cast, make_multi_args, with_grad

from cpu_isa_env import expected_cpu_isa

pytestmark = pytest.mark.skipif(not s2meta_fast.backend().cpu_kernels, reason="compiled CPU kernels not built")
requires_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and s2meta_fast.backend().cuda_kernels),
                                   reason="needs a GPU and the compiled CUDA kernels")

# fp32: the kernel's activations differ from ATen's by a few ulp and LayerNorm amplifies that by
# its rstd, so values are compared at 1e-5 relative (docs/spec.md §8) with a matching absolute floor.
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}
OUTPUTS = ("theta_new", "h_new", "c_new", "alpha", "beta")

CASES = {
    "one_element": dict(S=1, sizes=[1]),
    "odd_segments": dict(S=1, sizes=[37, 1, 16, 100, 5]),
    "scenarios": dict(S=3, sizes=[33, 2, 17]),
    "empty_segment": dict(S=2, sizes=[5, 0, 19]),
    "no_layer_norm": dict(S=2, sizes=[20, 7], layer_norm=False),
    "hidden_8": dict(S=2, sizes=[9, 24], H=8),
    # H = 1 with LayerNorm is degenerate (u - mean(u) = 0, amplified by rstd = 316): fp64 fuzz covers it
    "hidden_1": dict(S=1, sizes=[6], H=1, layer_norm=False),
}


def _run_both(args, upstream_seed=1):
    """Outputs and input gradients of the kernel and of the reference for the same upstream grads."""
    results = []
    for fn in (torch.ops.s2meta.lstm_update_multi, ref.lstm_update_multi):
        a = with_grad(args)
        out = fn(*a.values())
        gen = torch.Generator().manual_seed(upstream_seed)
        weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in out]
        total = sum((o * w).sum() for o, w in zip(out, weights))
        inputs = [a[k] for k in DIFFERENTIABLE if a[k] is not None]
        grads = torch.autograd.grad(total, inputs) if total.requires_grad else [torch.zeros_like(t) for t in inputs]
        results.append(([o.detach() for o in out], grads))
    return results


def _assert_same(kernel, reference, dtype, names):
    for name, got, want in zip(names, kernel, reference):
        torch.testing.assert_close(got, want, **TOL[dtype], equal_nan=True, msg=lambda m: f"{name}: {m}")


class TestLstmUpdateMulti:
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
    @pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
    def test_matches_reference(self, case, dtype):
        args = make_multi_args(dtype=dtype, seed=list(CASES).index(case), **CASES[case])
        (out_k, grads_k), (out_r, grads_r) = _run_both(args)
        _assert_same(out_k, out_r, dtype, OUTPUTS)
        names = [k for k in DIFFERENTIABLE if args[k] is not None]
        _assert_same(grads_k, grads_r, dtype, [f"d_{n}" for n in names])

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
    def test_empty_theta(self, dtype):
        for S, sizes in ((2, [0]), (0, [4, 3])):
            args = make_multi_args(S=S, sizes=sizes, dtype=dtype)
            out = torch.ops.s2meta.lstm_update_multi(*args.values())
            assert [tuple(o.shape) for o in out] == [(S, sum(sizes)), (S, sum(sizes), 16), (S, sum(sizes), 16),
                                                     (S, sum(sizes)), (S, sum(sizes))]
            a = with_grad(args)
            out = torch.ops.s2meta.lstm_update_multi(*a.values())
            grads = torch.autograd.grad(sum(o.sum() for o in out), [a["w_ih"], a["h"]], allow_unused=True)
            assert torch.count_nonzero(grads[0]) == 0 and grads[1].shape == a["h"].shape

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
    def test_special_values(self, dtype):
        small = math.exp(-10.0)
        below = torch.nextafter(torch.tensor(small, dtype=dtype), torch.tensor(0.0, dtype=dtype)).item()
        above = torch.nextafter(torch.tensor(small, dtype=dtype), torch.tensor(1.0, dtype=dtype)).item()
        specials = [0.0, -0.0, small, -small, below, -below, above, -above, 0.5, -3.0, 1.0, -1.0, 1.5, 1e30,
                    -1e30, 3e38 if dtype == torch.float32 else 1e300, float("nan"), float("inf"), float("-inf")]
        n = len(specials)
        values = torch.tensor(specials, dtype=dtype)
        args = make_multi_args(S=n, sizes=[n], dtype=dtype, seed=3)
        # every (theta, grad) pair of specials, one scenario per theta value
        args["theta"] = values.unsqueeze(1).expand(n, n).contiguous()
        args["grad"] = values.unsqueeze(0).expand(n, n).contiguous()
        args["loss"] = torch.tensor([0.0, small, below, above, 2.0, 1e30] + [0.3] * (n - 6), dtype=dtype)
        (out_k, grads_k), (out_r, grads_r) = _run_both(args)
        _assert_same(out_k, out_r, dtype, OUTPUTS)
        assert torch.isnan(out_k[0]).any() and torch.isinf(out_k[0]).any()  # NaN/Inf reached the update
        # In fp32, |theta| >= 1e30 makes d(theta')/d(beta) = theta * upstream huge: the LayerNorm
        # backward then cancels ~1e22-sized terms (or overflows to inf - inf), so the result depends
        # on the summation order. Those rows are compared in fp64 only.
        rows = torch.ones(n, dtype=torch.bool) if dtype == torch.float64 else ~(values.abs() >= 1e29)
        _assert_same([g[rows] for g in grads_k[:3]], [g[rows] for g in grads_r[:3]], dtype,
                     ["d_theta", "d_h", "d_c"])

    def test_gradcheck(self):
        for layer_norm in (True, False):
            args = make_multi_args(S=2, sizes=[3, 1, 4], H=4, layer_norm=layer_norm, seed=5)
            names = [k for k in DIFFERENTIABLE if k != "theta" and args[k] is not None]

            def fn(*tensors):
                a = dict(args, **dict(zip(names, tensors)))
                return torch.ops.s2meta.lstm_update_multi(*a.values())

            # theta also feeds the stop-gradient features, which finite differences would see; its
            # gradient is checked against the reference's autograd in test_matches_reference.
            inputs = [args[k].clone().requires_grad_(True) for k in names]
            assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)

    def test_opcheck(self):
        for layer_norm in (True, False):
            args = with_grad(make_multi_args(S=2, sizes=[5, 3], H=4, layer_norm=layer_norm, seed=7))
            torch.library.opcheck(torch.ops.s2meta.lstm_update_multi.default, tuple(args.values()))
            plain = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
            out = torch.ops.s2meta.lstm_update_multi(*plain.values())
            torch.library.opcheck(torch.ops.s2meta.lstm_update_multi_backward.default,
                                  tuple(torch.randn_like(o) for o in out) + tuple(plain.values()))

    def test_many_chunks(self):
        """Several 64-block chunks per controller: per-chunk partial sums, summed in chunk order."""
        case = dict(S=2, sizes=[2100, 3, 40], seed=5)
        (out_k, grads_k), (out_r, grads_r) = _run_both(make_multi_args(dtype=torch.float64, **case))
        _assert_same(out_k, out_r, torch.float64, OUTPUTS)
        _assert_same(grads_k, grads_r, torch.float64, DIFFERENTIABLE)
        # fp32 against the fp64 truth: a weight gradient sums ~4,000 terms, hence the wider bound
        (_, grads_32), _ = _run_both(make_multi_args(dtype=torch.float32, **case))
        for name, got, want in zip(DIFFERENTIABLE, grads_32, grads_r):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")

    def test_deterministic_across_threads(self):
        args = make_multi_args(S=2, sizes=[3000, 64, 700], dtype=torch.float32, seed=11)
        previous = torch.get_num_threads()
        try:
            grads = []
            for threads in (1, 2, 2):
                torch.set_num_threads(threads)
                grads.append(_run_both(args)[0][1])
        finally:
            torch.set_num_threads(previous)
        for other in grads[1:]:
            for a, b in zip(grads[0], other):
                assert torch.equal(a, b)

    def test_double_backward_raises(self):
        a = with_grad(make_multi_args(S=1, sizes=[4], H=4))
        out = torch.ops.s2meta.lstm_update_multi(*a.values())
        (d_w,) = torch.autograd.grad(out[0].sum(), [a["w_gate"]], create_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            d_w.sum().backward()

    @pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
    def test_each_cpu_isa_matches_reference(self, isa):
        """Each ISA build of the kernel (S2META_CPU_ISA caps it) matches the reference, forward and backward."""
        code = (
            "import torch, s2meta_fast\n"
            "from s2meta_fast.ops import reference as ref\n"
            "from s2meta_fast.ops.sample_inputs import make_multi_args, with_grad\n"
            "a = make_multi_args(S=2, sizes=[37, 5, 70], dtype=torch.float32, seed=2)\n"
            "ak, ar = with_grad(a), with_grad(a)\n"
            "k, r = torch.ops.s2meta.lstm_update_multi(*ak.values()), ref.lstm_update_multi(*ar.values())\n"
            "for x, y in zip(k, r): torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)\n"
            "sum((o * (i + 1)).sum() for i, o in enumerate(k)).backward()\n"
            "sum((o * (i + 1)).sum() for i, o in enumerate(r)).backward()\n"
            "for n, t in ak.items():\n"
            "    if isinstance(t, torch.Tensor) and t.grad is not None:\n"
            "        torch.testing.assert_close(t.grad, ar[n].grad, rtol=1e-4, atol=1e-4)\n"
            "print(torch.ops.s2meta.cpu_isa())\n")
        env = dict(os.environ, S2META_CPU_ISA=isa)
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.split()[-1] == expected_cpu_isa(isa)

    @settings(max_examples=30, deadline=None, derandomize=True)
    @given(S=st.integers(1, 3), sizes=st.lists(st.integers(0, 40), min_size=1, max_size=4),
           H=st.sampled_from([1, 4, 16]), layer_norm=st.booleans(), seed=st.integers(0, 10_000),
           theta_exp=st.integers(-12, 4), grad_exp=st.integers(-12, 4))
    def test_fuzz_against_reference(self, S, sizes, H, layer_norm, seed, theta_exp, grad_exp):
        args = make_multi_args(S=S, sizes=sizes, H=H, layer_norm=layer_norm, seed=seed,
                               theta_scale=10.0 ** theta_exp, grad_scale=10.0 ** grad_exp)
        (out_k, grads_k), (out_r, grads_r) = _run_both(args, upstream_seed=seed)
        _assert_same(out_k, out_r, torch.float64, OUTPUTS)
        _assert_same(grads_k, grads_r, torch.float64, [k for k in DIFFERENTIABLE if args[k] is not None])


BAD_INPUTS = [
    ("integer theta", lambda a: a.update(theta=a["theta"].long()), "theta"),
    ("integer grad", lambda a: a.update(grad=a["grad"].int()), "grad"),
    ("mixed dtypes", lambda a: a.update(h=a["h"].float()), "h"),
    ("h rows != N", lambda a: a.update(h=a["h"][:, :-1], c=a["c"][:, :-1]), "h"),
    ("c shape != h shape", lambda a: a.update(c=a["c"][..., :-1]), "c"),
    ("h width != H of the weights", lambda a: a.update(h=a["h"][..., :8], c=a["c"][..., :8]), "w_ih"),
    ("w_ih not [K,4H,5]", lambda a: a.update(w_ih=a["w_ih"][..., :4]), "w_ih"),
    ("w_hh wrong", lambda a: a.update(w_hh=a["w_hh"][:, :-1]), "w_hh"),
    ("b_gate wrong", lambda a: a.update(b_gate=a["b_gate"][:, :1]), "b_gate"),
    ("offsets decreasing", lambda a: a.update(offsets=[0, 30, 20, 46]), "offsets"),
    ("offsets end != N", lambda a: a.update(offsets=[0, 20, 30, 45]), "offsets"),
    ("ln_weight without ln_bias", lambda a: a.update(ln_bias=None), "ln_"),
    ("loss not [S]", lambda a: a.update(loss=a["loss"][:1]), "loss"),
    ("negative clip", lambda a: a.update(clip=-1.0), "clip"),
]


class TestBadInput:
    @pytest.mark.parametrize("mutate,name", [(m, n) for _, m, n in BAD_INPUTS], ids=[i for i, _, _ in BAD_INPUTS])
    def test_multi_error_names_argument(self, mutate, name):
        args = make_multi_args(S=2, sizes=[20, 10, 16], dtype=torch.float64)
        mutate(args)
        with pytest.raises((RuntimeError, ValueError, TypeError), match=name):
            ops.lstm_update_multi(*args.values())

    @pytest.mark.parametrize("mutate,name", [
        (lambda a: a.update(h=a["h"][:-1], c=a["c"][:-1]), "h"),
        (lambda a: a.update(w_ih=a["w_ih"][:, :4]), "w_ih"),
        (lambda a: a.update(loss=a["loss"].reshape(1)), "loss"),
        (lambda a: a.update(grad=a["grad"][:-1]), "grad"),
    ], ids=["h rows", "w_ih", "loss not 0-dim", "grad shape"])
    def test_single_error_names_argument(self, mutate, name):
        args = _single_args(torch.float64)
        mutate(args)
        with pytest.raises((RuntimeError, ValueError, TypeError), match=name):
            ops.lstm_update(*args.values())


def _single_args(dtype, shape=(6, 5), H=16, seed=4):
    m = make_multi_args(S=1, sizes=[math.prod(shape)], H=H, dtype=dtype, seed=seed)
    return dict(theta=m["theta"].reshape(shape), grad=m["grad"].reshape(shape), loss=m["loss"][0],
                h=m["h"][0], c=m["c"][0], w_ih=m["w_ih"][0], w_hh=m["w_hh"][0], b_ih=m["b_ih"][0],
                b_hh=m["b_hh"][0], ln_weight=m["ln_weight"][0], ln_bias=m["ln_bias"][0], w_gate=m["w_gate"][0],
                b_gate=m["b_gate"][0], p=10.0, clip=1.0)


class TestLstmUpdateSingle:
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
    @pytest.mark.parametrize("layout", ["2d", "3d", "transposed", "one"])
    def test_matches_reference(self, layout, dtype):
        shape = {"2d": (6, 5), "3d": (3, 4, 5), "transposed": (5, 6), "one": (1,)}[layout]
        args = _single_args(dtype, shape)
        if layout == "transposed":  # non-contiguous theta, grad and state
            args["theta"], args["grad"] = args["theta"].t(), args["grad"].t()
            args["h"] = args["h"].t().contiguous().t()
        results = []
        for fn in (ops.lstm_update, ref.lstm_update):
            a = {k: v.detach().clone().requires_grad_(k in DIFFERENTIABLE) if isinstance(v, torch.Tensor) else v
                 for k, v in args.items()}
            out = fn(*a.values())
            total = sum((o * (i + 1)).sum() for i, o in enumerate(out))
            inputs = [a[k] for k in DIFFERENTIABLE]
            results.append((out, torch.autograd.grad(total, inputs)))
        (out_k, g_k), (out_r, g_r) = results
        assert out_k[0].shape == args["theta"].shape and out_k[3].shape == args["theta"].shape
        _assert_same([o.detach() for o in out_k], [o.detach() for o in out_r], dtype, OUTPUTS)
        _assert_same(g_k, g_r, dtype, [f"d_{k}" for k in DIFFERENTIABLE])

    def test_opcheck(self):
        args = _single_args(torch.float64, shape=(3, 2), H=4)
        args = {k: v.requires_grad_(k in DIFFERENTIABLE) if isinstance(v, torch.Tensor) else v
                for k, v in args.items()}
        torch.library.opcheck(torch.ops.s2meta.lstm_update.default, tuple(args.values()),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))

    def test_compile_fullgraph(self):
        args = _single_args(torch.float32, shape=(4, 3), H=4)
        step = torch.compile(lambda *a: torch.ops.s2meta.lstm_update(*a), fullgraph=True, dynamic=False)
        for got, want in zip(step(*args.values()), ref.lstm_update(*args.values())):
            torch.testing.assert_close(got, want, **TOL[torch.float32])


@requires_cuda
class TestCuda:
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
    @pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
    def test_cuda_matches_cpu(self, case, dtype):
        args = make_multi_args(dtype=dtype, seed=17, **CASES[case])
        cpu = _run_both(args)[0]
        cuda_args = cast(args, device="cuda")
        a = with_grad(cuda_args)
        out = torch.ops.s2meta.lstm_update_multi(*a.values())
        gen = torch.Generator().manual_seed(1)
        weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in out]
        inputs = [a[k] for k in DIFFERENTIABLE if a[k] is not None]
        grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, weights)), inputs)
        _assert_same([o.detach().cpu() for o in out], cpu[0], dtype, OUTPUTS)
        _assert_same([g.cpu() for g in grads], cpu[1], dtype, [k for k in DIFFERENTIABLE if args[k] is not None])

    def test_cuda_paper_size_fp32(self):
        from s2meta_fast.ops.sample_inputs import interaction_sizes
        args = make_multi_args(S=2, sizes=interaction_sizes(64), dtype=torch.float32, seed=3)
        out_cpu = torch.ops.s2meta.lstm_update_multi(*args.values())
        out_gpu = torch.ops.s2meta.lstm_update_multi(*cast(args, device="cuda").values())
        for got, want in zip(out_gpu, out_cpu):
            torch.testing.assert_close(got.cpu(), want, **TOL[torch.float32])

    def test_cuda_graph_replay_equals_eager(self):
        args = cast(make_multi_args(S=2, sizes=[300, 7, 64], dtype=torch.float32, seed=9), device="cuda")
        static = dict(args)
        eager = torch.ops.s2meta.lstm_update_multi(*static.values())
        a = with_grad(static)
        eager_grads = torch.autograd.grad(sum(o.sum() for o in torch.ops.s2meta.lstm_update_multi(*a.values())),
                                          [a["w_ih"], a["h"]])
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside capture, as CUDA graphs require
            torch.ops.s2meta.lstm_update_multi(*static.values())
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = torch.ops.s2meta.lstm_update_multi(*static.values())
            captured_grads = torch.ops.s2meta.lstm_update_multi_backward(
                *[torch.ones_like(o) for o in captured], *static.values())
        static["theta"].mul_(1.0)  # same inputs; replay must reproduce eager bit for bit
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(captured, eager):
            assert torch.equal(got, want)
        assert torch.equal(captured_grads[3], eager_grads[0]) and torch.equal(captured_grads[1], eager_grads[1])

    def test_mixed_devices_rejected(self):
        args = make_multi_args(S=1, sizes=[8], dtype=torch.float32)
        args["h"] = args["h"].cuda()
        with pytest.raises(RuntimeError, match="h"):
            torch.ops.s2meta.lstm_update_multi(*args.values())

    def test_too_many_controllers_rejected(self):
        args = cast(make_multi_args(S=1, sizes=[1] * 65, H=4, dtype=torch.float32), device="cuda")
        with pytest.raises(RuntimeError, match="at most 64 controllers"):
            torch.ops.s2meta.lstm_update_multi(*args.values())
