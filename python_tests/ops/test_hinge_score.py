"""hinge_score and its fused backward against the pure-PyTorch reference."""
from __future__ import annotations

import pytest
import torch

import s2meta_fast  # noqa: F401  (loads torch.ops.s2meta)
from cpu_isa_env import expected_cpu_isa
from s2meta_fast.ops.sample_inputs import (flat_theta_views, make_embeddings, make_mlp, strided_rows, tolerances,
                       transposed_storage, views_of)
from s2meta_fast.ops import reference

op = torch.ops.s2meta.hinge_score
DTYPES = [torch.float32, torch.float64]
# (scenarios or None, triples N, embedding width d, layers)
CASES = [
    (None, 0, 8, 4),
    (None, 1, 8, 4),
    (None, 7, 16, 3),
    (None, 64, 64, 4),
    (None, 130, 16, 2),
    (1, 7, 8, 1),
    (1, 0, 8, 2),
    (3, 64, 8, 3),
    (3, 130, 16, 4),
]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def case_id(case):
    scenarios, n, dim, layers = case
    return f"S{scenarios}-N{n}-d{dim}-L{layers}"


def make_case(case, dtype, seed=0):
    scenarios, n, dim, layers = case
    weights, biases = make_mlp(dim, layers, scenarios, dtype, seed=seed)
    user, pos, neg = make_embeddings(3, n, dim, scenarios, dtype, seed=seed + 1)
    return user, pos, neg, weights, biases


def run_both(user, pos, neg, weights, biases, margin=1.0):
    """Loss, scores and every input gradient, from the kernel and from the reference."""
    results = []
    for fn in (op, reference.hinge_score):
        leaves = [t.detach().clone().requires_grad_() for t in [user, pos, neg, *weights, *biases]]
        layers = len(weights)
        out = fn(leaves[0], leaves[1], leaves[2], leaves[3:3 + layers], leaves[3 + layers:], margin)
        gen = torch.Generator().manual_seed(7)
        upstream = [torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device) for o in out]
        grads = torch.autograd.grad(out, leaves, upstream, allow_unused=True)
        results.append(([o.detach() for o in out], grads))
    return results


