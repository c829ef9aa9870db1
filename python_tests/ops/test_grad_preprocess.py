"""grad_preprocess (paper Eq. 12): fused kernels against the pure-PyTorch reference."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import s2meta_fast
from s2meta_fast import ops
from s2meta_fast.ops import reference as ref

pytestmark = pytest.mark.skipif(not s2meta_fast.backend().cpu_kernels, reason="compiled CPU kernels not built")
requires_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and s2meta_fast.backend().cuda_kernels),
                                   reason="needs a GPU and the compiled CUDA kernels")


def _specials(dtype, p=10.0):
    small = math.exp(-p)
    t = torch.tensor(small, dtype=dtype)
    below = torch.nextafter(t, torch.tensor(0.0, dtype=dtype)).item()
    above = torch.nextafter(t, torch.tensor(1.0, dtype=dtype)).item()
    big = 3e38 if dtype == torch.float32 else 1e300
    values = [0.0, -0.0, small, -small, below, -below, above, -above, 1e-30, -1e-30, 0.5, -2.0, big, -big,
              float("nan"), float("inf"), float("-inf")]
    return torch.tensor(values, dtype=dtype)


def _shapes(dtype):
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: (torch.randn(*s, generator=gen, dtype=torch.float64) * 10 ** torch.randint(-6, 3, s, generator=gen)).to(dtype)  # noqa: E731
    return {"empty": torch.empty(0, 3, dtype=dtype), "one": torch.tensor([0.25], dtype=dtype),
            "3d": rnd(2, 3, 4), "non_contiguous": rnd(5, 7).t(), "specials": _specials(dtype)}


class TestGradPreprocess:
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
    @pytest.mark.parametrize("case", ["empty", "one", "3d", "non_contiguous", "specials"])
    def test_matches_reference(self, case, dtype):
        x = _shapes(dtype)[case]
        got = ops.grad_preprocess(x)
        want = ref.grad_preprocess(x)
        assert got.shape == x.shape + (2,)
        # exact: both evaluate the same formula on the same operands
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)

    @pytest.mark.parametrize("p", [1.0, 10.0])
    def test_other_p(self, p):
        x = torch.linspace(-1, 1, 101, dtype=torch.float64)
        torch.testing.assert_close(ops.grad_preprocess(x, p), ref.grad_preprocess(x, p), rtol=1e-15, atol=0)

    def test_gradient_matches_reference(self):
        x = torch.cat([_specials(torch.float64)[:14], torch.linspace(-2, 2, 9, dtype=torch.float64)])
        # Exactly at |x| = e^-p the reference's clamp_min(e^-p) (there to keep log finite) zeroes the
        # gradient; the kernel's backward gives the log branch's 1/(p x), the branch the forward takes.
        x = x[(x.abs() != math.exp(-10.0)) & (x.abs() < 1e100)]
        upstream = torch.randn(x.shape + (2,), dtype=torch.float64)
        grads = []
        for fn in (ops.grad_preprocess, ref.grad_preprocess):
            leaf = x.clone().requires_grad_(True)
            (g,) = torch.autograd.grad((fn(leaf) * upstream).sum(), [leaf])
            grads.append(g)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=0)

    def test_gradcheck(self):
        # away from the |x| = e^-p switch, where Eq. 12 is discontinuous
        x = torch.tensor([-3.0, -0.2, -1e-5, 1e-5, 0.7, 4.0], dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: torch.ops.s2meta.grad_preprocess(t, 10.0), (x,))
        assert torch.autograd.gradcheck(lambda t: torch.ops.s2meta.grad_preprocess(t, 2.0), (x,))

    def test_opcheck(self):
        x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
        torch.library.opcheck(torch.ops.s2meta.grad_preprocess.default, (x, 10.0))

    @pytest.mark.parametrize("bad,match", [(torch.arange(4), "x"), (torch.ones(3, dtype=torch.float16), "x")],
                             ids=["integer", "half"])
    def test_bad_dtype_names_argument(self, bad, match):
        with pytest.raises(RuntimeError, match=match):
            torch.ops.s2meta.grad_preprocess(bad, 10.0)

    def test_bad_p(self):
        with pytest.raises(RuntimeError, match="p must be positive"):
            torch.ops.s2meta.grad_preprocess(torch.ones(2), 0.0)

    @settings(max_examples=30, deadline=None, derandomize=True)
    @given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=0, max_size=64),
           dtype=st.sampled_from([torch.float32, torch.float64]))
    def test_fuzz_against_reference(self, values, dtype):
        x = torch.tensor(values, dtype=dtype)
        # torch's vectorised log and libm's may differ in the last bit; nothing else may differ
        rtol = 1e-6 if dtype == torch.float32 else 1e-14
        torch.testing.assert_close(ops.grad_preprocess(x), ref.grad_preprocess(x), rtol=rtol, atol=0, equal_nan=True)


@requires_cuda
class TestGradPreprocessCuda:
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
    def test_cuda_matches_cpu(self, dtype):
        for x in _shapes(dtype).values():
            torch.testing.assert_close(ops.grad_preprocess(x.cuda()).cpu(), ops.grad_preprocess(x), rtol=1e-6,
                                       atol=0, equal_nan=True)
