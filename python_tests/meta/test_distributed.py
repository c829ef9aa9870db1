"""Data-parallel meta-training on 2 CPU processes (gloo): the same ω as one process, sharded
evaluation equal to an unsharded one, mismatched settings refused at start-up."""
from __future__ import annotations

import os
import socket
import traceback

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from planted_tasks import planted_batch, planted_world
from s2meta_fast.data.tasks import EvalTask
from s2meta_fast.errors import ConfigError
from s2meta_fast.eval.baselines import S2Meta
from s2meta_fast.eval.protocol import evaluate
from s2meta_fast.meta import MetaConfig, MetaLearner, distributed
from s2meta_fast.meta.trainer import MetaTrainer, TrainConfig
from s2meta_fast.models import build_model

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DIM, STEPS, BATCH = 8, 3, 8


class PlantedSampler:
    """Planted batches from a numpy Generator, like the data layer's TaskSampler."""

    def __init__(self, item_emb, seed=0):
        self.item_emb, self.rng = item_emb, np.random.default_rng(seed)

    def train_batch(self, scenarios, n_scenarios):
        return planted_batch(self.item_emb, 40, n_scenarios, seed=int(self.rng.integers(1 << 30)))


def make_trainer(out, group=distributed.SINGLE):
    torch.manual_seed(0)
    user_emb, item_emb = planted_world(dim=DIM, dtype=torch.float64)
    learner = MetaLearner(build_model("interaction", DIM), user_emb, item_emb, MetaConfig(t_max=6, t_min=2))
    cfg = TrainConfig(meta_batch=BATCH, log_every=0, validate_every=0, checkpoint_every=0, quiet=True,
                      lr_init=1e-2, lr_update=1e-2, lr_stop=1e-2)
    return MetaTrainer(learner, PlantedSampler(item_emb), ["a"], cfg, out, group=group)


def eval_tasks(n=7, seed=1):
    """Random scenarios of varied sizes over the planted world (40 users, 60 items)."""
    rng = np.random.default_rng(seed)
    tasks = []
    for s in range(n):
        items = np.sort(rng.choice(60, 10 + 3 * s, replace=False))
        local = rng.integers(len(items), size=16)
        users = np.sort(rng.choice(40, 5 + s, replace=False))
        counts = rng.integers(1, 4, size=len(users))
        positives = np.concatenate([np.sort(rng.choice(items, c, replace=False)) for c in counts])
        tasks.append(EvalTask(name=f"t{s}", support_users=rng.integers(40, size=16), support_items=items[local],
                              items=items, eval_users=users, eval_indptr=np.concatenate([[0], np.cumsum(counts)]),
                              eval_items=positives, support_item_index=local))
    return tasks


def run_evaluation(learner, group=distributed.SINGLE):
    return evaluate(S2Meta(learner, stop="sample"), eval_tasks(), (3, 5), seed=4, block_size=2, progress=False,
                    group=group)["metrics"]


def record_names(trainer):
    """The scenario names each meta-step adapts, in order."""
    names, step_fn = [], trainer.step_fn

    def recording(batch, noise):
        names.append(list(batch.names))
        return step_fn(batch, noise)
    trainer.step_fn = recording
    return names


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    report = {}
    try:
        with distributed.session("cpu", "auto") as group:
            report["group"] = (group.rank, group.world_size, group.backend)
            trainer = make_trainer(os.path.join(out, "run"), group)
            report["names"] = record_names(trainer)
            trainer.fit(STEPS)
            report["state"] = {k: v.clone() for k, v in trainer.learner.state_dict().items()}
            report["metrics"] = run_evaluation(trainer.learner, group)
            report["written"] = sorted(os.listdir(os.path.join(out, "run")))
            # the application's start-up check, with a config that differs on rank 1
            from s2meta_fast.app.stages import check_ranks_agree
            from s2meta_fast.config import build_config
            try:
                check_ranks_agree(build_config({"meta_batch": 4 + 4 * rank, "quiet": rank > 0}), None, group)
            except ConfigError as error:
                report["mismatch"] = str(error)
            check_ranks_agree(build_config({"quiet": rank > 0}), None, group)   # quiet may differ
            report["agreed"] = True
    except BaseException:
        report["error"] = traceback.format_exc()
    torch.save(report, os.path.join(out, f"rank{rank}.pt"))


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dist"))
    mp.start_processes(_worker, args=(2, free_port(), out), nprocs=2, join=True, start_method="spawn")
    reports = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(2)]
    for report in reports:
        assert "error" not in report, report["error"]
    return reports


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    trainer = make_trainer(tmp_path_factory.mktemp("single") / "run")
    trainer.names = record_names(trainer)
    trainer.fit(STEPS)
    torch.set_num_threads(before)
    return trainer


