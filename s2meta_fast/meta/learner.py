"""MetaLearner: learned init ω_R, update controller, stop controller and the inner loop (Alg. 1).

The inner loop adapts S scenarios at once over a flat θ [S, N]. Two ways to handle a stop, with
the same numbers:

- *masked* (CUDA, and the CPU reference path): a stopped scenario keeps its θ frozen
  (``torch.where``) while the others go on, so the loop has no host synchronisation and can be
  captured in a CUDA graph; stopped scenarios are computed and discarded. Captured, it runs its
  full length; run eagerly, it reads once right after ``t_min`` and then every
  ``masked_exit_every`` steps whether any scenario is left, and ends when none is.
- *compact* (CPU with the fused kernels, where a host read costs nothing): between steps the loop reads which scenarios
  are still active, drops the stopped ones from every per-scenario tensor, and ends as soon as
  none is left. The stop controller ends most loops a few steps after ``t_min``, so this skips
  most of the work of T_max steps.
"""
from __future__ import annotations

import functools

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.base import FlatRecommender
from .meta_config import STOP_MODES, MetaConfig
from .noise import InnerNoise
from .stop_controller import StopController
from .update_controller import FastUpdateController, UpdateController


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on `device`'s current stream (no host reads there)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@dataclass
class Trajectory:
    """Per-step record of an inner loop (``adapt(..., record=True)``), for the paper's Fig. 2.

    Step t uses θ⁽ᵗ⁾ (before that step's update). All tensors are on the host.

    Attributes:
        train_loss: [T, S] support-batch loss at θ⁽ᵗ⁾.
        stop_prob: [T, S] p⁽ᵗ⁾ (NaN under ``stop="fixed"``).
        updated: [T, S] whether step t updated θ (False once the scenario has stopped).
        alpha_mean, beta_mean: [T, S, K] mean input / forget gate per adapted tensor
            (α = inner_lr, β = 1 for the FixedLr ablation).
        thetas: [T+1, S, N] θ⁽⁰⁾ … θ⁽ᵀ⁾ (frozen entries repeat after a stop).
        query_loss: [T+1, S] query hinge loss at each θ, or None when the batch has no query.
    """

    train_loss: Tensor
    stop_prob: Tensor
    updated: Tensor
    alpha_mean: Tensor
    beta_mean: Tensor
    thetas: Tensor
    query_loss: Optional[Tensor] = None

    def scenario(self, index: int = 0) -> Dict[str, Any]:
        """One scenario's trajectory as plain Python lists (per step; gates per step per tensor)."""
        out = {
            "train_loss": self.train_loss[:, index].tolist(),
            "stop_prob": self.stop_prob[:, index].tolist(),
            "updated": self.updated[:, index].tolist(),
            "alpha_mean": self.alpha_mean[:, index].tolist(),
            "beta_mean": self.beta_mean[:, index].tolist(),
            "steps": int(self.updated[:, index].sum()),
        }
        if self.query_loss is not None:
            out["query_loss"] = self.query_loss[:, index].tolist()
        return out


@dataclass
class _LoopInputs:
    """The per-scenario inputs of the inner loop (rows dropped together when scenarios stop)."""

    users: Tensor
    positives: Tensor
    support_item_index: Tensor
    pool: Tensor
    pool_size: Tensor
    neg: Tensor                       # [T, S, n] noise
    query: Optional[tuple] = None     # (users, pos, neg) embeddings when the query loss is tracked

    def select(self, index: Tensor) -> "_LoopInputs":
        query = None if self.query is None else tuple(q.index_select(0, index) for q in self.query)
        return _LoopInputs(self.users.index_select(0, index), self.positives.index_select(0, index),
                           self.support_item_index.index_select(0, index), self.pool.index_select(0, index),
                           self.pool_size.index_select(0, index), self.neg.index_select(1, index), query)


