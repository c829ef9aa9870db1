"""The inner loop: masking stops, batching, ablations, REINFORCE and the meta-gradient."""
from __future__ import annotations

import pytest
import torch

from planted_tasks import planted_batch, planted_world, select
from s2meta_fast.meta import MetaConfig, MetaLearner
from s2meta_fast.meta import learner as learner_module
from s2meta_fast.meta.trainer import TrainConfig, build_optimizer
from s2meta_fast.models import build_model

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DIM = 8


def make_learner(dtype=torch.float64, seed=0, dim=DIM, **config):
    torch.manual_seed(seed)
    user_emb, item_emb = planted_world(dim=dim, dtype=dtype)
    cfg = MetaConfig(**config)
    learner = MetaLearner(build_model("interaction", dim, fused=cfg.fused), user_emb, item_emb, cfg)
    return learner, item_emb


def force_stop_bias(learner, bias: float):
    with torch.no_grad():
        learner.stop_controller.head.weight.zero_()
        learner.stop_controller.head.bias.fill_(bias)


def test_first_t_min_steps_never_stop_and_p_one_stops_right_after():
    learner, items = make_learner()
    force_stop_bias(learner, 30.0)  # p ≈ 1
    out = learner.adapt(planted_batch(items, 40, 3), generator=torch.Generator().manual_seed(0))
    assert out.steps.tolist() == [4, 4, 4]
    assert out.updated[:4].all() and not out.updated[4:].any()


def test_p_zero_runs_t_max_steps():
    learner, items = make_learner(t_max=7)
    force_stop_bias(learner, -30.0)
    out = learner.adapt(planted_batch(items, 40, 2), generator=torch.Generator().manual_seed(0))
    assert out.steps.tolist() == [7, 7]


def test_threshold_stop_is_deterministic_given_the_draws():
    learner, items = make_learner()
    force_stop_bias(learner, 30.0)
    out = learner.adapt(planted_batch(items, 40, 2), stop="threshold", generator=torch.Generator().manual_seed(0))
    assert out.steps.tolist() == [4, 4]


def test_masked_stop_freezes_exactly_the_stopped_scenarios():
    """A sampled run's θ[s] equals step steps[s] of a never-stopping run with the same draws."""
    learner, items = make_learner()
    with torch.no_grad():
        learner.stop_controller.head.bias.fill_(-1.0)  # mixed stopping times
    batch = planted_batch(items, 40, 6)
    noise = learner.draw_noise(batch, torch.Generator().manual_seed(5))
    sampled = learner.adapt(batch, noise=noise, record=True)
    steps = sampled.steps.tolist()
    assert len(set(steps)) > 1 and min(steps) < learner.config.t_max, steps
    unstopped = learner.adapt(batch, stop="fixed", noise=noise, record=True)
    for s, n_steps in enumerate(steps):
        torch.testing.assert_close(sampled.theta[s].detach(), unstopped.trajectory.thetas[n_steps, s], rtol=0, atol=0)
        # frozen from the stop on, moving before it
        thetas = sampled.trajectory.thetas[:, s]
        assert all(torch.equal(thetas[t], thetas[-1]) for t in range(n_steps, thetas.shape[0]))
        assert not torch.equal(thetas[n_steps - 1], thetas[n_steps])


