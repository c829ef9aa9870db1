"""MetaTrainer: resume equals an uninterrupted run, non-finite steps, checkpoints, validation."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch

from planted_tasks import planted_batch, planted_world
from s2meta_fast.meta import MetaConfig, MetaLearner
from s2meta_fast.errors import CheckpointError
from s2meta_fast.meta import checkpoint
from s2meta_fast.meta.trainer import MetaTrainer, NonFiniteMetaLoss, TrainConfig, build_optimizer
from s2meta_fast.models import build_model

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DIM = 8


class PlantedSampler:
    """Draws planted batches from a numpy Generator `rng`, like the data layer's TaskSampler."""

    def __init__(self, item_emb, seed=0, poison=()):
        self.item_emb, self.rng, self.calls, self.poison = item_emb, np.random.default_rng(seed), 0, set(poison)
        self.fail_at = None

    def train_batch(self, scenarios, n_scenarios):
        self.calls += 1
        if self.fail_at == self.calls:
            raise KeyboardInterrupt
        batch = planted_batch(self.item_emb, 39, n_scenarios, seed=int(self.rng.integers(1 << 30)))
        if self.calls in self.poison:
            batch.support_users[:, 0] = 39  # user 39 has a NaN embedding
        return batch


def make(tmp_path, seed=0, poison=(), **train):
    torch.manual_seed(seed)
    user_emb, item_emb = planted_world(dim=DIM)
    user_emb[39] = float("nan")
    learner = MetaLearner(build_model("interaction", DIM), user_emb, item_emb, MetaConfig(t_max=6, t_min=2))
    cfg = TrainConfig(**{"meta_batch": 2, "log_every": 0, "validate_every": 0, "checkpoint_every": 3,
                         "quiet": True, **train})
    return MetaTrainer(learner, PlantedSampler(item_emb, poison=poison), ["a", "b"], cfg, tmp_path / "run")


def assert_same_state(a, b):
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_resume_equals_an_uninterrupted_run(tmp_path):
    straight = make(tmp_path / "a")
    straight.fit(7)

    interrupted = make(tmp_path / "b")
    interrupted.sampler.fail_at = 5  # killed during meta-step 5: checkpoint from step 3 survives
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(7)
    assert checkpoint.load(tmp_path / "b" / "run" / "checkpoint.pt")["step"] == 3

    resumed = make(tmp_path / "b", seed=123)  # fresh process: different init, restored from disk
    resumed.fit(7, resume=True)
    assert resumed.step == 7
    assert_same_state(straight.learner.state_dict(), resumed.learner.state_dict())
    assert_same_state(straight.optimizer.state_dict()["state"][0], resumed.optimizer.state_dict()["state"][0])


def test_a_non_finite_step_is_skipped_with_a_warning(tmp_path):
    trainer = make(tmp_path, poison={2})
    trainer.fit(1)
    before = {k: v.clone() for k, v in trainer.learner.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="non-finite meta-loss"):
        trainer.fit(2)
    assert_same_state(before, trainer.learner.state_dict())
    assert trainer.nonfinite_streak == 1
    trainer.fit(3)
    assert trainer.nonfinite_streak == 0
    assert not torch.equal(before["omega"], trainer.learner.omega.detach())


def test_ten_non_finite_steps_in_a_row_abort(tmp_path):
    trainer = make(tmp_path, poison=set(range(1, 100)))
    with pytest.warns(RuntimeWarning), pytest.raises(NonFiniteMetaLoss, match="10 meta-steps in a row"):
        trainer.fit(50)
    assert trainer.step == 9  # the tenth failed step raised before being counted


def test_validation_drives_best_checkpoint_and_plateau(tmp_path):
    scores = iter([0.05, 0.1, 0.3, 0.2, 0.2, 0.2, 0.2])
    trainer = make(tmp_path, validate_every=1, plateau_patience=2, lr_init=1e-3)
    trainer.validate = lambda learner: next(scores)
    trainer.fit(6)
    assert checkpoint.load(tmp_path / "run" / "best.pt")["step"] == 2
    assert trainer.best_score == 0.3
    assert [(r["step"], r["valid_score"]) for r in trainer.history] == [
        (0, 0.05), (1, 0.1), (2, 0.3), (3, 0.2), (4, 0.2), (5, 0.2), (6, 0.2)]
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(2e-4)  # reduced once, factor 0.2


