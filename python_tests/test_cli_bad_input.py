"""Bad input at the CLI: one line naming what is wrong, exit status 2, no traceback, and every
file that was there before — the previous run's results, the data, the config — unchanged.

Also what heals instead of failing: a damaged newest checkpoint (--resume takes the newest
intact one) and a damaged cache entry (rebuilt).
"""
import glob
import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from s2meta_fast import cli
from s2meta_fast.data.synthetic import write_raw
from s2meta_fast.app.transaction import RunLock

TINY = ["--meta-steps", "3", "--meta-batch", "1", "--t-max", "5", "--t-min", "2", "--validate-every", "1",
        "--checkpoint-every", "1", "--global-steps", "20", "--global-batch", "64", "--finetune-lrs", "0.1",
        "--finetune-steps", "1", "2", "--quiet", "--seed", "3", "--methods", "s2meta", "itempop", "global", "finetune"]


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Raw data for each loader, a shared cache, and one finished run to protect."""
    root = tmp_path_factory.mktemp("bad_input")
    raw = {}
    for fmt in ("ml20m", "amazon", "taobao"):
        raw[fmt] = str(root / f"raw_{fmt}")
        kw = dict(n_users=400, n_scenarios=12, per_scenario=8, per_source=12) if fmt == "ml20m" else {}
        write_raw(fmt, raw[fmt], seed=0, **kw)
    cache = str(root / "cache")
    data = ["--dataset", "ml20m", "--data-dir", raw["ml20m"], "--cache-dir", cache, "--min-items", "5",
            "--max-items", "1000", "--embed-dim", "32", "--mf-epochs", "5"]
    previous = str(root / "previous")
    assert cli.main(["run", *data, *TINY, "--out", previous]) == 0
    with open(os.path.join(previous, "results.json")) as fh:
        results = json.load(fh)
    return {"root": root, "raw": raw, "cache": cache, "data": data, "previous": previous, "results": results}


def _checksums(*folders):
    sums = {}
    for folder in folders:
        for path in glob.glob(os.path.join(folder, "**"), recursive=True) + glob.glob(os.path.join(folder, ".*")):
            if os.path.isfile(path):
                with open(path, "rb") as fh:
                    sums[path] = hashlib.sha256(fh.read()).hexdigest()
    return sums


def _copy_run(world, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(world["previous"], out)
    return out


def _copy_raw(world, tmp_path, fmt):
    folder = str(tmp_path / f"raw_{fmt}")
    shutil.copytree(world["raw"][fmt], folder)
    return folder


def _truncate(path, keep=0.5):
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(data[:int(len(data) * keep)])


def _replace_line(path, lineno, text):
    with open(path) as fh:
        lines = fh.readlines()
    lines[lineno - 1] = text + "\n"
    with open(path, "w") as fh:
        fh.writelines(lines)


def _data(world, **swap):
    args = list(world["data"])
    for flag, value in swap.items():
        args[args.index("--" + flag.replace("_", "-")) + 1] = value
    return args


# Each case: (id, build(world, tmp_path, out) -> argv, what the message must contain).
def _no_such_data_dir(w, tmp, out):
    return ["run", *_data(w, data_dir="/no/such/dir"), *TINY, "--out", out]


def _out_is_a_file(w, tmp, out):
    path = tmp / "results.txt"
    path.write_text("someone's file\n")
    return ["run", *w["data"], *TINY, "--out", str(path)]


def _header_only_ratings(w, tmp, out):
    folder = _copy_raw(w, tmp, "ml20m")
    with open(os.path.join(folder, "ratings.csv"), "w") as fh:
        fh.write("userId,movieId,rating,timestamp\n")
    return ["run", *_data(w, data_dir=folder), *TINY, "--out", out]


def _bad_rating_row(w, tmp, out):
    folder = _copy_raw(w, tmp, "ml20m")
    _replace_line(os.path.join(folder, "ratings.csv"), 5, "12,abc,4.0,1100000000")
    return ["train", *_data(w, data_dir=folder), *TINY, "--out", out]


def _filter_leaves_nothing(w, tmp, out):
    return ["run", *_data(w, min_items="900"), *TINY, "--out", out]


def _amazon_bad_meta(w, tmp, out):
    folder = _copy_raw(w, tmp, "amazon")
    path = os.path.join(folder, "meta_Beauty.json.gz")
    with gzip.open(path, "rt") as fh:
        lines = fh.readlines()
    lines[1] = "{'asin': 'B1', 'categories': [['Beauty'\n"
    with gzip.open(path, "wt") as fh:
        fh.writelines(lines)
    return ["run", "--dataset", "amazon", "--data-dir", folder, "--cache-dir", w["cache"], *TINY, "--out", out]


def _amazon_not_gzip(w, tmp, out):
    folder = _copy_raw(w, tmp, "amazon")
    with open(os.path.join(folder, "meta_Beauty.json.gz"), "wb") as fh:
        fh.write(b"\x1f\x8b\x08garbage")
    return ["prepare", "--dataset", "amazon", "--data-dir", folder, "--cache-dir", w["cache"], "--quiet"]


def _taobao_short_embedding(w, tmp, out):
    folder = _copy_raw(w, tmp, "taobao")
    _replace_line(os.path.join(folder, "user_embedding.csv"), 4, "999999,0.1 0.2")
    return ["run", "--dataset", "taobao", "--data-dir", folder, "--cache-dir", w["cache"], *TINY, "--out", out]


def _ml100k_bad_row(w, tmp, out):
    from s2meta_fast.data.movielens import recbole_ml100k_dir
    folder = str(tmp / "ml100k")
    shutil.copytree(recbole_ml100k_dir(), folder)
    _replace_line(os.path.join(folder, "ml-100k.inter"), 7, "196\t242\tthree\t881250949")
    return ["prepare", "--dataset", "ml100k", "--data-dir", folder, "--cache-dir", w["cache"], "--quiet"]


def _config_unknown_key(w, tmp, out):
    path = tmp / "c.yaml"
    path.write_text("metasteps: 3\n")
    return ["run", "--config", str(path), *w["data"], *TINY, "--out", out]


def _config_not_yaml(w, tmp, out):
    path = tmp / "c.yaml"
    path.write_text("meta_steps: [3\nseed: {\n")
    return ["run", "--config", str(path), *w["data"], *TINY, "--out", out]


def _bad_option_value(w, tmp, out):
    return ["run", *w["data"], *TINY, "--meta-batch", "0", "--out", out]


def _resume_nothing(w, tmp, out):
    return ["run", *w["data"], *TINY, "--resume", "--out", str(tmp / "empty")]


def _resume_changed_settings(w, tmp, out):
    return ["run", *w["data"], *TINY, "--meta-steps", "4", "--resume", "--out", out]


def _resume_all_checkpoints_damaged(w, tmp, out):
    for name in ("checkpoint.pt", "checkpoint.1.pt", "best.pt"):
        _truncate(os.path.join(out, name))
    return ["run", *w["data"], *TINY, "--resume", "--out", out]


def _evaluate_damaged_best(w, tmp, out):
    _truncate(os.path.join(out, "best.pt"), 0.9)
    return ["evaluate", "--out", out, "--quiet"]


def _evaluate_missing_checkpoint(w, tmp, out):
    return ["evaluate", "--out", out, "--checkpoint", str(tmp / "nope.pt"), "--quiet"]


def _evaluate_untrained_folder(w, tmp, out):
    return ["evaluate", *w["data"], "--out", str(tmp / "untrained"), "--quiet"]


def _evaluate_other_settings(w, tmp, out):
    return ["evaluate", "--out", out, "--t-max", "4", "--quiet"]


def _plot_damaged_checkpoint(w, tmp, out):
    _truncate(os.path.join(out, "checkpoint.pt"))
    return ["plot", "--checkpoint", os.path.join(out, "checkpoint.pt"), "--scenario", "x",
            "--out", str(tmp / "f.png"), "--quiet"]


CASES = [
    ("no such data dir", _no_such_data_dir, "/no/such/dir"),
    ("--out is a file", _out_is_a_file, "is a file, not a folder"),
    ("ratings: header, no rows", _header_only_ratings, "ratings.csv: no data rows after the header"),
    ("ratings: bad value", _bad_rating_row, "ratings.csv: line 5: column 'movieId'"),
    ("filter leaves no scenario", _filter_leaves_nothing, "no scenario passes the filter"),
    ("amazon: bad meta line", _amazon_bad_meta, "meta_Beauty.json.gz: line 2"),
    ("amazon: meta not gzip", _amazon_not_gzip, "meta_Beauty.json.gz: cannot read"),
    ("taobao: short embedding", _taobao_short_embedding, "user_embedding.csv: line 4: 2 values"),
    pytest.param("ml100k: bad rating", _ml100k_bad_row, "ml-100k.inter: line 7: column 'rating'",
                 marks=pytest.mark.skipif(importlib.util.find_spec("recbole") is None, reason="needs recbole")),
    ("config: unknown key", _config_unknown_key, "unknown key 'metasteps'"),
    ("config: not YAML", _config_not_yaml, "is not valid YAML"),
    ("option out of range", _bad_option_value, "meta_batch must be an int >= 1"),
    ("--resume: no run", _resume_nothing, "holds no run to resume"),
    ("--resume: other settings", _resume_changed_settings, "meta_steps (3 -> 4)"),
    ("--resume: every checkpoint damaged", _resume_all_checkpoints_damaged, "no intact checkpoint"),
    ("evaluate: damaged best.pt", _evaluate_damaged_best, "best.pt is damaged: checksum mismatch"),
    ("evaluate: no such --checkpoint", _evaluate_missing_checkpoint, "nope.pt: no such file"),
    ("evaluate: nothing trained", _evaluate_untrained_folder, "no trained meta learner"),
    ("evaluate: checkpoint of other settings", _evaluate_other_settings, "t_max (5 -> 4)"),
    ("plot: damaged checkpoint", _plot_damaged_checkpoint, "checkpoint.pt is damaged"),
]


def _case(case):
    if hasattr(case, "marks"):   # a pytest.param(name, build, expected, marks=...)
        return pytest.param(*case.values[1:], id=case.values[0], marks=case.marks)
    return pytest.param(*case[1:], id=case[0])


@pytest.mark.parametrize("build,expected", [_case(c) for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world, tmp_path, capsys, build, expected):
    out = _copy_run(world, tmp_path)
    argv = build(world, tmp_path, out)
    before = _checksums(str(tmp_path), world["raw"]["ml20m"], world["previous"])
    capsys.readouterr()
    code = cli.main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert code == cli.EXIT_USAGE, err
    assert len(errors) == 1 and expected in errors[0], err
    assert "Traceback" not in err
    after = _checksums(str(tmp_path), world["raw"]["ml20m"], world["previous"])
    assert {p: after.get(p) for p in before} == before


def test_a_run_into_a_locked_folder_is_refused(world, tmp_path, capsys):
    out = _copy_run(world, tmp_path)
    before = _checksums(out)
    with RunLock(out):
        assert cli.main(["run", *world["data"], *TINY, "--out", out]) == cli.EXIT_USAGE
        before[os.path.join(out, ".lock")] = _checksums(out)[os.path.join(out, ".lock")]
        assert _checksums(out) == before
    err = capsys.readouterr().err
    assert f"another run is using this folder (pid {os.getpid()} on host" in err


def test_the_cli_process_prints_no_traceback(world, tmp_path):
    """The issue's first case, end to end in a fresh process: the previous results survive."""
    out = _copy_run(world, tmp_path)
    before = _checksums(out)
    proc = subprocess.run([sys.executable, "-m", "s2meta_fast", "run", "--dataset", "ml20m", "--data-dir",
                           "/no/such/dir", "--out", out, "--quiet"], capture_output=True, text=True,
                          cwd=os.getcwd(), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "ml20m: data folder '/no/such/dir' does not exist" in proc.stderr
    assert _checksums(out) == before


def test_resume_passes_over_damaged_checkpoints_to_an_intact_best(world, tmp_path, capsys):
    out = _copy_run(world, tmp_path)
    for name in ("checkpoint.pt", "checkpoint.1.pt"):
        _truncate(os.path.join(out, name))
    assert cli.main(["run", *world["data"], *TINY, "--resume", "--out", out]) == 0
    err = capsys.readouterr().err
    assert "checkpoint.pt is damaged" in err and "checkpoint.1.pt is damaged" in err
    assert "resuming from" in err and "best.pt" in err
    with open(os.path.join(out, "results.json")) as fh:
        assert json.load(fh)["methods"] == world["results"]["methods"]
    assert sorted(n for n in os.listdir(out) if n.endswith(".pt")) == [
        "best.pt", "checkpoint.1.pt", "checkpoint.pt", "global.pt"]
    assert cli.main(["evaluate", "--out", out, "--quiet", "--methods", "s2meta"]) == 0   # all intact again


def test_a_damaged_cache_entry_heals_at_the_cli(world, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    shutil.copytree(world["cache"], cache)
    entries = glob.glob(os.path.join(cache, "prepared", "ml20m-*.npz"))
    assert entries
    for entry in entries:
        _truncate(entry)
    assert cli.main(["prepare", *_data(world, cache_dir=cache), "--seed", "3", "--quiet"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "is damaged" in line]
    assert len(warned) == 1 and "rebuilding" in warned[0]
    assert cli.main(["prepare", *_data(world, cache_dir=cache), "--seed", "3", "--quiet"]) == 0
    assert "is damaged" not in capsys.readouterr().err


def test_a_committed_run_names_its_own_folder(world):
    with open(os.path.join(world["previous"], "config.yaml")) as fh:
        assert f"out: {world['previous']}" in fh.read()
    assert world["results"]["config"]["run"]["out"] == world["previous"]
    assert sorted(os.listdir(world["previous"])) == [
        "adaptation.json", "best.pt", "checkpoint.1.pt", "checkpoint.pt", "config.yaml", "finetune.json", "global.pt",
        "methods", "results.json", "results.md", "validation_curve.png"]


def test_evaluate_replaces_results_only_when_complete(world, tmp_path, monkeypatch, capsys):
    out = _copy_run(world, tmp_path)
    before = _checksums(out)
    from s2meta_fast.app import stages
    real = stages.evaluate
    calls = []

    def killed_on_the_second_method(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(stages, "evaluate", killed_on_the_second_method)
    assert cli.main(["evaluate", "--out", out, "--quiet"]) == cli.EXIT_INTERRUPTED
    monkeypatch.undo()
    assert {p: h for p, h in _checksums(out).items() if "/.staging/" not in p} == before
    assert cli.main(["evaluate", "--out", out, "--quiet", "--methods", "itempop", "--ks", "5"]) == 0
    # evaluate's own flags do not rewrite the run's config; `out` names the folder the run is in now
    with open(os.path.join(world["previous"], "config.yaml")) as fh:
        original = yaml.safe_load(fh)
    with open(os.path.join(out, "config.yaml")) as fh:
        stored = yaml.safe_load(fh)
    assert stored["run"].pop("out") == out and original["run"].pop("out") == world["previous"]
    assert stored == original
    with open(os.path.join(out, "results.json")) as fh:
        assert list(json.load(fh)["methods"]) == ["itempop"]
    assert not os.path.exists(os.path.join(out, ".staging"))


def test_damaged_stage_outputs_are_recomputed_on_resume(world, tmp_path, capsys):
    out = _copy_run(world, tmp_path)
    _truncate(os.path.join(out, "global.pt"))
    _truncate(os.path.join(out, "finetune.json"))
    _truncate(os.path.join(out, "methods", "itempop.json"))
    for name in ("global", "finetune"):   # so that their stage outputs are read again
        os.unlink(os.path.join(out, "methods", f"{name}.json"))
    assert cli.main(["run", *world["data"], *TINY, "--resume", "--out", out]) == 0
    err = capsys.readouterr().err
    assert "global.pt is damaged" in err and "finetune.json is damaged" in err and "itempop.json is damaged" in err
    with open(os.path.join(out, "results.json")) as fh:
        assert json.load(fh)["methods"] == world["results"]["methods"]


def test_kill_9_mid_run_keeps_the_previous_results_and_resumes(world, tmp_path, capsys):
    out = _copy_run(world, tmp_path)
    before = _checksums(out)
    args = [*world["data"], *TINY, "--meta-steps", "20", "--validate-every", "10"]
    proc = subprocess.Popen([sys.executable, "-m", "s2meta_fast", "run", *args, "--out", out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=os.getcwd())
    staged = os.path.join(out, ".staging", "checkpoint.pt")
    deadline = time.monotonic() + 120
    while not os.path.exists(staged) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the run ended before it could be killed"
    assert {p: h for p, h in _checksums(out).items() if "/.staging/" not in p and not p.endswith(".lock")} == before
    with open(os.path.join(out, ".lock")) as fh:
        assert json.load(fh)["pid"] == proc.pid   # left behind by the killed run

    assert cli.main(["run", *args, "--resume", "--out", out]) == 0
    err = capsys.readouterr().err
    assert "taking over the stale lock" in err and f"pid {proc.pid}" in err
    from s2meta_fast.meta import checkpoint
    assert checkpoint.load(os.path.join(out, "checkpoint.pt"))["step"] == 20
    assert sorted(os.listdir(out)) == ["adaptation.json", "best.pt", "checkpoint.1.pt", "checkpoint.pt", "config.yaml",
                                       "finetune.json", "global.pt", "methods", "results.json", "results.md",
                                       "validation_curve.png"]
