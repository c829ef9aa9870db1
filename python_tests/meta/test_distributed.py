"""Data-parallel meta-training on 2 CPU processes (gloo): each rank draws its own scenarios from a
stream of its own, the averaged step equals one process's on the ranks' draws together, the
streams survive a checkpoint, sharded evaluation equals an unsharded one, and mismatched settings
or process counts are refused."""
from __future__ import annotations

import dataclasses
import os
import socket
import sys
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
from s2meta_fast.meta import MetaConfig, MetaLearner, checkpoint, distributed
from s2meta_fast.meta.noise import InnerNoise
from s2meta_fast.meta.trainer import MetaTrainer, TrainConfig, WorldSizeMismatch
from s2meta_fast.models import build_model

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DIM, STEPS, BATCH = 8, 3, 8


class PlantedSampler:
    """Planted batches from a numpy Generator `rng`, like the data layer's TaskSampler. A scenario
    is named after the draw that made it ("seed/index"), so two draws can be told apart."""

    def __init__(self, item_emb, seed=0):
        self.item_emb, self.rng = item_emb, np.random.default_rng(seed)

    def train_batch(self, scenarios, n_scenarios):
        seed = int(self.rng.integers(1 << 30))
        batch = planted_batch(self.item_emb, 40, n_scenarios, seed=seed)
        batch.names = [f"{seed}/{k}" for k in range(n_scenarios)]
        return batch


def make_trainer(out, group=distributed.SINGLE):
    torch.manual_seed(0)
    user_emb, item_emb = planted_world(dim=DIM, dtype=torch.float64)
    learner = MetaLearner(build_model("interaction", DIM), user_emb, item_emb, MetaConfig(t_max=6, t_min=2))
    cfg = TrainConfig(meta_batch=BATCH, log_every=0, validate_every=0, checkpoint_every=0, quiet=True,
                      lr_init=1e-2, lr_update=1e-2, lr_stop=1e-2)
    return MetaTrainer(learner, PlantedSampler(item_emb), ["a"], cfg, out, group=group)


def concat(parts):
    """One batch (or InnerNoise) holding the scenarios of `parts` in order."""
    if isinstance(parts[0], InnerNoise):
        def cat(name, dim):
            values = [getattr(part, name) for part in parts]
            return None if values[0] is None else torch.cat(values, dim)
        return InnerNoise(cat("neg", 1), cat("stop", 1), cat("theta0", 0), cat("pick", 1))
    joined = {}
    for field in dataclasses.fields(parts[0]):
        values = [getattr(part, field.name) for part in parts]
        if isinstance(values[0], torch.Tensor):
            joined[field.name] = torch.cat(values)
        elif isinstance(values[0], list):
            joined[field.name] = sum(values, [])
        else:
            joined[field.name] = values[0]
    return type(parts[0])(**joined)


