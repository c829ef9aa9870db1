"""score_matrix against the pure-PyTorch reference (and against hinge_score's per-pair scores)."""
from __future__ import annotations

import pytest
import torch

import s2meta_fast  # noqa: F401  (loads torch.ops.s2meta)
from s2meta_fast.ops.sample_inputs import (flat_theta_views, make_embeddings, make_mlp, strided_rows, tolerances,
                       transposed_storage, views_of)
from s2meta_fast.ops import reference

op = torch.ops.s2meta.score_matrix
DTYPES = [torch.float32, torch.float64]
# (scenarios or None, users A, items B, embedding width d, layers)
CASES = [
    (None, 0, 5, 8, 4),
    (None, 1, 1, 8, 4),
    (None, 7, 130, 16, 3),
    (None, 64, 65, 64, 4),
    (None, 3, 7, 8, 1),
    (1, 7, 0, 8, 2),
    (1, 130, 7, 16, 4),
    (3, 7, 64, 8, 3),
    (3, 1, 130, 16, 2),
]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def case_id(case):
    scenarios, users, items, dim, layers = case
    return f"S{scenarios}-A{users}-B{items}-d{dim}-L{layers}"


def make_case(case, dtype, seed=0):
    scenarios, users, items, dim, layers = case
    weights, biases = make_mlp(dim, layers, scenarios, dtype, seed=seed)
    (user,) = make_embeddings(1, users, dim, scenarios, dtype, seed=seed + 1)
    (item,) = make_embeddings(1, items, dim, scenarios, dtype, seed=seed + 2)
    return user, item, weights, biases


class TestScoreMatrix:
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("case", CASES, ids=case_id)
    def test_matches_reference(self, case, dtype):
        user, item, weights, biases = make_case(case, dtype)
        got = op(user, item, weights, biases)
        want = reference.score_matrix(user, item, weights, biases)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, **tolerances(dtype))

    def test_agrees_with_pairwise_mlp(self):
        # The split first layer must score a pair exactly as the unsplit MLP of hinge_score does.
        user, item, weights, biases = make_case((2, 5, 9, 16, 4), torch.float64)
        scores = op(user, item, weights, biases)
        users = user.repeat_interleave(9, dim=1)
        items = item.repeat(1, 5, 1)
        _, pair_scores, _ = torch.ops.s2meta.hinge_score(users, items, items, weights, biases, 1.0)
        torch.testing.assert_close(scores.reshape(2, -1), pair_scores, rtol=1e-12, atol=1e-12)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_views_of_flat_theta_and_strided_embeddings(self, dtype):
        weights, biases = make_mlp(16, 4, 3, dtype)
        theta = flat_theta_views(weights, biases)[0]
        w_views, b_views = views_of(theta, [w.shape for w in weights], [b.shape for b in biases])
        assert not any(v.is_contiguous() for v in w_views)
        (user,) = make_embeddings(1, 20, 16, 3, dtype)
        (item,) = make_embeddings(1, 70, 16, 3, dtype, seed=5)
        got = op(strided_rows(user), transposed_storage(item), w_views, b_views)
        torch.testing.assert_close(got, reference.score_matrix(user, item, weights, biases), **tolerances(dtype))

    @pytest.mark.parametrize("scenarios", [None, 2])
    def test_gradcheck(self, scenarios):
        user, item, weights, biases = make_case((scenarios, 3, 4, 4, 3), torch.float64, seed=3)
        leaves = [t.clone().requires_grad_() for t in [user, item, *weights, *biases]]

        def fn(*xs):
            return op(xs[0], xs[1], list(xs[2:5]), list(xs[5:8]))

        assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)

    def test_double_backward_raises(self):
        user, item, weights, biases = make_case((None, 3, 4, 4, 3), torch.float64)
        leaves = [w.clone().requires_grad_() for w in weights]
        loss = op(user, item, leaves, biases).sum()
        with pytest.raises(RuntimeError, match=r"score_matrix: double backward"):
            torch.autograd.grad(loss, leaves, create_graph=True)

    def test_opcheck(self):
        for case in [(None, 4, 6, 8, 3), (2, 3, 5, 4, 2)]:
            user, item, weights, biases = make_case(case, torch.float64)
            weights = [w.requires_grad_() for w in weights]
            torch.library.opcheck(op, (user, item, weights, biases))

    @pytest.mark.parametrize("mutate, message", [
        (lambda a: a.update(user=a["user"].to(torch.int32)), r"user_emb must be float32 or float64"),
        (lambda a: a.update(item=a["item"].double()), r"item_emb has dtype"),
        (lambda a: a.update(item=a["item"][:, :4]), r"item_emb has width 4"),
        (lambda a: a["weights"].__setitem__(0, torch.randn(8, 12)), r"weights\[0\] takes 12 inputs"),
        (lambda a: a["weights"].__setitem__(2, torch.randn(1, 3)), r"weights\[2\] takes 3 inputs"),
        (lambda a: (a["weights"].__setitem__(2, torch.randn(3, 4)), a["biases"].__setitem__(2, torch.randn(3))),
         r"last layer.*must have 1 output"),
        (lambda a: a["weights"].append(torch.randn(1, 1)), r"len\(weights\) = 4 but len\(biases\) = 3"),
        (lambda a: a["biases"].__setitem__(0, torch.randn(8, device="meta")), r"biases\[0\] is on meta"),
        (lambda a: a.update(item=a["item"].unsqueeze(0)), r"item_emb has shape"),
    ], ids=["int", "mixed-dtype", "width", "first-layer", "chain", "last-width", "counts", "device", "rank"])
    def test_bad_input_names_the_argument(self, mutate, message):
        user, item, weights, biases = make_case((None, 4, 6, 8, 3), torch.float32)
        args = {"user": user, "item": item, "weights": weights, "biases": biases}
        mutate(args)
        with pytest.raises((RuntimeError, ValueError, TypeError), match=message):
            op(args["user"], args["item"], args["weights"], args["biases"])

    def test_bad_scenario_count_names_the_argument(self):
        user, item, weights, biases = make_case((3, 4, 6, 8, 3), torch.float32)
        with pytest.raises(RuntimeError, match=r"item_emb has S = 2 scenarios but user_emb has S = 3"):
            op(user, item[:2], weights, biases)
        with pytest.raises(RuntimeError, match=r"biases\[2\] has S = 1 but user_emb has S = 3"):
            op(user, item, weights, biases[:2] + [biases[2][:1]])

    @needs_cuda
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("case", [(None, 300, 500, 64, 4), (3, 7, 130, 128, 4), (2, 5, 9, 256, 4),
                                      (None, 3, 7, 8, 1), (1, 7, 0, 8, 2)], ids=case_id)
    def test_cuda_matches_cpu(self, case, dtype):
        user, item, weights, biases = make_case(case, dtype)
        want = op(user, item, weights, biases)
        got = op(user.cuda(), item.cuda(), [w.cuda() for w in weights], [b.cuda() for b in biases])
        torch.testing.assert_close(got.cpu(), want, **tolerances(dtype))

    @needs_cuda
    def test_cuda_graph_replay_matches_eager(self):
        user, item, weights, biases = make_case((4, 30, 50, 64, 4), torch.float32)
        user, item = user.cuda(), item.cuda()
        weights, biases = [w.cuda() for w in weights], [b.cuda() for b in biases]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            op(user, item, weights, biases)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = op(user, item, weights, biases)
        user.mul_(-0.5)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(captured, op(user, item, weights, biases))