def test_batched_equals_sequential_values_and_meta_gradients():
    learner, items = make_learner()
    with torch.no_grad():
        learner.stop_controller.head.bias.fill_(-1.5)
    batch = planted_batch(items, 40, 4, seed=3)
    noise = learner.draw_noise(batch, torch.Generator().manual_seed(11))
    params = [p for p in learner.parameters()]

    batched = learner.meta_loss(batch, noise=noise)
    batched_grads = torch.autograd.grad(batched.total, params, allow_unused=True)

    seq_grads = [torch.zeros_like(p) for p in params]
    for s in range(4):
        one = learner.meta_loss(select(batch, slice(s, s + 1)), noise=noise.select(slice(s, s + 1)))
        torch.testing.assert_close(one.query_loss, batched.query_loss[s:s + 1], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(one.reinforce, batched.reinforce[s:s + 1], rtol=1e-12, atol=1e-12)
        assert one.steps.item() == batched.steps[s].item()
        for acc, grad in zip(seq_grads, torch.autograd.grad(one.total, params, allow_unused=True)):
            if grad is not None:
                acc += grad / 4
    assert len(set(batched.steps.tolist())) > 1  # the masks really differ across the batch
    for name_param, grad, expect in zip(learner.named_parameters(), batched_grads, seq_grads):
        got = torch.zeros_like(expect) if grad is None else grad
        torch.testing.assert_close(got, expect, rtol=1e-9, atol=1e-12, msg=name_param[0])


def test_reinforce_surrogate_matches_the_formula():
    learner, items = make_learner()
    with torch.no_grad():
        learner.stop_controller.head.bias.fill_(-1.0)
    batch = planted_batch(items, 40, 3, seed=4)
    noise = learner.draw_noise(batch, torch.Generator().manual_seed(2))
    terms = learner.meta_loss(batch, noise=noise)
    traj = learner.adapt(batch, noise=noise, record=True).trajectory
    for s in range(3):
        q = traj.query_loss[:, s]
        final = q[-1]
        expect = sum(-torch.log1p(-traj.stop_prob[t, s]) * (q[t] - final)
                     for t in range(traj.updated.shape[0]) if traj.updated[t, s])
        torch.testing.assert_close(terms.reinforce[s].detach(), torch.as_tensor(expect, dtype=torch.float64))
        torch.testing.assert_close(terms.query_loss[s].detach(), final)


def test_reinforce_lowers_p_when_continuing_helped():
    """Positive advantage (query loss fell after step t) → the surrogate's gradient lowers p."""
    learner, items = make_learner()
    batch = planted_batch(items, 40, 1)
    noise = learner.draw_noise(batch, torch.Generator().manual_seed(0))
    terms = learner.meta_loss(batch, noise=noise)
    traj = learner.adapt(batch, noise=noise, record=True).trajectory
    advantage = traj.query_loss[:-1, 0] - traj.query_loss[-1, 0]
    assert (advantage[traj.updated[:, 0]][:2] > 0).all()  # the untrained loop does help at first
    (grad,) = torch.autograd.grad(terms.reinforce.sum(), learner.stop_controller.head.bias)
    assert grad.item() > 0  # descent decreases the bias, i.e. p


def test_no_host_sync_inside_the_inner_loop(monkeypatch):
    learner, items = make_learner(dtype=torch.float32)
    batch = planted_batch(items, 40, 3)
    noise = learner.draw_noise(batch, torch.Generator().manual_seed(0))
    calls = []

    def forbidden(name):
        def raise_(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"host sync: Tensor.{name} called inside the inner loop")
        return raise_

    learner.compact_stopped = False  # the masked loop (CUDA graphs); the compact one reads flags by design
    # as inside a CUDA-graph capture, where the eager masked loop's exit reads are skipped
    monkeypatch.setattr(learner_module, "_capturing", lambda device: True)
    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"):
            patch.setattr(torch.Tensor, name, forbidden(name))
        patch.setattr(torch, "nonzero", forbidden("nonzero"))
        patch.setattr(torch.Tensor, "nonzero", forbidden("nonzero"))
        out = learner.adapt(batch, noise=noise)
        terms = learner.meta_loss(batch, noise=noise)
    assert not calls
    assert out.theta.shape == (3, learner.model.n_params) and terms.total.dim() == 0


@pytest.mark.parametrize("dtype,fused,dim", [(torch.float32, True, DIM), (torch.float32, True, 32),
                                             (torch.float64, True, DIM), (torch.float64, False, DIM)])
def test_compact_loop_equals_the_masked_loop_bit_for_bit(dtype, fused, dim):
    """Dropping stopped scenarios (CPU) changes no value: θ, steps, live stop logits, losses, REINFORCE
    and every meta-gradient are identical to the masked loop's (the reference twin's GEMMs may sum
    the controller's weight gradients in another order: 1e-12 there, bit for bit on the fused path).
    At d = 32 a tensor's blocks of several scenarios would share a kernel chunk if chunks could
    span scenarios; they cannot, so the weight-gradient partials of a dropped scenario are zero."""
    learner, items = make_learner(dtype=dtype, fused=fused, dim=dim)
    assert learner._compacts(torch.device("cpu")) == fused
    with torch.no_grad():
        learner.stop_controller.head.bias.fill_(-0.5)  # mixed stopping times, all before t_max
    batch = planted_batch(items, 40, 8, seed=3)
    noise = learner.draw_noise(batch, torch.Generator().manual_seed(11))
    params = list(learner.parameters())
    runs = {}
    for compact in (False, True):
        learner.compact_stopped = compact
        adapted = learner.adapt(batch, noise=noise)
        terms = learner.meta_loss(batch, noise=noise)
        runs[compact] = adapted, terms, torch.autograd.grad(terms.total, params, allow_unused=True)
    (a_masked, t_masked, g_masked), (a_compact, t_compact, g_compact) = runs[False], runs[True]
    steps = a_masked.steps
    assert len(set(steps.tolist())) > 1 and steps.max() < learner.config.t_max  # drops and an early end
    assert torch.equal(a_compact.theta, a_masked.theta) and torch.equal(a_compact.steps, steps)
    assert torch.equal(a_compact.updated, a_masked.updated)
    live = torch.arange(a_masked.stop_logit.shape[0]).unsqueeze(1) <= steps  # steps that computed p
    assert torch.equal(a_compact.stop_logit[live], a_masked.stop_logit[live])
    for field in ("total", "query_loss", "reinforce", "steps"):
        assert torch.equal(getattr(t_compact, field), getattr(t_masked, field)), field
    for (name, _), got, expect in zip(learner.named_parameters(), g_compact, g_masked):
        if fused:
            assert (got is None and expect is None) or torch.equal(got, expect), name
        elif expect is not None:
            torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-15, msg=name)