class RankStreams:
    """What `world` ranks draw in one meta-step, as one process's batch: rank r's B/N scenarios
    from a PlantedSampler on rank r's numpy stream and their noise from rank r's torch generator,
    rank after rank. Fed to a one-process trainer (sampler and learner.draw_noise), it is the
    reference a distributed run must equal."""

    def __init__(self, item_emb, world, seed=0):
        self.samplers = [PlantedSampler(item_emb) for _ in range(world)]
        for rank, sampler in enumerate(self.samplers):
            sampler.rng = distributed.rank_rng(sampler.rng, rank)
        self.generators = [torch.Generator().manual_seed(distributed.rank_seed(seed, rank)) for rank in range(world)]
        self.parts = []

    def train_batch(self, scenarios, n_scenarios):
        self.parts = [s.train_batch(scenarios, n_scenarios // len(self.samplers)) for s in self.samplers]
        return concat(self.parts)

    def noise_of(self, learner):
        def draw_noise(batch, generator=None):
            return concat([MetaLearner.draw_noise(learner, part, g) for part, g in zip(self.parts, self.generators)])
        return draw_noise


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
            # interrupted after one meta-step (its final checkpoint), then resumed by a fresh trainer
            make_trainer(os.path.join(out, "resume"), group).fit(1)
            resumed = make_trainer(os.path.join(out, "resume"), group)
            resumed.fit(STEPS, resume=True)
            report["resumed"] = {k: v.clone() for k, v in resumed.learner.state_dict().items()}
            try:   # a one-process checkpoint, written before the launch
                make_trainer(os.path.join(out, "single"), group).fit(STEPS, resume=True)
            except WorldSizeMismatch as error:
                report["world_size_error"] = str(error)
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
    # A gloo worker thread may still be dropping a finished collective's tensors, which takes the
    # GIL; a process finalizing Python meanwhile aborts (std::terminate from
    # ProcessGroupGloo::runLoop, pytorch/pytorch#190489). The report is on disk: skip finalization.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def dist_out(tmp_path_factory):
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def two_ranks(dist_out, one_thread_module):
    make_trainer(dist_out / "single").fit(1)
    mp.start_processes(_worker, args=(2, free_port(), str(dist_out)), nprocs=2, join=True, start_method="spawn")
    reports = [torch.load(dist_out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for report in reports:
        assert "error" not in report, report["error"]
    return reports


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, one_thread_module):
    """One process × B = 8 fed, each meta-step, what ranks 0 and 1 draw with B = 4 each."""
    trainer = make_trainer(tmp_path_factory.mktemp("single") / "run")
    streams = RankStreams(trainer.sampler.item_emb, world=2, seed=trainer.cfg.seed)
    trainer.sampler = streams
    trainer.learner.draw_noise = streams.noise_of(trainer.learner)
    trainer.names = record_names(trainer)
    trainer.fit(STEPS)
    return trainer


def test_two_ranks_of_four_take_the_steps_of_one_process_of_eight(two_ranks, one_rank):
    assert [r["group"] for r in two_ranks] == [(0, 2, "gloo"), (1, 2, "gloo")]
    # each rank drew and adapted B/2 scenarios from its own stream, as the reference rebuilds them
    for step in range(STEPS):
        assert len(two_ranks[1]["names"][step]) == BATCH // 2
        assert two_ranks[0]["names"][step] + two_ranks[1]["names"][step] == one_rank.names[step]
    single = one_rank.learner.state_dict()
    assert not torch.equal(single["omega"], make_trainer(one_rank.out_dir).learner.omega.detach())  # it trained
    for report in two_ranks:
        assert report["state"].keys() == single.keys()
        for key, value in single.items():
            torch.testing.assert_close(report["state"][key], value, rtol=1e-9, atol=1e-12, msg=key)


def test_each_rank_draws_its_own_scenarios_from_seed_and_rank(two_ranks):
    names = [report["names"] for report in two_ranks]
    for step in range(STEPS):
        assert not set(names[0][step]) & set(names[1][step])
    # rank 0 draws one process's stream, B/N at a time; rank 1 the stream (seed 0, rank 1)
    user_emb, item_emb = planted_world(dim=DIM, dtype=torch.float64)
    for rank in (0, 1):
        sampler = PlantedSampler(item_emb)
        sampler.rng = distributed.rank_rng(sampler.rng, rank)
        assert [sampler.train_batch(["a"], BATCH // 2).names for _ in range(STEPS)] == names[rank]


def test_rank_streams_are_reproducible_and_distinct():
    assert distributed.rank_seed(7, 0) == 7   # rank 0 keeps the single-process stream
    seeds = {distributed.rank_seed(seed, rank) for seed in (0, 1, 7) for rank in (1, 2, 3)}
    assert len(seeds) == 9 and not seeds & {0, 1, 7}
    assert distributed.rank_seed(7, 2) == distributed.rank_seed(7, 2)
    assert distributed.rank_seed(-1, 1) == distributed.rank_seed((1 << 64) - 1, 1)   # torch's reading of -1

    def first(seed, rank, skip=0):
        rng = np.random.default_rng([seed, 0x7A5C])
        rng.random(skip)
        return distributed.rank_rng(rng, rank).integers(1 << 62, size=3).tolist()

    assert first(3, 0) == np.random.default_rng([3, 0x7A5C]).integers(1 << 62, size=3).tolist()
    assert first(3, 1) == first(3, 1, skip=5)   # from the seed, not from how far rng has drawn
    assert len({str(first(seed, rank)) for seed in (3, 4) for rank in (0, 1, 2)}) == 6


def test_a_resumed_run_continues_every_rank_s_stream(two_ranks, dist_out):
    for report in two_ranks:
        for key, value in report["state"].items():
            torch.testing.assert_close(report["resumed"][key], value, rtol=0, atol=0, msg=key)
    state = checkpoint.load(dist_out / "resume" / "checkpoint.pt")
    assert state["step"] == STEPS and len(state["streams"]) == 2
    assert not torch.equal(state["streams"][0]["generator"], state["streams"][1]["generator"])
    assert state["streams"][0]["sampler"] != state["streams"][1]["sampler"]


def test_resuming_on_another_number_of_processes_is_a_clear_error(two_ranks, dist_out):
    for report in two_ranks:
        message = report["world_size_error"]
        assert "the draw streams of 1 process and this run has 2 processes" in message
        assert "resume on one process (no torchrun)" in message and "\n" not in message
    with pytest.raises(WorldSizeMismatch, match=r"streams of 2 processes and this run has 1 process; .* resume on 2 "
                                                r"processes \(torchrun --nnodes x --nproc-per-node = 2\)"):
        make_trainer(dist_out / "run").fit(STEPS + 1, resume=True)


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