@dataclass
class AdaptOutput:
    """Result of :meth:`MetaLearner.adapt`.

    Attributes:
        theta: [S, N] adapted parameters θ⁽ᵀ⁾ (differentiable w.r.t. ω_R and the update controller).
        steps: [S] number of updates each scenario took (int64).
        stop_logit: [L, S] stop-controller logits per step (zeros under ``stop="fixed"``).
        updated: [L, S] float mask, 1 where step t updated θ (the non-stopping steps).
        query_losses: [L, S] detached query loss at θ⁽ᵗ⁾ before step t, when tracked.
        trajectory: the per-step record when ``record=True``.
        support_loss: [L, S] detached support loss at θ⁽ᵗ⁾ before step t (None from a graphed loop);
            NaN where it was not computed: a scenario the CPU loop had dropped after it stopped, or a
            step skipped because every scenario had stopped.
    """

    theta: Tensor
    steps: Tensor
    stop_logit: Tensor
    updated: Tensor
    query_losses: Optional[Tensor] = None
    trajectory: Optional[Trajectory] = None
    support_loss: Optional[Tensor] = None


@dataclass
class MetaLossTerms:
    """The meta-objective of a meta-batch (``total`` is what to backprop)."""

    total: Tensor          # 0-dim: mean over scenarios of query_loss + reinforce
    query_loss: Tensor     # [S] hinge loss on D_test at θ⁽ᵀ⁾
    reinforce: Tensor      # [S] REINFORCE surrogate of the stop controller (0 unless stop="sample")
    steps: Tensor          # [S] updates taken
    extras: Dict[str, Tensor] = field(default_factory=dict)

    def detach(self) -> "MetaLossTerms":
        return MetaLossTerms(self.total.detach(), self.query_loss.detach(), self.reinforce.detach(),
                             self.steps.detach(), {k: v.detach() for k, v in self.extras.items()})