@pytest.mark.parametrize("fused", [False, True])
def test_masked_loop_exit_changes_no_value(fused):
    """The eager masked loop's exit (every scenario stopped: end) gives θ, steps, live stop logits,
    the meta-loss and every meta-gradient bit for bit as the full-length masked loop."""
    learner, items = make_learner(fused=fused)
    learner.compact_stopped = False
    with torch.no_grad():
        learner.stop_controller.head.bias.fill_(-0.5)  # mixed stopping times, all before t_max
    batch = planted_batch(items, 40, 8, seed=3)
    noise = learner.draw_noise(batch, torch.Generator().manual_seed(11))
    params = list(learner.parameters())
    step = learner.model.loss_and_grad
    runs = {}
    for every in (0, 4):
        learner.masked_exit_every = every
        calls = []
        learner.model.loss_and_grad = lambda *a, **k: calls.append(1) or step(*a, **k)
        adapted = learner.adapt(batch, noise=noise)
        learner.model.loss_and_grad = step
        terms = learner.meta_loss(batch, noise=noise)
        runs[every] = adapted, terms, torch.autograd.grad(terms.total, params, allow_unused=True), len(calls)
    (a_full, t_full, g_full, n_full), (a_exit, t_exit, g_exit, n_exit) = runs[0], runs[4]
    assert n_full == learner.config.t_max and n_exit < n_full   # it did end early
    assert torch.equal(a_exit.theta, a_full.theta) and torch.equal(a_exit.steps, a_full.steps)
    assert torch.equal(a_exit.updated, a_full.updated)
    live = torch.arange(a_full.stop_logit.shape[0]).unsqueeze(1) <= a_full.steps
    assert torch.equal(a_exit.stop_logit[live], a_full.stop_logit[live])
    for field in ("total", "query_loss", "reinforce", "steps"):
        assert torch.equal(getattr(t_exit, field), getattr(t_full, field)), field
    for (name, _), got, expect in zip(learner.named_parameters(), g_exit, g_full):
        assert (got is None and expect is None) or torch.equal(got, expect), name


