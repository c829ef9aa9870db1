"""UpdateController (pure PyTorch) and FastUpdateController (fused op) are interchangeable."""
from __future__ import annotations

import math

import pytest
import torch

import s2meta_fast
from s2meta_fast.meta import FastUpdateController, UpdateController

SHAPES = [(24, 16), (24,), (8, 24), (8,), (1, 8), (1,)]
requires_kernels = pytest.mark.skipif(not s2meta_fast.backend().cpu_kernels, reason="compiled CPU kernels not built")


def _pair(**kwargs):
    torch.manual_seed(0)
    pure = UpdateController(SHAPES, **kwargs)
    fast = FastUpdateController(SHAPES, **kwargs)
    fast.load_state_dict(pure.state_dict())
    return pure, fast


def _unroll(ctrl, theta0, steps, seed=0):
    """A toy inner loop: S scenarios fitting quadratic targets; returns the query loss and traces."""
    S = theta0.shape[0]
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(S, ctrl.n_params, generator=gen)
    query = torch.randn(S, ctrl.n_params, generator=gen)
    theta = theta0.expand(S, -1)
    state = ctrl.initial_state(S)
    for _ in range(steps):
        loss = ((theta - target) ** 2).mean(dim=1) * 3.0
        (grad,) = torch.autograd.grad(loss.sum(), [theta], retain_graph=True)  # first order: a constant
        theta, state, alpha, beta = ctrl(theta, grad, loss.detach(), state)
    return ((theta - query) ** 2).mean(), theta, state, alpha, beta


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


class TestConstruction:
    def test_state_dicts_match_and_swap(self):
        pure, fast = _pair()
        assert list(pure.state_dict()) == list(fast.state_dict())
        expected = {"w_ih": (6, 64, 5), "w_hh": (6, 64, 16), "b_ih": (6, 64), "b_hh": (6, 64), "ln_weight": (6, 16),
                    "ln_bias": (6, 16), "w_gate": (6, 2, 16), "b_gate": (6, 2), "h0": (6, 16), "c0": (6, 16)}
        assert {k: tuple(v.shape) for k, v in pure.state_dict().items()} == expected
        other = UpdateController(SHAPES)
        other.load_state_dict(fast.state_dict())
        for k, v in other.state_dict().items():
            assert torch.equal(v, pure.state_dict()[k])

    def test_without_layer_norm(self):
        pure, fast = _pair(layer_norm=False)
        assert "ln_weight" not in pure.state_dict() and list(pure.state_dict()) == list(fast.state_dict())

    def test_offsets_and_state(self):
        ctrl = UpdateController(SHAPES, hidden_size=8)
        sizes = [math.prod(s) for s in SHAPES]
        assert ctrl.offsets == [0] + list(torch.tensor(sizes).cumsum(0).tolist())
        h, c = ctrl.initial_state(3)
        assert h.shape == c.shape == (3, sum(sizes), 8)

    @pytest.mark.parametrize("fix", [False, True])
    def test_initialisation(self, fix):
        H = 16
        ctrl = UpdateController(SHAPES, hidden_size=H, forget_bias_fix=fix)
        ones = slice(H, 2 * H) if fix else slice(4, 8)
        assert torch.all(ctrl.b_ih[:, ones] == 1.0)
        rest = torch.ones(4 * H, dtype=torch.bool)
        rest[ones] = False
        bound = 1 / math.sqrt(H)
        assert ctrl.b_ih[:, rest].abs().max() <= bound and ctrl.w_hh.abs().max() <= bound
        assert torch.all(ctrl.b_gate[:, 0] == 0) and torch.all(ctrl.b_gate[:, 1] == 5)
        assert torch.all(ctrl.h0 == 0) and torch.all(ctrl.c0 == 0)
        assert torch.all(ctrl.ln_weight == 1) and torch.all(ctrl.ln_bias == 0)
        assert ctrl.w_gate.std() > 0.1  # Xavier-normal, not zero or uniform-small

    @pytest.mark.parametrize("fix", [False, True])
    def test_authors_initialisation_options(self, fix):
        """zero_hh_bias and state_init="normal" are the authors' code (docs/method.md, departures)."""
        H = 16
        torch.manual_seed(0)
        ctrl = UpdateController(SHAPES, hidden_size=H, forget_bias_fix=fix, zero_hh_bias=True, state_init="normal")
        ones = slice(H, 2 * H) if fix else slice(4, 8)
        assert torch.all(ctrl.b_ih[:, ones] == 1.0) and torch.all(ctrl.b_hh[:, ones] == 0.0)
        rest = torch.ones(4 * H, dtype=torch.bool)
        rest[ones] = False
        assert ctrl.b_hh[:, rest].abs().min() > 0   # only the +1 slice is zeroed
        for state in (ctrl.h0, ctrl.c0):
            assert state.abs().max() > 1 / math.sqrt(H) and 0.5 < state.std() < 1.5   # N(0, 1), not zeros
        default = UpdateController(SHAPES, hidden_size=H, forget_bias_fix=fix)
        assert default.b_hh[:, ones].abs().min() > 0   # ours: LSTMCell's uniform init everywhere
        with pytest.raises(ValueError, match="state_init"):
            UpdateController(SHAPES, state_init="ones")

    @pytest.mark.parametrize("kwargs,match", [
        (dict(param_shapes=[]), "param_shapes"), (dict(hidden_size=0), "hidden_size"), (dict(p=0.0), "p must"),
        (dict(clip=-1.0), "clip")])
    def test_bad_hyperparameters(self, kwargs, match):
        kwargs = dict(dict(param_shapes=SHAPES), **kwargs)
        with pytest.raises(ValueError, match=match):
            UpdateController(**kwargs)

    @pytest.mark.parametrize("cls", [UpdateController, FastUpdateController])
    def test_bad_call_names_argument(self, cls):
        ctrl = cls(SHAPES)
        n = ctrl.n_params
        theta, grad, loss = torch.zeros(2, n), torch.zeros(2, n), torch.zeros(2)
        state = ctrl.initial_state(2)
        with pytest.raises(ValueError, match="theta"):
            ctrl(theta[:, :-1], grad, loss, state)
        with pytest.raises(ValueError, match="grad"):
            ctrl(theta, grad[:1], loss, state)
        with pytest.raises(ValueError, match="loss"):
            ctrl(theta, grad, loss[:1], state)
        with pytest.raises(ValueError, match="h must"):
            ctrl(theta, grad, loss, ctrl.initial_state(1))