class TestHingeScore:
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("case", CASES, ids=case_id)
    def test_matches_reference(self, case, dtype):
        user, pos, neg, weights, biases = make_case(case, dtype)
        (outs, grads), (ref_outs, ref_grads) = run_both(user, pos, neg, weights, biases, margin=0.5)
        for got, want in zip(outs, ref_outs):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, **tolerances(dtype))
        for got, want in zip(grads, ref_grads):
            want = torch.zeros_like(got) if want is None else want
            torch.testing.assert_close(got, want, **tolerances(dtype))

    def test_hinge_is_active_on_both_sides(self):
        # Guards the test above: with these inputs some triples are inside the margin and some
        # outside, so both branches of the hinge gradient are exercised.
        user, pos, neg, weights, biases = make_case((None, 64, 64, 4), torch.float64)
        _, pos_score, neg_score = op(user, pos, neg, weights, biases, 0.5)
        active = (0.5 - pos_score + neg_score) > 0
        assert 0 < int(active.sum()) < 64

    def test_empty_batch_loss_is_zero(self):
        user, pos, neg, weights, biases = make_case((2, 0, 8, 3), torch.float64)
        loss, pos_score, _ = op(user, pos, neg, weights, biases, 1.0)
        assert loss.shape == (2,) and pos_score.shape == (2, 0)
        assert torch.equal(loss, torch.zeros(2, dtype=torch.float64))

    def test_backward_without_embedding_gradients(self):
        user, pos, neg, weights, biases = make_case((3, 40, 16, 4), torch.float64)
        d_loss, d_pos, d_neg = torch.rand(3, dtype=torch.float64), torch.randn(3, 40, dtype=torch.float64), \
            torch.randn(3, 40, dtype=torch.float64)
        full = torch.ops.s2meta.hinge_score_backward(d_loss, d_pos, d_neg, user, pos, neg, weights, biases, 1.0, True)
        lean = torch.ops.s2meta.hinge_score_backward(d_loss, d_pos, d_neg, user, pos, neg, weights, biases, 1.0, False)
        for got, want in zip(lean[0] + lean[1], full[0] + full[1]):
            assert torch.equal(got, want)
        assert all(t.shape == (0,) for t in lean[2:])
        # Only the weights need gradients: autograd asks for the lean form and gets the same numbers.
        leaves = [w.clone().requires_grad_() for w in weights]
        loss, pos_score, neg_score = op(user, pos, neg, leaves, biases, 1.0)
        ((loss * d_loss).sum() + (pos_score * d_pos).sum() + (neg_score * d_neg).sum()).backward()
        for leaf, want in zip(leaves, full[0]):
            torch.testing.assert_close(leaf.grad, want)

    def test_backward_is_deterministic(self):
        user, pos, neg, weights, biases = make_case((None, 700, 16, 4), torch.float32)
        args = (torch.ones(()), torch.zeros(700), torch.zeros(700), user, pos, neg, weights, biases, 1.0, False)
        first = torch.ops.s2meta.hinge_score_backward(*args)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            single = torch.ops.s2meta.hinge_score_backward(*args)
        finally:
            torch.set_num_threads(threads)
        for got, want in zip(single[0] + single[1], first[0] + first[1]):
            assert torch.equal(got, want)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_views_of_flat_theta_and_strided_embeddings(self, dtype):
        weights, biases = make_mlp(16, 4, 3, dtype)
        theta = flat_theta_views(weights, biases)[0].requires_grad_()
        w_views, b_views = views_of(theta, [w.shape for w in weights], [b.shape for b in biases])
        assert not any(v.is_contiguous() for v in w_views)
        user, pos, neg = make_embeddings(3, 50, 16, 3, dtype)
        loss, pos_score, _ = op(strided_rows(user), transposed_storage(pos), neg[:, ::1], w_views, b_views, 1.0)
        (loss.sum() + pos_score.sum()).backward()
        ref_theta = theta.detach().clone().requires_grad_()
        ref_w, ref_b = views_of(ref_theta, [w.shape for w in weights], [b.shape for b in biases])
        ref_loss, ref_pos, _ = reference.hinge_score(user, pos, neg, ref_w, ref_b, 1.0)
        (ref_loss.sum() + ref_pos.sum()).backward()
        torch.testing.assert_close(loss, ref_loss.detach(), **tolerances(dtype))
        torch.testing.assert_close(theta.grad, ref_theta.grad, **tolerances(dtype))

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("case", [(None, 0, 8, 3), (None, 130, 16, 4), (3, 64, 8, 2), (1, 7, 8, 1)], ids=case_id)
    def test_loss_and_grad_in_one_pass(self, case, dtype):
        user, pos, neg, weights, biases = make_case(case, dtype)
        loss, pos_score, neg_score, d_weights, d_biases = torch.ops.s2meta.hinge_score_grad(
            user, pos, neg, weights, biases, 0.5)
        leaves = [t.clone().requires_grad_() for t in weights + biases]
        want = reference.hinge_score(user, pos, neg, leaves[:len(weights)], leaves[len(weights):], 0.5)
        want_grads = torch.autograd.grad(want[0].sum(), leaves, allow_unused=True)
        for got, ref in zip([loss, pos_score, neg_score, *d_weights, *d_biases], [*want, *want_grads]):
            ref = torch.zeros_like(got) if ref is None else ref.detach()
            torch.testing.assert_close(got, ref, **tolerances(dtype))
        twin = reference.hinge_score_grad(user, pos, neg, weights, biases, 0.5)
        for got, ref in zip([loss, pos_score, neg_score, *d_weights, *d_biases], [*twin[:3], *twin[3], *twin[4]]):
            torch.testing.assert_close(got, ref, **tolerances(dtype))
        # The same numbers as the two-op path, bit for bit: one kernel computes both.
        forward = op(user, pos, neg, weights, biases, 0.5)
        assert all(torch.equal(a, b) for a, b in zip(forward, (loss, pos_score, neg_score)))

    @pytest.mark.parametrize("scenarios", [None, 2])
    def test_gradcheck(self, scenarios):
        user, pos, neg, weights, biases = make_case((scenarios, 5, 4, 3), torch.float64, seed=3)
        leaves = [t.clone().requires_grad_() for t in [user, pos, neg, *weights, *biases]]

        def fn(*xs):
            return op(xs[0], xs[1], xs[2], list(xs[3:6]), list(xs[6:9]), 0.7)

        assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)

    def test_double_backward_raises(self):
        user, pos, neg, weights, biases = make_case((None, 6, 4, 3), torch.float64)
        leaves = [w.clone().requires_grad_() for w in weights]
        loss, _, _ = op(user, pos, neg, leaves, biases, 1.0)
        with pytest.raises(RuntimeError, match=r"hinge_score: double backward"):
            torch.autograd.grad(loss, leaves, create_graph=True)

    def test_opcheck(self):
        for case in [(None, 9, 8, 3), (2, 5, 4, 2)]:
            user, pos, neg, weights, biases = make_case(case, torch.float64)
            weights = [w.requires_grad_() for w in weights]
            torch.library.opcheck(op, (user, pos, neg, weights, biases, 1.0))
            upstream = (torch.ones(user.shape[:-2], dtype=torch.float64), torch.randn(user.shape[:-1], dtype=torch.float64),
                        torch.randn(user.shape[:-1], dtype=torch.float64))
            torch.library.opcheck(torch.ops.s2meta.hinge_score_grad,
                                  (user, pos, neg, [w.detach() for w in weights], biases, 1.0))
            for emb_grad in (True, False):
                torch.library.opcheck(torch.ops.s2meta.hinge_score_backward,
                                      (*upstream, user, pos, neg, [w.detach() for w in weights], biases, 1.0, emb_grad))

    def test_compile_fullgraph(self):
        user, pos, neg, weights, biases = make_case((None, 32, 8, 4), torch.float32)

        def step(ws):
            loss, pos_score, _ = op(user, pos, neg, ws, biases, 1.0)
            return loss + 0.1 * pos_score.sum()

        # aot_eager traces the op through its fake and, for the backward, its autograd formula,
        # without the minutes an inductor C++ build takes on two cores.
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        results = []
        for fn in (compiled, step):
            leaves = [w.clone().requires_grad_() for w in weights]
            loss = fn(leaves)
            loss.backward()
            results.append((loss.detach(), [leaf.grad for leaf in leaves]))
        (loss, grads), (want_loss, want_grads) = results
        torch.testing.assert_close(loss, want_loss)
        for got, want in zip(grads, want_grads):
            torch.testing.assert_close(got, want)

    @pytest.mark.parametrize("mutate, message", [
        (lambda a: a.update(user=a["user"].to(torch.int64)), r"user_emb must be float32 or float64"),
        (lambda a: a.update(pos=a["pos"].double()), r"pos_emb has dtype"),
        (lambda a: a["weights"].__setitem__(1, a["weights"][1].double()), r"weights\[1\] has dtype"),
        (lambda a: a.update(neg=a["neg"][:5]), r"neg_emb has 5 rows"),
        (lambda a: a.update(pos=a["pos"][:, :4]), r"pos_emb has width 4"),
        (lambda a: a["weights"].__setitem__(0, torch.randn(8, 18)), r"weights\[0\] takes 18 inputs"),
        (lambda a: a["weights"].__setitem__(1, torch.randn(4, 7)), r"weights\[1\] takes 7 inputs"),
        (lambda a: a["biases"].__setitem__(1, torch.randn(3)), r"biases\[1\] has 3 entries"),
        (lambda a: (a["weights"].__setitem__(2, torch.randn(2, 4)), a["biases"].__setitem__(2, torch.randn(2))),
         r"last layer.*must have 1 output"),
        (lambda a: a["biases"].pop(), r"len\(weights\) = 3 but len\(biases\) = 2"),
        (lambda a: a.update(weights=[], biases=[]), r"weights must hold at least one layer"),
        (lambda a: a["weights"].__setitem__(0, torch.randn(8, 16, device="meta")), r"weights\[0\] is on meta"),
    ], ids=["int", "mixed-dtype", "mixed-dtype-weight", "batch", "width", "first-layer", "chain", "bias",
            "last-width", "counts", "no-layers", "device"])
    def test_bad_input_names_the_argument(self, mutate, message):
        user, pos, neg, weights, biases = make_case((None, 10, 8, 3), torch.float32)
        args = {"user": user, "pos": pos, "neg": neg, "weights": weights, "biases": biases}
        mutate(args)
        with pytest.raises((RuntimeError, ValueError, TypeError), match=message):
            op(args["user"], args["pos"], args["neg"], args["weights"], args["biases"], 1.0)

    @pytest.mark.parametrize("mutate, message", [
        (lambda a: a.update(pos=a["pos"][:2]), r"pos_emb has S = 2 scenarios but user_emb has S = 3"),
        (lambda a: a["weights"].__setitem__(1, a["weights"][1][:2]), r"weights\[1\] has S = 2"),
        (lambda a: a["biases"].__setitem__(0, a["biases"][0][0]), r"biases\[0\] must be \[S, out\]"),
        (lambda a: a["weights"].__setitem__(0, a["weights"][0][0]), r"weights\[0\] must be \[S, out, in\]"),
    ], ids=["emb-S", "weight-S", "bias-rank", "weight-rank"])
    def test_bad_scenario_dims_name_the_argument(self, mutate, message):
        user, pos, neg, weights, biases = make_case((3, 10, 8, 3), torch.float32)
        args = {"user": user, "pos": pos, "neg": neg, "weights": weights, "biases": biases}
        mutate(args)
        with pytest.raises((RuntimeError, ValueError, TypeError), match=message):
            op(args["user"], args["pos"], args["neg"], args["weights"], args["biases"], 1.0)

    @needs_cuda
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("case", [(None, 130, 64, 4), (3, 64, 128, 4), (2, 7, 256, 4), (1, 0, 8, 2)], ids=case_id)
    def test_cuda_matches_cpu(self, case, dtype):
        user, pos, neg, weights, biases = make_case(case, dtype)
        cpu = run_both(user, pos, neg, weights, biases)[0]
        to = lambda ts: [t.cuda() for t in ts]  # noqa: E731
        (outs, grads), _ = run_both(*to([user, pos, neg]), to(weights), to(biases))
        for got, want in zip(list(outs) + list(grads), list(cpu[0]) + list(cpu[1])):
            torch.testing.assert_close(got.cpu(), want, **tolerances(dtype))

    @needs_cuda
    @pytest.mark.parametrize("case", [(None, 130, 64, 4), (3, 64, 128, 4), (1, 0, 8, 2)], ids=case_id)
    def test_cuda_loss_and_grad_match_cpu(self, case):
        user, pos, neg, weights, biases = make_case(case, torch.float64)
        want = torch.ops.s2meta.hinge_score_grad(user, pos, neg, weights, biases, 1.0)
        got = torch.ops.s2meta.hinge_score_grad(user.cuda(), pos.cuda(), neg.cuda(), [w.cuda() for w in weights],
                                                [b.cuda() for b in biases], 1.0)
        flat = lambda out: [*out[:3], *out[3], *out[4]]  # noqa: E731
        for a, b in zip(flat(got), flat(want)):
            torch.testing.assert_close(a.cpu(), b, **tolerances(torch.float64))

    @needs_cuda
    def test_cuda_graph_replay_matches_eager(self):
        user, pos, neg, weights, biases = (t.cuda() if isinstance(t, torch.Tensor) else [x.cuda() for x in t]
                                           for t in make_case((4, 64, 64, 4), torch.float32))
        ones = torch.ones(4, device="cuda")

        def step():
            loss, pos_score, neg_score = op(user, pos, neg, weights, biases, 1.0)
            grads = torch.ops.s2meta.hinge_score_backward(ones, torch.zeros_like(pos_score),
                                                          torch.zeros_like(neg_score), user, pos, neg, weights,
                                                          biases, 1.0, False)
            return [loss, *grads[0], *grads[1]]

        eager = step()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()  # warm-up outside capture, as CUDA graphs require
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        for w in weights:
            w.mul_(1.5)
        eager_scaled = step()
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(captured, eager_scaled):
            torch.testing.assert_close(got, want)
        assert not torch.equal(eager[0], eager_scaled[0])