def test_masked_loop_reads_right_after_t_min_then_every_segment():
    learner, items = make_learner()
    learner.compact_stopped = False
    force_stop_bias(learner, 30.0)   # every scenario stops at the first chance, step t_min
    batch = planted_batch(items, 40, 3)
    calls = []
    step = learner.model.loss_and_grad
    learner.model.loss_and_grad = lambda *a, **k: calls.append(1) or step(*a, **k)
    out = learner.adapt(batch, generator=torch.Generator().manual_seed(0))
    assert out.steps.tolist() == [4, 4, 4] and out.updated.shape == (learner.config.t_max, 3)
    assert len(calls) == learner.config.t_min + 1   # steps 0 … t_min, then the read ends the loop


def test_compact_loop_ends_when_every_scenario_has_stopped():
    learner, items = make_learner()
    force_stop_bias(learner, 30.0)
    batch = planted_batch(items, 40, 3)
    learner.compact_stopped = True
    calls = []
    step = learner.model.loss_and_grad
    learner.model.loss_and_grad = lambda *a, **k: calls.append(a[0].shape[0]) or step(*a, **k)
    out = learner.adapt(batch, generator=torch.Generator().manual_seed(0))
    assert out.steps.tolist() == [4, 4, 4] and out.updated.shape == (learner.config.t_max, 3)
    assert calls == [3] * 5  # t_min updates, the step that stops, nothing after


def test_one_meta_step_changes_omega_and_lowers_the_query_loss():
    learner, items = make_learner(dtype=torch.float32)
    batch = planted_batch(items, 40, 8, seed=1)
    noise = learner.draw_noise(batch, torch.Generator().manual_seed(0))
    optimizer = build_optimizer(learner, TrainConfig(lr_init=1e-2, lr_update=1e-2, lr_stop=1e-2))
    before_omega = learner.omega.detach().clone()
    before = learner.meta_loss(batch, noise=noise)
    before.total.backward()
    optimizer.step()
    after = learner.meta_loss(batch, noise=noise)
    assert not torch.equal(before_omega, learner.omega.detach())
    assert after.query_loss.mean() < before.query_loss.mean() - 1e-3


# Adam divides by the gradient's running RMS, so in float32 a coordinate whose meta-gradient is
# ~0 can step ±lr on a last-bit difference; fp64 with Adam and fp32 with SGD are the sharp checks.
@pytest.mark.parametrize("dtype, train_config", [
    (torch.float64, TrainConfig(lr_init=1e-3, lr_update=1e-3, lr_stop=1e-3)),
    (torch.float32, TrainConfig(optimizer="sgd", sgd_lr=1e-2, sgd_weight_decay=0.0)),
])
def test_fused_and_pure_paths_train_to_the_same_parameters(dtype, train_config):
    states = []
    for fused in (True, False):
        learner, items = make_learner(dtype=dtype, seed=7, fused=fused)
        optimizer = build_optimizer(learner, train_config)
        generator = torch.Generator().manual_seed(3)
        for step in range(3):
            batch = planted_batch(items, 40, 2, seed=step)
            optimizer.zero_grad()
            learner.meta_loss(batch, generator=generator).total.backward()
            optimizer.step()
        states.append(learner.state_dict())
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=1e-4, atol=1e-6, msg=key)


def test_update_state_equals_the_controllers_initial_state():
    learner, _ = make_learner()
    with torch.no_grad():
        learner.update_controller.h0.normal_()
        learner.update_controller.c0.normal_()
    ours = learner._update_state(3)
    theirs = learner.update_controller.initial_state(3)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rand_init_draws_theta0_per_scenario_and_learns_no_omega():
    learner, items = make_learner(init="random")
    assert learner.omega is None and "omega" not in dict(learner.named_parameters())
    batch = planted_batch(items, 40, 2)
    noise = learner.draw_noise(batch, torch.Generator().manual_seed(0))
    assert not torch.equal(noise.theta0[0], noise.theta0[1])
    out = learner.adapt(batch, noise=noise, record=True)
    torch.testing.assert_close(out.trajectory.thetas[0], noise.theta0)


