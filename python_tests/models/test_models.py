"""Recommenders over a flat θ: sizes, views, and agreement with nn.Module oracles."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from s2meta_fast.models import build_model
from s2meta_fast.ops import reference

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.mark.parametrize("kind,dim,n_tensors,n_params", [
    ("interaction", 64, 8, 10_881),
    ("interaction", 128, 8, 43_265),
    ("mapping", 16, 8, 2 * (16 * 16 + 16) * 2),
    ("hybrid", 16, 6, (32 * 16 + 16) + (16 * 8 + 8) + (8 + 16) + 1),
])
def test_sizes(kind, dim, n_tensors, n_params):
    model = build_model(kind, dim)
    assert model.n_tensors == n_tensors
    assert model.n_params == n_params
    assert model.offsets[0] == 0 and model.offsets[-1] == n_params
    assert model.init_theta(torch.Generator().manual_seed(0)).shape == (n_params,)


def test_interaction_layout_matches_the_paper():
    assert build_model("interaction", 64).param_shapes == [
        (64, 128), (64,), (32, 64), (32,), (16, 32), (16,), (1, 16), (1,)]


def test_unknown_kind_lists_the_valid_ones():
    with pytest.raises(ValueError, match="hybrid.*interaction.*mapping"):
        build_model("neumf", 8)


def test_split_returns_views_of_theta():
    model = build_model("interaction", 8)
    theta = torch.zeros(2, model.n_params)
    weights, biases = model.split(theta)
    weights[0][1, 0, 0] = 7.0
    assert theta[1, 0] == 7.0 and theta[0, 0] == 0.0
    assert weights[0].shape == (2, 8, 16) and biases[-1].shape == (2, 1)


def test_init_theta_is_nn_linear_init_and_seeded():
    model = build_model("interaction", 64)
    first = model.init_theta(torch.Generator().manual_seed(3))
    assert torch.equal(first, model.init_theta(torch.Generator().manual_seed(3)))
    w1 = first[: 64 * 128]
    assert w1.abs().max() <= 1 / 128 ** 0.5 and w1.std() > 0.5 / (3 * 128) ** 0.5


def _linear_stack(model, theta_row, layers):
    """nn.Linear modules holding θ's tensors, for an oracle forward."""
    weights, biases = model.split(theta_row.unsqueeze(0))
    modules = []
    for weight, bias in zip(weights, biases):
        linear = nn.Linear(weight.shape[2], weight.shape[1]).double()
        with torch.no_grad():
            linear.weight.copy_(weight[0])
            linear.bias.copy_(bias[0])
        modules.append(linear)
    return modules


def _oracle_scores(kind, model, theta_row, users, items):
    mods = _linear_stack(model, theta_row, None)
    if kind == "interaction":
        x = torch.cat([users, items], -1)
        for k, layer in enumerate(mods):
            x = layer(x)
            x = x.relu() if k < len(mods) - 1 else x
        return x.squeeze(-1)
    if kind == "mapping":
        u = mods[1](mods[0](users).relu())
        i = mods[3](mods[2](items).relu())
        return (u * i).sum(-1)
    mlp = mods[1](mods[0](torch.cat([users, items], -1)).relu())
    return mods[2](torch.cat([mlp, users * items], -1)).squeeze(-1)


@pytest.mark.parametrize("kind", ["interaction", "mapping", "hybrid"])
def test_loss_and_scores_match_an_nn_module_oracle(kind):
    dim, n_scen, n = 8, 3, 10
    gen = torch.Generator().manual_seed(1)
    model = build_model(kind, dim)
    theta = torch.stack([model.init_theta(gen, dtype=torch.float64) for _ in range(n_scen)])
    users, pos, neg = (torch.randn(n_scen, n, dim, generator=gen, dtype=torch.float64) for _ in range(3))
    loss, pos_score, neg_score = model.loss(theta, users, pos, neg, margin=1.0)
    for s in range(n_scen):
        p = _oracle_scores(kind, model, theta[s], users[s], pos[s])
        q = _oracle_scores(kind, model, theta[s], users[s], neg[s])
        torch.testing.assert_close(pos_score[s], p)
        torch.testing.assert_close(neg_score[s], q)
        torch.testing.assert_close(loss[s], torch.relu(1.0 - p + q).mean())
    items = torch.randn(n_scen, 7, dim, generator=gen, dtype=torch.float64)
    all_pairs = model.scores(theta, users, items)
    assert all_pairs.shape == (n_scen, n, 7)
    for s in range(n_scen):
        expect = _oracle_scores(kind, model, theta[s], users[s].unsqueeze(1).expand(-1, 7, -1),
                                items[s].unsqueeze(0).expand(n, -1, -1))
        torch.testing.assert_close(all_pairs[s], expect)


def test_fused_loss_equals_reference_loss_and_gradient():
    dim = 16
    gen = torch.Generator().manual_seed(2)
    fused, pure = build_model("interaction", dim, fused=True), build_model("interaction", dim, fused=False)
    theta = torch.stack([fused.init_theta(gen) for _ in range(4)])
    users, pos, neg = (torch.randn(4, 64, dim, generator=gen) for _ in range(3))
    grads = []
    for model in (fused, pure):
        leaf = theta.clone().requires_grad_(True)
        loss, _, _ = model.loss(leaf, users, pos, neg)
        grads.append((loss, *torch.autograd.grad(loss.sum(), leaf)))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-6)
    weights, biases = pure.split(theta)
    ref = reference.hinge_score(users, pos, neg, weights, biases, 1.0)[0]
    torch.testing.assert_close(grads[0][0], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["interaction", "mapping", "hybrid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_and_grad_equals_autograd_of_the_reference_loss(kind, dtype):
    # the interaction model takes the one-pass fused gradient; it must equal autograd's
    model, oracle = build_model(kind, 16, fused=True), build_model(kind, 16, fused=False)
    generator = torch.Generator().manual_seed(5)
    theta = torch.stack([model.init_theta(generator, dtype=dtype) for _ in range(3)])
    users, pos, neg = (torch.randn(3, 64, 16, generator=generator, dtype=dtype) for _ in range(3))
    loss, grad = model.loss_and_grad(theta, users, pos, neg)
    leaf = theta.clone().requires_grad_(True)
    expected_loss = oracle.loss(leaf, users, pos, neg)[0]
    (expected_grad,) = torch.autograd.grad(expected_loss.sum(), leaf)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, expected_loss.detach(), **tol)
    torch.testing.assert_close(grad, expected_grad, **tol)
    assert not grad.requires_grad and not loss.requires_grad
