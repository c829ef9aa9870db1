"""Where each scenario has its own preference, s²Meta's adaptation must pay: the adapted θ ranks a
new scenario's query pairs better than its own ω_R and better than one global θ.

Scenario c likes the items aligned with its own random direction d_c (no direction is shared), so
a single θ trained on every meta-train scenario's pairs can only learn their average, while 16
support pairs reveal d_c. The test fails if meta-training or the inner loop stops adapting.
"""
from __future__ import annotations

import numpy as np
import torch

from planted_tasks import TaskBatch, planted_world
from s2meta_fast.meta import MetaConfig, MetaLearner
from s2meta_fast.meta.trainer import MetaTrainer, TrainConfig
from s2meta_fast.models import build_model

DIM, N_USERS, N_ITEMS, POOL, SUPPORT, QUERY = 8, 40, 80, 24, 16, 32


class OwnDirectionTasks:
    """Draws scenarios with their own hidden direction; ``train_batch`` for the MetaTrainer."""

    def __init__(self, item_emb: torch.Tensor, seed: int):
        self.item_emb = item_emb
        self.rng = np.random.default_rng(seed)

    def batch(self, n_scenarios: int) -> TaskBatch:
        fields = {k: [] for k in ("su", "si", "sx", "pool", "qu", "qp", "qn")}
        for _ in range(n_scenarios):
            direction = torch.as_tensor(self.rng.normal(size=DIM), dtype=self.item_emb.dtype)
            pool = torch.as_tensor(self.rng.permutation(N_ITEMS)[:POOL])
            order = torch.argsort(self.item_emb[pool] @ direction, descending=True)
            liked, disliked = order[:POOL // 3], order[-(POOL // 3):]
            pick = liked[torch.as_tensor(self.rng.integers(len(liked), size=SUPPORT))]
            fields["sx"].append(pick)
            fields["si"].append(pool[pick])
            fields["su"].append(torch.as_tensor(self.rng.integers(N_USERS, size=SUPPORT)))
            fields["pool"].append(pool)
            fields["qu"].append(torch.as_tensor(self.rng.integers(N_USERS, size=QUERY)))
            fields["qp"].append(pool[liked[torch.as_tensor(self.rng.integers(len(liked), size=QUERY))]])
            fields["qn"].append(pool[disliked[torch.as_tensor(self.rng.integers(len(disliked), size=QUERY))]])
        s = {k: torch.stack(v) for k, v in fields.items()}
        return TaskBatch(support_users=s["su"], support_items=s["si"], support_item_index=s["sx"], pool=s["pool"],
                         pool_size=torch.full((n_scenarios,), POOL), query_users=s["qu"], query_pos=s["qp"],
                         query_neg=s["qn"], names=[f"own{i}" for i in range(n_scenarios)])

    def train_batch(self, scenarios, n_scenarios: int) -> TaskBatch:
        return self.batch(n_scenarios)


def pair_accuracy(learner: MetaLearner, theta: torch.Tensor, batch: TaskBatch) -> float:
    """Share of query (positive, negative) pairs the θ [S, N] ranks the right way round."""
    with torch.no_grad():
        _, pos, neg = learner.model.loss(theta, learner.user_emb[batch.query_users],
                                         learner.item_emb[batch.query_pos], learner.item_emb[batch.query_neg])
    return float((pos > neg).float().mean())


def global_theta(learner: MetaLearner, tasks: OwnDirectionTasks, steps: int = 150) -> torch.Tensor:
    """One θ trained by Adam on the pairs of many meta-train scenarios (the Global baseline)."""
    theta = torch.nn.Parameter(learner.model.init_theta(torch.Generator().manual_seed(0)).unsqueeze(0))
    optimiser = torch.optim.Adam([theta], lr=1e-2)
    for _ in range(steps):
        b = tasks.batch(8)
        users = torch.cat([b.support_users, b.query_users], 1).reshape(1, -1)
        pos = torch.cat([b.support_items, b.query_pos], 1).reshape(1, -1)
        neg = torch.cat([b.pool[:, :SUPPORT], b.query_neg], 1).reshape(1, -1)
        loss = learner.model.loss(theta, learner.user_emb[users], learner.item_emb[pos], learner.item_emb[neg])[0]
        optimiser.zero_grad()
        loss.sum().backward()
        optimiser.step()
    return theta.detach()[0]


def test_adapted_theta_beats_its_own_init_and_a_global_model(tmp_path):
    torch.manual_seed(0)
    user_emb, item_emb = planted_world(n_users=N_USERS, n_items=N_ITEMS, dim=DIM)
    learner = MetaLearner(build_model("interaction", DIM), user_emb, item_emb, MetaConfig(t_max=10, t_min=4))
    tasks = OwnDirectionTasks(item_emb, seed=1)
    trainer = MetaTrainer(learner, tasks, None, TrainConfig(lr_init=1e-3, lr_update=1e-3, meta_batch=8,
                                                            validate_every=0, checkpoint_every=0, log_every=0,
                                                            quiet=True), tmp_path)
    trainer.fit(30)
    theta_global = global_theta(learner, OwnDirectionTasks(item_emb, seed=2))

    test = OwnDirectionTasks(item_emb, seed=3).batch(32)
    with torch.no_grad():
        adapted = learner.adapt(test, generator=torch.Generator().manual_seed(0)).theta
    acc_adapted = pair_accuracy(learner, adapted, test)
    acc_init = pair_accuracy(learner, learner.omega.detach().expand(32, -1), test)
    acc_global = pair_accuracy(learner, theta_global.expand(32, -1), test)
    assert acc_adapted > acc_init + 0.15, (acc_adapted, acc_init)
    assert acc_adapted > acc_global + 0.15, (acc_adapted, acc_global)