def test_fixed_lr_is_plain_sgd():
    learner, items = make_learner(update="sgd", inner_lr=0.01, stop="fixed", steps=1)
    assert learner.update_controller is None
    batch = planted_batch(items, 40, 2)
    noise = learner.draw_noise(batch, torch.Generator().manual_seed(0))
    out = learner.adapt(batch, noise=noise)
    theta0 = learner.omega.detach().expand(2, -1).clone().requires_grad_(True)
    negatives = learner.item_emb[learner._negatives(batch, noise.neg[0])]
    loss = learner.model.loss(theta0, learner.user_emb[batch.support_users],
                              learner.item_emb[batch.support_items], negatives)[0]
    (grad,) = torch.autograd.grad(loss.sum(), theta0)
    torch.testing.assert_close(out.theta.detach(), theta0.detach() - 0.01 * grad)


def test_fixed_step_takes_all_steps_and_trains_no_stop_controller():
    learner, items = make_learner(stop="fixed", steps=20)
    batch = planted_batch(items, 40, 2)
    terms = learner.meta_loss(batch, generator=torch.Generator().manual_seed(0))
    assert terms.steps.tolist() == [20, 20] and torch.all(terms.reinforce == 0)
    terms.total.backward()
    assert all(p.grad is None for p in learner.stop_parameters())
    assert learner.omega.grad is not None and learner.omega.grad.abs().sum() > 0


def test_negatives_are_uniform_over_the_pool_minus_the_positive():
    from types import SimpleNamespace
    learner, items = make_learner()
    batch = planted_batch(items, 40, 2, n_support=4, pool_sizes=[5, 3])
    for s in range(2):
        size = int(batch.pool_size[s])
        grid = 10 * (size - 1)
        uniform = ((torch.arange(grid, dtype=torch.float64) + 0.5) / grid).unsqueeze(0)
        for j in range(4):
            one = SimpleNamespace(pool=batch.pool[s:s + 1], pool_size=batch.pool_size[s:s + 1],
                                  support_item_index=batch.support_item_index[s:s + 1, j:j + 1].expand(1, grid))
            drawn = learner._negatives(one, uniform)[0]
            values, freq = drawn.unique(return_counts=True)
            assert batch.support_items[s, j] not in values.tolist()
            assert len(values) == size - 1 and (freq == 10).all()
            assert set(values.tolist()) <= set(batch.pool[s, :size].tolist())


def test_record_trajectory_fields():
    learner, items = make_learner()
    out = learner.adapt(planted_batch(items, 40, 2), generator=torch.Generator().manual_seed(0), record=True)
    traj = out.trajectory
    length, k = learner.config.t_max, learner.model.n_tensors
    assert traj.train_loss.shape == (length, 2) and traj.stop_prob.shape == (length, 2)
    assert traj.alpha_mean.shape == (length, 2, k) and traj.beta_mean.shape == (length, 2, k)
    assert traj.query_loss.shape == (length + 1, 2) and traj.thetas.shape == (length + 1, 2, learner.model.n_params)
    assert ((traj.alpha_mean > 0) & (traj.alpha_mean < 1)).all()
    assert (traj.beta_mean[0] > 0.95).all()  # b_β = 5 at init
    one = traj.scenario(1)
    assert one["steps"] == out.steps[1].item() and len(one["train_loss"]) == length


@pytest.mark.parametrize("kind", ["mapping", "hybrid"])
def test_other_recommenders_meta_train(kind):
    torch.manual_seed(0)
    user_emb, item_emb = planted_world(dim=DIM, dtype=torch.float64)
    learner = MetaLearner(build_model(kind, DIM), user_emb, item_emb, MetaConfig())
    assert learner.update_controller.w_ih.shape[0] == learner.model.n_tensors
    terms = learner.meta_loss(planted_batch(item_emb, 40, 2), generator=torch.Generator().manual_seed(0))
    terms.total.backward()
    assert torch.isfinite(terms.total) and learner.omega.grad.abs().sum() > 0
    assert learner.update_controller.w_ih.grad.abs().sum() > 0