def test_the_starting_learner_can_be_the_best_and_does_not_drive_the_plateau(tmp_path):
    scores = iter([0.5, 0.1, 0.1, 0.1, 0.1])
    trainer = make(tmp_path, validate_every=1, plateau_patience=2, lr_init=1e-3)
    start = {k: v.clone() for k, v in trainer.learner.state_dict().items()}
    trainer.validate = lambda learner: next(scores)
    trainer.fit(3)
    best = checkpoint.load(tmp_path / "run" / "best.pt")
    assert best["step"] == 0 and trainer.best_score == 0.5
    assert_same_state(start, best["learner"])
    # fed to the scheduler, 0.5 would have made steps 1-3 three bad epochs and cut the rate
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    trainer.fit(4)  # continuing (or resuming) does not validate the start again
    assert [r["step"] for r in trainer.history] == [0, 1, 2, 3, 4]


def test_validating_the_start_changes_no_training_draw(tmp_path):
    plain = make(tmp_path / "a")
    plain.fit(4)
    validated = make(tmp_path / "b", validate_every=2)
    validated.validate = lambda learner: float(learner.omega.detach().sum())
    validated.fit(4)
    assert [r["step"] for r in validated.history] == [0, 2, 4]
    assert_same_state(plain.learner.state_dict(), validated.learner.state_dict())


def test_atomic_save_keeps_the_old_checkpoint_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic({"step": 1}, path)

    def torn(state, stream):
        stream.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert checkpoint.load(path) == {"step": 1}
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_optimizers_follow_the_paper_and_the_code():
    user_emb, item_emb = planted_world(dim=DIM)
    learner = MetaLearner(build_model("interaction", DIM), user_emb, item_emb)
    adam = build_optimizer(learner, TrainConfig())
    assert isinstance(adam, torch.optim.Adam)
    assert {g["name"]: g["lr"] for g in adam.param_groups} == {"init": 1e-4, "update": 1e-4, "stop": 5e-5}
    sgd = build_optimizer(learner, TrainConfig(optimizer="sgd"))
    assert isinstance(sgd, torch.optim.SGD)
    assert all(g["lr"] == 1e-4 and g["weight_decay"] == 1e-5 for g in sgd.param_groups)
    n_params = sum(len(g["params"]) for g in sgd.param_groups)
    assert n_params == len(list(learner.parameters()))


@pytest.mark.parametrize("changes,match", [
    ({"optimizer": "rmsprop"}, "optimizer"), ({"meta_batch": 0}, "meta_batch"), ({"grad_clip": 0}, "grad_clip"),
    ({"checkpoint_every": -1}, "checkpoint_every"), ({"plateau_factor": 1.0}, "plateau_factor"),
])
def test_train_config_rejects_bad_values(changes, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**changes)


@pytest.mark.parametrize("keep", [False, True])
def test_fit_changes_the_allocator_only_when_asked(tmp_path, monkeypatch, keep):
    """Library etiquette: glibc's process-wide heap settings are an opt-in (s2meta opts in)."""
    from s2meta_fast.meta import host

    calls = []
    monkeypatch.setattr(host, "keep_freed_memory", lambda: calls.append(1) or True)
    trainer = make(tmp_path, meta_steps=2)
    trainer.keep_freed_memory = keep
    summary = trainer.fit()   # the config's meta_steps
    assert summary["step"] == 2 and bool(calls) == keep
    assert not make(tmp_path / "default").keep_freed_memory


def test_adam_weight_decay_is_the_config_s():
    user_emb, item_emb = planted_world(dim=DIM)
    learner = MetaLearner(build_model("interaction", DIM), user_emb, item_emb)
    assert all(g["weight_decay"] == 0.0 for g in build_optimizer(learner, TrainConfig()).param_groups)
    adam = build_optimizer(learner, TrainConfig(weight_decay=1e-5))   # the authors' code
    assert all(g["weight_decay"] == 1e-5 for g in adam.param_groups)


