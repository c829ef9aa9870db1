"""The s2meta CLI end to end on a tiny synthetic ML-20M-format dataset."""
import json
import os

import pytest
import torch

from s2meta_fast import cli
from s2meta_fast.data.synthetic import write_raw
from s2meta_fast.meta import trainer as trainer_mod

METRICS = [f"{m}@{k}" for m in ("recall", "ndcg", "hit") for k in (10, 20, 50)]


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, one_thread_module):
    root = tmp_path_factory.mktemp("syn")
    # sizes pinned so the split keeps meta-validation scenarios (Finetune needs them)
    write_raw("ml20m", str(root / "raw"), seed=0, n_users=400, n_scenarios=12, per_scenario=8, per_source=12)
    return ["--dataset", "ml20m", "--data-dir", str(root / "raw"), "--cache-dir", str(root / "cache"),
            "--min-items", "5", "--max-items", "1000", "--embed-dim", "32", "--mf-epochs", "5"]


TINY = ["--meta-steps", "3", "--meta-batch", "1", "--t-max", "5", "--t-min", "2", "--validate-every", "1",
        "--checkpoint-every", "1",
        "--global-steps", "20", "--global-batch", "64", "--finetune-lrs", "0.1", "--finetune-steps", "1", "2",
        "--quiet", "--seed", "3", "--methods", "s2meta", "itempop", "global", "finetune"]


def _results(out):
    with open(os.path.join(out, "results.json")) as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def straight_run(dataset, tmp_path_factory):
    """One uninterrupted tiny run, shared by the tests that inspect or compare against it."""
    out = str(tmp_path_factory.mktemp("straight") / "run")
    code = cli.main(["run", *dataset, *TINY, "--out", out])
    return code, out, _results(out) if code == 0 else None


def test_run_writes_results_for_all_methods(straight_run, capsys):
    code, out, doc = straight_run
    assert code == 0
    assert list(doc)[:5] == ["dataset", "seed", "n_test_scenarios", "n_test_users", "methods"]
    assert doc["dataset"] == "ml20m" and doc["seed"] == 3
    assert doc["n_test_scenarios"] >= 1 and doc["n_test_users"] >= doc["n_test_scenarios"]
    assert list(doc["methods"]) == ["s2meta", "itempop", "global", "finetune"]
    for name, metrics in doc["methods"].items():
        assert list(metrics) == METRICS, name
        assert all(0.0 <= v <= 1.0 for v in metrics.values()), name
        assert metrics["recall@10"] <= metrics["recall@20"] <= metrics["recall@50"]
    assert doc["backend"] and doc["timings"]["s2meta"]["evaluate_s"] > 0
    table = open(os.path.join(out, "results.md")).read()
    assert "| s²Meta |" in table and "| Improve |" in table and "Recall@20" in table
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]   # atomic writes left no temp file
    with open(os.path.join(out, "adaptation.json")) as fh:
        adaptation = json.load(fh)
    summary = adaptation["summary"]
    assert summary["n_scenarios"] == doc["n_test_scenarios"] and summary["n_users"] == doc["n_test_users"]
    # the adapted θ of the report is the one the evaluation scored (same blocks, same draws)
    assert summary["recall@20_after"] == pytest.approx(doc["methods"]["s2meta"]["recall@20"], abs=1e-12)
    row = adaptation["scenarios"][0]
    assert row["gain"] == pytest.approx(row["recall@20_after"] - row["recall@20_before"])
    assert 2 <= row["steps"] <= 5 and set(row["alpha_mean"]) == set(row["beta_mean"]) and len(row["alpha_mean"]) == 8
    assert [h["step"] for h in adaptation["validation_history"] if "valid_score" in h] == [0, 1, 2, 3]
    assert adaptation["valid"]["summary"]["n_scenarios"] >= 1
    assert os.path.getsize(os.path.join(out, "validation_curve.png")) > 0

    # evaluate re-runs the protocol from the folder's own config: same seed, same numbers
    assert cli.main(["evaluate", "--out", out, "--quiet", "--methods", "s2meta", "itempop"]) == 0
    again = _results(out)["methods"]
    assert again["s2meta"] == doc["methods"]["s2meta"] and again["itempop"] == doc["methods"]["itempop"]
    printed = capsys.readouterr()
    assert "| ItemPop |" in printed.out and "s2meta_fast backend:" in printed.err


def _interrupt_at_step_2(monkeypatch):
    """Makes meta-training raise KeyboardInterrupt after meta-step 2; returns the real method."""
    periodic = trainer_mod.MetaTrainer._periodic

    def interrupt_at_step_2(self, running):
        if self.step == 2:
            raise KeyboardInterrupt
        periodic(self, running)

    monkeypatch.setattr(trainer_mod.MetaTrainer, "_periodic", interrupt_at_step_2)
    return periodic