class MetaLearner(nn.Module):
    """s²Meta's meta learner over a recommender with a flat θ (paper §4.2, docs/spec.md §3-5).

    Args:
        model: a recommender from :func:`s2meta_fast.models.build_model`.
        user_emb, item_emb: frozen embeddings [n_users, d], [n_items, d]; kept as non-persistent
            buffers (moved by ``.to()``, not written into checkpoints: the data layer rebuilds them).
        config: a :class:`MetaConfig`.
    """

    def __init__(self, model: FlatRecommender, user_emb: Tensor, item_emb: Tensor,
                 config: MetaConfig = MetaConfig()):
        super().__init__()
        if user_emb.dim() != 2 or item_emb.dim() != 2 or user_emb.shape[1] != model.embed_dim \
                or item_emb.shape[1] != model.embed_dim:
            raise ValueError(f"user_emb and item_emb must be [n, {model.embed_dim}] for this model, got "
                             f"{tuple(user_emb.shape)} and {tuple(item_emb.shape)}")
        if model.fused != config.fused:
            raise ValueError(f"model.fused={model.fused} but config.fused={config.fused}: build the model "
                             f"with build_model(kind, d, fused=config.fused)")
        self.model, self.config = model, config
        self.register_buffer("user_emb", user_emb.detach().clone(), persistent=False)
        self.register_buffer("item_emb", item_emb.detach().clone(), persistent=False)
        sizes = [hi - lo for lo, hi in zip(model.offsets[:-1], model.offsets[1:])]
        segment = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        # [N, K] one-hot: per-tensor sums (gradient norms, gate means) as one matmul, no per-tensor loop
        self.register_buffer("segment_matrix", F.one_hot(segment, len(sizes)).to(user_emb.dtype), persistent=False)
        self.register_buffer("segment_ids", segment, persistent=False)
        self.register_buffer("segment_sizes", torch.tensor(sizes, dtype=user_emb.dtype), persistent=False)

        if config.init == "learned":
            self.omega = nn.Parameter(model.init_theta(dtype=user_emb.dtype))
        else:
            self.register_parameter("omega", None)
        if config.update == "lstm":
            controller = FastUpdateController if config.fused else UpdateController
            self.update_controller = controller(model.param_shapes, hidden_size=config.hidden_size, p=config.p,
                                                clip=config.clip, layer_norm=config.layer_norm,
                                                forget_bias_fix=config.forget_bias_fix,
                                                zero_hh_bias=config.zero_hh_bias, state_init=config.state_init)
        else:
            self.update_controller = None
        # kept under every stop mode so a FixedStep-trained learner can still be evaluated with a stop
        self.stop_controller = StopController(model.n_tensors, p=config.p, fused=config.fused)
        # None: compact on the CPU with the fused kernels, mask elsewhere (see the module
        # docstring); True/False force one.
        # Not a MetaConfig field: it changes the cost of the loop, never its results.
        self.compact_stopped: Optional[bool] = None
        # The masked loop outside a CUDA-graph capture (eager CUDA, the CPU reference path) asks
        # once right after t_min and then every `masked_exit_every` steps whether any scenario is
        # still adapting, and ends when none is: one host read per segment. 0: never.
        self.masked_exit_every: int = 4
        self.to(user_emb.dtype)

    # -- parameter groups (the trainer gives them different learning rates) ------------------
    def init_parameters(self) -> List[nn.Parameter]:
        return [] if self.omega is None else [self.omega]

    def update_parameters(self) -> List[nn.Parameter]:
        return [] if self.update_controller is None else list(self.update_controller.parameters())

    def stop_parameters(self) -> List[nn.Parameter]:
        return list(self.stop_controller.parameters())

    # -- the inner loop --------------------------------------------------------------------------
    def draw_noise(self, batch, generator: Optional[torch.Generator] = None,
                   stop: Optional[str] = None) -> InnerNoise:
        """The random draws `adapt` would make for `batch` (see :class:`InnerNoise`)."""
        n_scenarios, n_support = batch.support_users.shape
        init = None
        if self.config.init == "random":  # RandInit: a fresh θ⁽⁰⁾ per scenario, drawn with the rest
            init = functools.partial(self.model.init_theta, dtype=self.user_emb.dtype, device=self.user_emb.device)
        return InnerNoise.draw(self.config.loop_length(stop), n_scenarios, n_support, generator=generator,
                               device=self.user_emb.device, dtype=self.user_emb.dtype, init_theta=init,
                               batch_size=self.config.inner_batch)

    def initial_theta(self, n_scenarios: int, noise: InnerNoise) -> Tensor:
        if self.omega is not None:
            return self.omega.unsqueeze(0).expand(n_scenarios, -1).clone()
        if noise.theta0 is None or noise.theta0.shape != (n_scenarios, self.model.n_params):
            raise ValueError("init='random' needs noise.theta0 [S, N]; draw it with learner.draw_noise")
        return noise.theta0.clone()

    def _update_state(self, n_scenarios: int):
        # the controller's initial_state, built by indexing instead of repeat_interleave from a
        # host list, so it is capturable in a CUDA graph; gradients still reach h0 and c0
        ctrl = self.update_controller
        h = ctrl.h0.index_select(0, self.segment_ids).unsqueeze(0).expand(n_scenarios, -1, -1)
        c = ctrl.c0.index_select(0, self.segment_ids).unsqueeze(0).expand(n_scenarios, -1, -1)
        return h, c

    def _negatives(self, batch, uniform: Tensor, item_index: Optional[Tensor] = None) -> Tensor:
        """Item ids of fresh negatives, uniform over the pool minus the positive (design.md).

        `item_index` [S, n]: the positives' places in the pool (default: every support pair's).
        """
        item_index = batch.support_item_index if item_index is None else item_index
        size = batch.pool_size.unsqueeze(-1)
        offset = torch.floor(uniform * (size - 1).to(uniform.dtype)).long()
        index = torch.remainder(item_index + 1 + offset, size)
        return batch.pool.gather(1, index)

    def _step_batch(self, batch, noise: InnerNoise, t: int, users: Tensor, positives: Tensor):
        """Step t's (users, positives, negatives) embeddings: every support pair, or `noise.pick`'s."""
        if noise.pick is None:
            return users, positives, self.item_emb[self._negatives(batch, noise.neg[t])]
        n_support = batch.support_users.shape[1]
        picked = torch.floor(noise.pick[t] * n_support).long().clamp_(max=n_support - 1)   # [S, m]
        item_index = batch.support_item_index.gather(1, picked)
        return (self.user_emb[batch.support_users.gather(1, picked)],
                self.item_emb[batch.support_items.gather(1, picked)],
                self.item_emb[self._negatives(batch, noise.neg[t], item_index)])

    def adapt(self, batch, stop: Optional[str] = None, generator: Optional[torch.Generator] = None,
              record: bool = False, noise: Optional[InnerNoise] = None) -> AdaptOutput:
        """Runs the inner loop on the support sets of `batch` (S scenarios at once).

        Args:
            batch: a TaskBatch (support fields required; query fields only for `record` query losses).
            stop: "sample", "threshold" or "fixed"; default ``config.stop``.
            generator: torch.Generator on the learner's device for the negatives, stop draws and
                RandInit; a fixed seed makes evaluation reproducible.
            record: also return a per-step :class:`Trajectory` (host tensors; syncs after the loop).
            noise: pre-drawn randomness (overrides `generator`); see :meth:`draw_noise`.

        Returns:
            An :class:`AdaptOutput`; ``out.theta`` [S, N] feeds ``model.scores`` for evaluation.
        """
        stop = stop or self.config.stop
        if noise is None:
            noise = self.draw_noise(batch, generator, stop)
        track_query = record and getattr(batch, "query_users", None) is not None
        return self._inner_loop(batch, noise, stop, track_query=track_query, record=record)

    def _inner_loop(self, batch, noise: InnerNoise, stop: str, *, track_query: bool, record: bool) -> AdaptOutput:
        if stop not in STOP_MODES:
            raise ValueError(f"stop must be one of {STOP_MODES}, got {stop!r}")
        cfg, model = self.config, self.model
        n_scenarios = batch.support_users.shape[0]
        n_steps = cfg.loop_length(stop)
        width = batch.support_users.shape[1] if noise.pick is None else noise.pick.shape[-1]
        if noise.neg.shape[0] < n_steps or noise.neg.shape[1:] != (n_scenarios, width):
            raise ValueError(f"noise.neg must be [>= {n_steps}, S, n] = [{n_steps}, {n_scenarios}, {width}], "
                             f"got {tuple(noise.neg.shape)}")
        if noise.pick is not None and (noise.pick.shape[0] < n_steps or noise.pick.shape[1] != n_scenarios):
            raise ValueError(f"noise.pick must be [>= {n_steps}, {n_scenarios}, n], got {tuple(noise.pick.shape)}")
        users = self.user_emb[batch.support_users]
        positives = self.item_emb[batch.support_items]
        if track_query:
            q_users, q_pos, q_neg = (self.user_emb[batch.query_users], self.item_emb[batch.query_pos],
                                     self.item_emb[batch.query_neg])
        query = (q_users, q_pos, q_neg) if track_query else None

        theta = self.initial_theta(n_scenarios, noise)
        state = self._update_state(n_scenarios) if self.update_controller is not None else None
        stop_state = self.stop_controller.initial_state(n_scenarios)
        active = torch.ones(n_scenarios, dtype=torch.bool, device=theta.device)
        logits, masks, query_losses, support_losses = [], [], [], []
        rec: Dict[str, List[Tensor]] = {k: [] for k in ("loss", "alpha", "beta", "theta", "query")}
        compact = not record and stop != "fixed" and noise.pick is None and self._compacts(theta.device)
        # compact mode: θ, the update controller's state and the support inputs keep only the rows
        # `live` (original indices) still adapting; `parked` holds the final θ of the dropped ones.
        # `active`, the stop controller and its draws stay at all S rows: the stop controller is
        # tiny, and a GEMM of another height could round its live rows differently.
        live = torch.arange(n_scenarios, device=theta.device)
        parked: Dict[int, Tensor] = {}
        sub = _LoopInputs(users, positives, batch.support_item_index, batch.pool, batch.pool_size, noise.neg, query)
        every = self.masked_exit_every
        exits = not compact and not record and stop != "fixed" and every > 0 and not _capturing(theta.device)

        def widen(rows: Tensor, fill: float = 0.0) -> Tensor:  # live rows -> all S rows (`fill` for the dropped)
            if not parked:
                return rows
            return rows.new_full((n_scenarios,) + rows.shape[1:], fill).index_copy(0, live, rows)

        for t in range(n_steps):
            if compact and t > cfg.t_min:
                # the one host read per step: on the CPU it costs microseconds against a step's ms
                flags = active.tolist()
                if not any(flags):
                    break
                rows = live.tolist()
                if not all(flags[s] for s in rows):
                    keep = [j for j, s in enumerate(rows) if flags[s]]
                    parked.update((s, theta[j]) for j, s in enumerate(rows) if not flags[s])
                    index = torch.tensor(keep, device=theta.device)
                    live, theta = live[index], theta.index_select(0, index)
                    state = None if state is None else tuple(x.index_select(0, index) for x in state)
                    sub = sub.select(index)
            elif exits and t > cfg.t_min and (t - cfg.t_min - 1) % every == 0 and not bool(active.any()):
                break   # every scenario has stopped: the remaining steps would change nothing
            if noise.pick is None:
                step_users, step_positives = sub.users, sub.positives
                negatives = self.item_emb[self._negatives(sub, sub.neg[t])]
            else:   # the authors' inner batch (drawn with replacement); such loops are never compacted
                step_users, step_positives, negatives = self._step_batch(batch, noise, t, users, positives)
            # first order: ∇ is taken at a detached θ, so it is a constant for the meta-gradient
            loss, grad = model.loss_and_grad(theta, step_users, step_positives, negatives, cfg.margin)
            theta_before = theta.detach()
            if track_query:
                with torch.no_grad():
                    query_losses.append(widen(model.loss(theta.detach(), *sub.query, cfg.margin)[0]))

            if stop == "fixed":
                logit = theta.new_zeros(n_scenarios)
                go = active
            else:
                grad_norms = (grad.square() @ self.segment_matrix).sqrt()  # [S, K], unclamped ∇
                logit, stop_state = self.stop_controller(widen(grad_norms), widen(loss), stop_state)
                if t < cfg.t_min:
                    go = active
                elif stop == "sample":
                    go = active & ~(noise.stop[t] < torch.sigmoid(logit.detach()))
                else:
                    go = active & ~(torch.sigmoid(logit.detach()) > cfg.stop_threshold)

            if self.update_controller is not None:
                # the controller state needs no mask: stopping is absorbing and a stopped scenario's
                # θ is frozen below, so what its state does afterwards never reaches θ or the loss
                new_theta, state, alpha, beta = self.update_controller(theta, grad, loss, state)
            else:
                new_theta = theta - cfg.inner_lr * grad
                alpha = beta = None
            go_live = go.index_select(0, live) if parked else go
            theta = torch.where(go_live.unsqueeze(-1), new_theta, theta)
            active = go
            logits.append(logit)
            support_losses.append(widen(loss.detach(), float("nan")))   # NaN: not computed (dropped)
            masks.append(go)
            if record:
                rec["loss"].append(loss)
                rec["alpha"].append(self._segment_mean(alpha, cfg.inner_lr, theta))
                rec["beta"].append(self._segment_mean(beta, 1.0, theta))
                rec["theta"].append(theta_before)

        if parked:
            for j, s in enumerate(live.tolist()):
                parked[s] = theta[j]
            theta = torch.stack([parked[s] for s in range(n_scenarios)])
        for _ in range(len(masks), n_steps if masks else 0):  # steps skipped after every scenario stopped
            logits.append(logits[-1].new_zeros(n_scenarios))
            masks.append(masks[-1].new_zeros(n_scenarios))
            if track_query:
                query_losses.append(query_losses[-1].new_zeros(n_scenarios))
            support_losses.append(support_losses[-1].new_full((n_scenarios,), float("nan")))
        updated = torch.stack(masks).to(theta.dtype) if masks else theta.new_zeros(0, n_scenarios)
        out = AdaptOutput(
            theta=theta,
            steps=updated.sum(0).long() if masks else torch.zeros(n_scenarios, dtype=torch.long, device=theta.device),
            stop_logit=torch.stack(logits) if logits else theta.new_zeros(0, n_scenarios),
            updated=updated,
            query_losses=torch.stack(query_losses) if track_query and query_losses else None,
            support_loss=torch.stack(support_losses) if support_losses else theta.new_zeros(0, n_scenarios),
        )
        if record:
            out.trajectory = self._trajectory(out, rec, stop, track_query and (q_users, q_pos, q_neg))
        return out

    def _compacts(self, device: torch.device) -> bool:
        # auto: the fused CPU kernels give each scenario's rows and the weight-gradient sums the
        # same values with the stopped rows dropped (tested bit for bit); the reference twin's
        # GEMMs may sum in another order when the row count changes, so it keeps the mask
        if self.compact_stopped is not None:
            return self.compact_stopped
        return device.type == "cpu" and self.config.fused

    def _segment_mean(self, gate: Optional[Tensor], constant: float, like: Tensor) -> Tensor:
        if gate is None:
            return like.new_full((like.shape[0], self.model.n_tensors), constant)
        return (gate.detach() @ self.segment_matrix) / self.segment_sizes

    def _trajectory(self, out: AdaptOutput, rec, stop: str, query) -> Trajectory:
        thetas = torch.stack(rec["theta"] + [out.theta.detach()])
        query_loss = None
        if query:
            with torch.no_grad():
                final = self.model.loss(out.theta.detach(), *query, self.config.margin)[0]
            query_loss = torch.cat([out.query_losses, final.unsqueeze(0)]).cpu()
        stop_prob = torch.sigmoid(out.stop_logit.detach())
        if stop == "fixed":
            stop_prob = torch.full_like(stop_prob, float("nan"))
        return Trajectory(train_loss=torch.stack(rec["loss"]).cpu(), stop_prob=stop_prob.cpu(),
                          updated=out.updated.bool().cpu(), alpha_mean=torch.stack(rec["alpha"]).cpu(),
                          beta_mean=torch.stack(rec["beta"]).cpu(), thetas=thetas.cpu(), query_loss=query_loss)

    def scores(self, theta: Tensor, user_ids: Tensor, item_ids: Tensor) -> Tensor:
        """Scores for ranking: θ [S, N], user ids [S, A], item ids [S, B] (global) -> [S, A, B]."""
        return self.model.scores(theta, self.user_emb[user_ids], self.item_emb[item_ids])

    # -- the meta-objective ----------------------------------------------------------------------
    def meta_loss(self, batch, generator: Optional[torch.Generator] = None,
                  noise: Optional[InnerNoise] = None) -> MetaLossTerms:
        """Query hinge loss after adaptation plus the stop controller's REINFORCE surrogate.

        For scenario s with T updates, the surrogate is (docs/spec.md §4, paper Eqs. 10-11)
        ``Σ_{t non-stopping} −log(1 − p⁽ᵗ⁾) · (L_test(θ⁽ᵗ⁾) − L_test(θ⁽ᵀ⁾))`` with the advantage
        detached (0-based t: θ⁽ᵗ⁾ is the parameter the step started from). The stopping step's
        own term has return L_test(θ⁽ᵀ⁾) − L_test(θ⁽ᵀ⁾) = 0, so it is omitted (docs/method.md).
        ``total`` averages query loss + surrogate over the S scenarios: the meta-gradient of a
        meta-batch is the mean of the per-scenario ones.
        """
        stop = self.config.stop
        if noise is None:
            noise = self.draw_noise(batch, generator, stop)
        reinforce_on = stop == "sample"
        out = self._inner_loop(batch, noise, stop, track_query=reinforce_on, record=False)
        query_loss, _, _ = self.model.loss(out.theta, self.user_emb[batch.query_users],
                                           self.item_emb[batch.query_pos], self.item_emb[batch.query_neg],
                                           self.config.margin)
        if reinforce_on:
            advantage = (out.query_losses - query_loss.detach().unsqueeze(0)).detach()
            log_continue = F.logsigmoid(-out.stop_logit)  # log(1 − p), finite for any logit
            reinforce = -(log_continue * advantage * out.updated).sum(0)
        else:
            reinforce = torch.zeros_like(query_loss)
        total = (query_loss + reinforce).mean()
        return MetaLossTerms(total=total, query_loss=query_loss, reinforce=reinforce, steps=out.steps)