_CLONE_CHECK = """
import torch, s2meta_fast
from s2meta_fast.ops import reference
from s2meta_fast.ops.sample_inputs import make_embeddings, make_mlp
for dtype in (torch.float32, torch.float64):
    for scenarios, n, dim in ((None, 37, 24), (2, 20, 64)):
        weights, biases = make_mlp(dim, 4, scenarios, dtype)
        user, item = make_embeddings(2, n, dim, scenarios, dtype)
        leaves = [w.clone().requires_grad_() for w in weights]
        ref_leaves = [w.clone().requires_grad_() for w in weights]
        got = torch.ops.s2meta.hinge_score(user, item, item.flip(-2), leaves, biases, 1.0)
        want = reference.hinge_score(user, item, item.flip(-2), ref_leaves, biases, 1.0)
        got[0].sum().backward(); want[0].sum().backward()
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
        for a, b in zip(list(got) + [l.grad for l in leaves], list(want) + [l.grad for l in ref_leaves]):
            torch.testing.assert_close(a, b.detach(), **tol)
        torch.testing.assert_close(torch.ops.s2meta.score_matrix(user, item, weights, biases),
                                   reference.score_matrix(user, item, weights, biases), **tol)
print(torch.ops.s2meta.cpu_isa())
"""


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_each_cpu_clone_matches_reference(isa):
    """Each ISA clone of the CPU kernels (S2META_CPU_ISA caps it) matches the reference."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    env = dict(os.environ, S2META_CPU_ISA=isa, PYTHONPATH=os.pathsep.join([str(here), *sys.path]))
    result = subprocess.run([sys.executable, "-c", _CLONE_CHECK], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == expected_cpu_isa(isa)