def test_interrupted_run_resumes_to_the_same_result(dataset, straight_run, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "interrupted")
    periodic = _interrupt_at_step_2(monkeypatch)
    assert cli.main(["run", *dataset, *TINY, "--out", out]) == cli.EXIT_INTERRUPTED
    assert "--resume" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "results.json"))
    # the interrupted run waits in the staging area; nothing was committed to the run folder
    assert sorted(os.listdir(out)) == [".staging"]
    assert trainer_mod.checkpoint.load(os.path.join(out, ".staging", "checkpoint.pt"))["step"] == 1
    monkeypatch.setattr(trainer_mod.MetaTrainer, "_periodic", periodic)

    assert cli.main(["run", *dataset, *TINY, "--out", out, "--resume"]) == 0
    assert trainer_mod.checkpoint.load(os.path.join(out, "checkpoint.pt"))["step"] == 3
    assert _results(out)["methods"] == straight_run[2]["methods"]


def _omega(path):
    return trainer_mod.checkpoint.load(path)["learner"]["omega"]


def test_warm_start_begins_at_global_and_round_trips_through_resume(dataset, tmp_path, monkeypatch, capsys):
    start = str(tmp_path / "start")
    assert cli.main(["train", *dataset, *TINY, "--warm-start", "--meta-steps", "0", "--out", start]) == 0
    global_theta = trainer_mod.checkpoint.load(os.path.join(start, "global.pt"))["theta"]
    assert torch.equal(_omega(os.path.join(start, "checkpoint.pt")), global_theta.to(torch.float32))

    straight = str(tmp_path / "straight")
    assert cli.main(["train", *dataset, *TINY, "--warm-start", "--out", straight]) == 0
    moved = _omega(os.path.join(straight, "checkpoint.pt"))
    assert not torch.equal(moved, global_theta.to(moved.dtype))   # meta-training went on from there

    out = str(tmp_path / "interrupted")
    periodic = _interrupt_at_step_2(monkeypatch)
    assert cli.main(["train", *dataset, *TINY, "--warm-start", "--out", out]) == cli.EXIT_INTERRUPTED
    monkeypatch.setattr(trainer_mod.MetaTrainer, "_periodic", periodic)
    assert cli.main(["train", *dataset, *TINY, "--no-warm-start", "--out", out, "--resume"]) == cli.EXIT_USAGE
    assert "warm_start (True -> False)" in capsys.readouterr().err
    assert cli.main(["train", *dataset, *TINY, "--warm-start", "--out", out, "--resume"]) == 0
    assert torch.equal(_omega(os.path.join(out, "checkpoint.pt")), moved)


def test_source_only_warm_start_begins_at_its_own_global(dataset, tmp_path, capsys):
    out = str(tmp_path / "source")
    assert cli.main(["train", *dataset, *TINY, "--warm-start", "--warm-start-data", "source", "--meta-steps", "0",
                     "--out", out]) == 0
    source_theta = trainer_mod.checkpoint.load(os.path.join(out, "global_source.pt"))["theta"]
    assert torch.equal(_omega(os.path.join(out, "checkpoint.pt")), source_theta.to(torch.float32))
    assert not os.path.exists(os.path.join(out, "global.pt"))   # the baseline's θ is not needed to start

    run = str(tmp_path / "run")
    assert cli.main(["run", *dataset, *TINY, "--warm-start", "--warm-start-data", "source", "--out", run]) == 0
    baseline = trainer_mod.checkpoint.load(os.path.join(run, "global.pt"))["theta"]
    assert not torch.equal(baseline, source_theta)   # Global itself still trains on the scenario pairs too
    assert cli.main(["train", *dataset, *TINY, "--warm-start", "--out", run, "--resume"]) == cli.EXIT_USAGE
    assert "warm_start_data ('source' -> 'all')" in capsys.readouterr().err


def test_resume_refuses_changed_settings_and_missing_runs(dataset, tmp_path, capsys):
    out = str(tmp_path / "none")
    assert cli.main(["run", *dataset, *TINY, "--out", out, "--resume"]) == cli.EXIT_USAGE
    assert "holds no run to resume" in capsys.readouterr().err
    os.makedirs(out)
    with open(os.path.join(out, "config.yaml"), "w") as fh:
        fh.write("meta_batch: 3\nseed: 3\n")
    assert cli.main(["run", *dataset, *TINY, "--out", out, "--resume"]) == cli.EXIT_USAGE
    assert "meta_batch (3 -> 1)" in capsys.readouterr().err


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("meta_batch: 3\ntrain:\n  meta_steps: 9\neval:\n  ks: [5]\n")
    args = cli.parse(["run", "--config", str(path), "--meta-batch", "5", "--pure", "--ks", "1", "2"])
    cfg = cli.resolve_config(args)
    assert (cfg.train.meta_batch, cfg.train.meta_steps, cfg.eval.ks, cfg.meta.fused) == (5, 9, (1, 2), False)