# -- checkpoint integrity ------------------------------------------------------------------------


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def test_a_damaged_checkpoint_is_named_not_unpickled(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save_atomic({"step": 3, "w": torch.arange(1000.0)}, path)
    good = path.read_bytes()
    _truncate(path)
    with pytest.raises(CheckpointError, match=r"c.pt is damaged: checksum mismatch"):
        checkpoint.load(path)
    flipped = bytearray(good)
    flipped[-100] ^= 0x01
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        checkpoint.load(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="c.pt is damaged: unreadable"):
        checkpoint.load(path)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        checkpoint.load(tmp_path / "absent.pt")
    torch.save({"step": 1}, path)   # a checkpoint from before the checksum header still loads
    assert checkpoint.load(path) == {"step": 1}


def test_the_trainer_keeps_the_last_checkpoints_and_the_best(tmp_path):
    trainer = make(tmp_path, checkpoint_every=1, validate_every=1, keep_checkpoints=2)
    scores = iter([0.0, 0.5, 0.1, 0.2, 0.3, 0.1])   # the first is the start's (step 0)
    trainer.validate = lambda learner: next(scores)
    trainer.fit(5)
    run = tmp_path / "run"
    assert sorted(os.listdir(run)) == ["best.pt", "checkpoint.1.pt", "checkpoint.pt"]
    assert [checkpoint.load(run / n)["step"] for n in ("checkpoint.pt", "checkpoint.1.pt", "best.pt")] == [5, 4, 1]


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, caplog):
    straight = make(tmp_path / "a", checkpoint_every=1)
    straight.fit(6)
    interrupted = make(tmp_path / "b", checkpoint_every=1)
    interrupted.sampler.fail_at = 5
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(6)
    run = tmp_path / "b" / "run"
    _truncate(run / "checkpoint.pt")   # step 4's; step 3's survives as checkpoint.1.pt
    resumed = make(tmp_path / "b", seed=123, checkpoint_every=1)
    with caplog.at_level(logging.WARNING):
        resumed.fit(6, resume=True)
    assert "checkpoint.pt is damaged" in caplog.text and "resuming from" in caplog.text
    assert "checkpoint.1.pt (meta-step 3)" in caplog.text
    assert_same_state(straight.learner.state_dict(), resumed.learner.state_dict())


def test_resume_refuses_when_no_checkpoint_is_intact(tmp_path):
    trainer = make(tmp_path, checkpoint_every=1)
    trainer.fit(3)
    run = tmp_path / "run"
    for name in ("checkpoint.pt", "checkpoint.1.pt"):
        _truncate(run / name, 0.3)
    with pytest.raises(CheckpointError) as exc:
        make(tmp_path).fit(5, resume=True)
    msg = str(exc.value)
    assert "no intact checkpoint" in msg and "checkpoint.pt is damaged" in msg and "checkpoint.1.pt is damaged" in msg


def test_a_checkpoint_of_other_settings_is_refused_naming_the_difference(tmp_path):
    make(tmp_path).fit(3)
    torch.manual_seed(0)
    user_emb, item_emb = planted_world(dim=DIM)
    other = MetaLearner(build_model("interaction", DIM), user_emb, item_emb, MetaConfig(t_max=7, t_min=2))
    trainer = MetaTrainer(other, PlantedSampler(item_emb), ["a"], TrainConfig(quiet=True), tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"other settings: t_max \(6 -> 7\)"):
        trainer.fit(5, resume=True)
    state = checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    state["format"] = 99
    checkpoint.save_atomic(state, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint format \(99"):
        make(tmp_path).fit(5, resume=True)


def test_a_format_1_checkpoint_of_one_process_still_resumes(tmp_path):
    straight = make(tmp_path / "a")
    straight.fit(5)
    make(tmp_path / "b").fit(3)
    path = tmp_path / "b" / "run" / "checkpoint.pt"
    state = checkpoint.load(path)
    assert state["format"] == 2 and len(state["streams"]) == 1
    (stream,) = state.pop("streams")
    state.update(format=1, generator=stream["generator"], sampler=stream["sampler"])   # the format-1 layout
    checkpoint.save_atomic(state, path)
    resumed = make(tmp_path / "b", seed=123)
    resumed.fit(5, resume=True)
    assert_same_state(straight.learner.state_dict(), resumed.learner.state_dict())