def test_scores_rank_with_the_adapted_theta():
    learner, items = make_learner()
    batch = planted_batch(items, 40, 2)
    with torch.no_grad():
        out = learner.adapt(batch, generator=torch.Generator().manual_seed(0))
    users, cands = batch.query_users[:, :5], batch.pool[:, :7]
    scores = learner.scores(out.theta, users, cands)
    assert scores.shape == (2, 5, 7) and not scores.requires_grad
    pair = learner.model.pair_scores(out.theta, learner.user_emb[users[:, 2:3]].expand(-1, 7, -1),
                                     learner.item_emb[cands])
    torch.testing.assert_close(scores[:, 2], pair)


def test_adapt_under_no_grad_still_adapts():
    learner, items = make_learner()
    batch = planted_batch(items, 40, 2)
    with torch.no_grad():
        out = learner.adapt(batch, generator=torch.Generator().manual_seed(0), record=True)
    assert not out.theta.requires_grad
    assert (out.trajectory.query_loss[-1] < out.trajectory.query_loss[0]).all()


@pytest.mark.parametrize("changes,match", [
    ({"init": "zeros"}, "init must be one of"), ({"update": "adam"}, "update must be one of"),
    ({"stop": "never"}, "stop must be one of"), ({"t_min": 21}, "t_min"), ({"t_max": 0}, "t_max"),
    ({"hidden_size": 0}, "hidden_size"), ({"steps": 0}, "steps"), ({"inner_lr": 0.0}, "inner_lr"),
    ({"stop_threshold": 1.0}, "stop_threshold"), ({"clip": -1.0}, "clip"), ({"p": 0}, "p must"),
])
def test_meta_config_rejects_bad_values(changes, match):
    with pytest.raises(ValueError, match=match):
        MetaConfig(**changes)


def test_learner_rejects_a_model_config_mismatch():
    user_emb, item_emb = planted_world(dim=DIM)
    with pytest.raises(ValueError, match="fused"):
        MetaLearner(build_model("interaction", DIM, fused=True), user_emb, item_emb, MetaConfig(fused=False))
    with pytest.raises(ValueError, match=r"\[n, 16\]"):
        MetaLearner(build_model("interaction", 16), user_emb, item_emb)


def test_inner_batch_draws_support_pairs_with_replacement():
    """inner_batch=m (the authors' MovieLens 128) adapts on m pairs a step, picked with replacement;
    it equals the default loop on a support set made of exactly those pairs."""
    import dataclasses

    from s2meta_fast.meta.noise import InnerNoise

    learner, items = make_learner(inner_batch=24, t_max=5, steps=5)
    batch = planted_batch(items, 40, 3)
    noise = learner.draw_noise(batch, torch.Generator().manual_seed(3), stop="fixed")
    assert noise.pick.shape == noise.neg.shape == (5, 3, 24)   # more pairs than the 16 support pairs
    picked = torch.floor(noise.pick[0] * 16).long()
    assert picked.max() < 16 and any(len(set(row.tolist())) < 24 for row in picked)   # repeats: replacement
    got = learner.adapt(batch, stop="fixed", noise=noise)
    for t in range(5):   # step t's batch is the support set of a one-step loop with the same draws
        picked = torch.floor(noise.pick[t] * 16).long()
        step_batch = dataclasses.replace(batch, support_users=batch.support_users.gather(1, picked),
                                         support_items=batch.support_items.gather(1, picked),
                                         support_item_index=batch.support_item_index.gather(1, picked))
        users, pos, neg = learner._step_batch(batch, noise, t, None, None)
        users_want, pos_want, neg_want = learner._step_batch(step_batch, InnerNoise(noise.neg[t:t + 1], noise.stop),
                                                             0, learner.user_emb[step_batch.support_users],
                                                             learner.item_emb[step_batch.support_items])
        torch.testing.assert_close((users, pos, neg), (users_want, pos_want, neg_want), rtol=0, atol=0)
    assert got.steps.tolist() == [5, 5, 5] and torch.isfinite(got.theta).all()
    with pytest.raises(ValueError, match="noise.neg must be"):
        learner.adapt(batch, stop="fixed", noise=InnerNoise(noise.neg, noise.stop))   # 24 draws, 16 pairs