def test_unknown_dataset_lists_valid_ones(capsys):
    assert cli.main(["prepare", "--dataset", "netflix"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "unknown dataset 'netflix'" in err and "ml100k" in err and "amazon" in err


def test_unknown_option_lists_valid_ones(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["run", "--meta-stepz", "3"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--meta-stepz" in err and "did you mean --meta-steps" in err and "--inner-lr" in err


def test_bad_choice_lists_valid_ones(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--stop", "sometimes"])
    assert "choose from 'sample', 'threshold', 'fixed'" in capsys.readouterr().err


def test_missing_data_folder_names_the_files(tmp_path, capsys):
    code = cli.main(["prepare", "--dataset", "ml20m", "--data-dir", str(tmp_path / "absent"), "--quiet"])
    assert code == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "ratings.csv" in err and "absent" in err


def test_config_with_unknown_key_is_a_usage_error(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("metasteps: 3\n")
    assert cli.main(["run", "--config", str(path)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "unknown key 'metasteps'" in err and "meta_steps" in err


def test_plot_draws_figure_2_from_a_run(straight_run, tmp_path, capsys):
    _, out, _ = straight_run
    cfg_text = open(os.path.join(out, "config.yaml")).read()
    assert "dataset: ml20m" in cfg_text
    from s2meta_fast.config import load_config
    from s2meta_fast.app import eval_tasks, prepare_data
    cfg = load_config(os.path.join(out, "config.yaml"))
    scenario = eval_tasks(prepare_data(cfg), "test", cfg.run.seed)[0].name
    png = str(tmp_path / "fig2.png")
    assert cli.main(["plot", "--checkpoint", out, "--scenario", scenario, "--out", png, "--quiet"]) == 0
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "test recall@20" in capsys.readouterr().out
    assert cli.main(["plot", "--checkpoint", out, "--scenario", "no such tag", "--out", png]) == cli.EXIT_USAGE
    assert "meta-test scenarios:" in capsys.readouterr().err


def test_cuda_device_without_a_gpu_is_a_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["run", "--device", "cuda", "--out", str(tmp_path / "run")]) == cli.EXIT_USAGE
    assert "no CUDA device is available" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing was started


def test_fixed_step_ablation_is_validated_and_evaluated_as_trained(dataset, tmp_path, monkeypatch):
    from s2meta_fast.app import stages

    seen = []

    class Recording(stages.S2Meta):
        def __init__(self, learner, stop="sample", **kwargs):
            seen.append(stop)
            super().__init__(learner, stop=stop, **kwargs)

    monkeypatch.setattr(stages, "S2Meta", Recording)
    out = str(tmp_path / "fixedstep")
    args = [*dataset, *TINY, "--stop", "fixed", "--steps", "3", "--methods", "s2meta", "--out", out]
    assert cli.main(["run", *args]) == 0
    assert len(seen) == 5 and set(seen) == {"fixed"}   # the start, 3 validations and the evaluation
    seen.clear()
    assert cli.main(["evaluate", "--out", out, "--quiet", "--eval-stop", "sample"]) == 0   # unless asked
    assert seen == ["sample"]


def test_preset_flag_and_the_command_line_default(tmp_path):
    assert cli.resolve_config(cli.parse(["run"])).preset == cli.DEFAULT_PRESET == "demo"
    assert cli.resolve_config(cli.parse(["run"])).run.keep_freed_memory   # the command line opts in
    cfg = cli.resolve_config(cli.parse(["run", "--preset", "paper", "--meta-batch", "2"]))
    assert (cfg.preset, cfg.train.lr_init, cfg.train.meta_batch, cfg.meta.inner_batch) == ("paper", 1e-4, 2, 128)
    path = tmp_path / "c.yaml"
    path.write_text("preset: paper\n")
    assert cli.resolve_config(cli.parse(["run", "--config", str(path)])).train.weight_decay == 1e-5
    assert cli.resolve_config(cli.parse(["run", "--config", str(path), "--preset", "demo"])).train.lr_init == 1e-3


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    from s2meta_fast import app
    from s2meta_fast.errors import DataError

    def empty(cfg):
        raise DataError("ml100k: no meta-test scenario")

    monkeypatch.setattr(app, "prepare", empty)
    assert cli.main(["prepare", "--quiet"]) == cli.EXIT_USAGE
    assert capsys.readouterr().err.strip().splitlines()[-1] == "s2meta prepare: error: ml100k: no meta-test scenario"

    def bug(cfg):
        raise KeyError("a bug")

    monkeypatch.setattr(app, "prepare", bug)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["prepare", "--quiet"])