@requires_kernels
class TestFastEqualsPure:
    @pytest.mark.parametrize("steps,tol", [(1, 1e-5), (20, 1e-4)])
    @pytest.mark.parametrize("layer_norm", [True, False])
    def test_values_and_meta_gradients(self, steps, tol, layer_norm):
        pure, fast = _pair(layer_norm=layer_norm)
        results = []
        for ctrl in (pure, fast):
            theta0 = torch.randn(1, ctrl.n_params, generator=torch.Generator().manual_seed(1)) * 0.3
            theta0.requires_grad_(True)
            meta_loss, theta, (h, c), alpha, beta = _unroll(ctrl, theta0, steps)
            params = [theta0] + [p for p in ctrl.parameters()]
            grads = torch.autograd.grad(meta_loss, params)
            results.append(([meta_loss, theta, h, c, alpha, beta], grads))
        (vals_p, grads_p), (vals_f, grads_f) = results
        for name, a, b in zip(["meta_loss", "theta", "h", "c", "alpha", "beta"], vals_f, vals_p):
            assert _rel(a.detach(), b.detach()) < tol, name
        names = ["theta0"] + [n for n, _ in pure.named_parameters()]
        for name, a, b in zip(names, grads_f, grads_p):
            assert _rel(a, b) < tol, f"meta-gradient of {name}"

    def test_uses_one_fused_call(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        class Recorder(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.ops = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.ops.append(str(func))
                return func(*args, **(kwargs or {}))

        _, fast = _pair()
        theta = torch.zeros(3, fast.n_params)
        state = tuple(t.contiguous() for t in fast.initial_state(3))
        with Recorder() as recorder:
            fast(theta, theta, torch.zeros(3), state)
        assert [op for op in recorder.ops if "s2meta" in op] == ["s2meta.lstm_update_multi.default"]