def test_two_ranks_of_four_take_the_steps_of_one_process_of_eight(two_ranks, one_rank):
    assert [r["group"] for r in two_ranks] == [(0, 2, "gloo"), (1, 2, "gloo")]
    # each rank adapted its half of every global batch, in order
    for step in range(STEPS):
        assert two_ranks[0]["names"][step] + two_ranks[1]["names"][step] == one_rank.names[step]
        assert len(two_ranks[1]["names"][step]) == BATCH // 2
    single = one_rank.learner.state_dict()
    assert not torch.equal(single["omega"], make_trainer(one_rank.out_dir).learner.omega.detach())  # it trained
    for report in two_ranks:
        assert report["state"].keys() == single.keys()
        for key, value in single.items():
            torch.testing.assert_close(report["state"][key], value, rtol=1e-9, atol=1e-12, msg=key)


def test_only_rank_0_writes_checkpoints(two_ranks):
    assert two_ranks[0]["written"] == ["checkpoint.pt"]


def test_sharded_evaluation_equals_unsharded_exactly(two_ranks):
    # the same learner on every rank (rank 0's state) evaluated in one process
    user_emb, item_emb = planted_world(dim=DIM, dtype=torch.float64)
    learner = MetaLearner(build_model("interaction", DIM), user_emb, item_emb, MetaConfig(t_max=6, t_min=2))
    learner.load_state_dict(two_ranks[0]["state"])
    torch.testing.assert_close(two_ranks[0]["state"], two_ranks[1]["state"], rtol=0, atol=0)
    single = run_evaluation(learner)
    assert two_ranks[0]["metrics"] == single and two_ranks[1]["metrics"] == single


def test_mismatched_settings_are_a_clear_error_on_every_rank(two_ranks):
    for report in two_ranks:
        message = report["mismatch"]
        assert "config: rank(s) 1 differ from rank 0 (meta_batch: 8)" in message
        assert "software:" not in message   # the part that agrees is not blamed
        assert report["agreed"]
        assert "same command line" in message


def test_uneven_meta_batch_is_refused():
    with pytest.raises(ConfigError, match="meta_batch 6 is not a multiple of the 4 processes"):
        distributed.check_divisible(6, distributed.Group(rank=0, world_size=4, backend="gloo"))


def test_without_torchrun_nothing_communicates(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with distributed.session("cpu", "auto") as group:
        assert group is distributed.SINGLE and not group.active and group.is_writer
        assert (group.world_size, group.backend) == (1, "none")
        distributed.check_same({"config": str(os.getpid())}, group)   # nothing to compare with
        assert distributed.from_writer(lambda: 7, group) == 7


@pytest.mark.parametrize("device,asked,chosen", [("cpu", "auto", "gloo"), ("cuda", "auto", "nccl"),
                                                 ("cuda", "gloo", "gloo"), ("cpu", "gloo", "gloo")])
def test_backend_follows_the_device_unless_overridden(device, asked, chosen):
    assert distributed.choose_backend(device, asked) == chosen


def test_nccl_on_the_cpu_is_refused():
    with pytest.raises(ConfigError, match="nccl needs --device cuda"):
        distributed.choose_backend("cpu", "nccl")
