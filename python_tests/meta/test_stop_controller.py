"""Stop controller: K+1 log-magnitude inputs, LSTMCell(K+1 → 2(K+1)), per-scenario independence."""
from __future__ import annotations

import math

import pytest
import torch

from s2meta_fast.meta import StopController

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def test_sizes_follow_the_paper():
    ctrl = StopController(8)
    assert ctrl.lstm.input_size == 9 and ctrl.lstm.hidden_size == 18  # Appendix A.2: stop LSTM width 18
    assert ctrl.head.in_features == 18 and ctrl.head.bias.item() == 0.0


def test_features_are_the_log_magnitude_half_of_eq_12():
    ctrl = StopController(2, p=10.0)
    norms = torch.tensor([[1.0, math.exp(-20)], [math.e, 0.0]])
    loss = torch.tensor([0.5, 2.0])
    expect = torch.tensor([[0.0, -1.0, math.log(0.5) / 10], [0.1, -1.0, math.log(2.0) / 10]])
    torch.testing.assert_close(ctrl.features(norms, loss), expect)


def test_fused_and_reference_features_agree():
    norms, loss = torch.rand(5, 8) * 3, torch.rand(5)
    torch.testing.assert_close(StopController(8, fused=True).features(norms, loss),
                               StopController(8, fused=False).features(norms, loss))


def test_scenarios_are_independent_and_state_carries():
    torch.manual_seed(0)
    ctrl = StopController(3)
    norms, loss = torch.rand(4, 3), torch.rand(4)
    state = ctrl.initial_state(4)
    logit, state = ctrl(norms, loss, state)
    logit2, _ = ctrl(norms, loss, state)
    assert not torch.allclose(logit, logit2)  # the LSTM state matters
    for s in range(4):
        one, _ = ctrl(norms[s:s + 1], loss[s:s + 1], ctrl.initial_state(1))
        torch.testing.assert_close(one, logit[s:s + 1])


def test_inputs_carry_no_gradient():
    ctrl = StopController(2)
    norms, loss = torch.rand(1, 2, requires_grad=True), torch.rand(1, requires_grad=True)
    logit, _ = ctrl(norms, loss, ctrl.initial_state(1))
    logit.sum().backward()
    assert norms.grad is None and loss.grad is None and ctrl.head.weight.grad is not None


def test_rejects_wrong_widths():
    with pytest.raises(ValueError, match=r"\[S, 3\]"):
        StopController(3)(torch.rand(2, 4), torch.rand(2), StopController(3).initial_state(2))
    with pytest.raises(ValueError, match="n_tensors"):
        StopController(0)
