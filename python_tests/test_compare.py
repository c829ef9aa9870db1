"""`s2meta compare`: the study over seeds, its statistics, resumption and refusals."""
import json
import os

import numpy as np
import pytest
import torch

from s2meta_fast import cli
from s2meta_fast.app import commands
from s2meta_fast.app.compare import Study, paired_bootstrap, parse_names, parse_seeds
from s2meta_fast.data.synthetic import write_raw
from s2meta_fast.errors import ConfigError


def _per_scenario(values, counts):
    return {f"s{i}": {"count": c, "sums": {"recall@20": v}} for i, (v, c) in enumerate(zip(values, counts))}


def test_paired_bootstrap_zero_for_equal_methods_and_excludes_zero_for_a_shift():
    rng = np.random.default_rng(0)
    counts = rng.integers(5, 50, size=12)
    base = [c * rng.uniform(0.3, 0.8) for c in counts]
    same = paired_bootstrap([_per_scenario(base, counts)], [_per_scenario(base, counts)], "recall@20", n=200)
    assert same["diff"] == 0 and same["ci95"] == [0.0, 0.0] and not same["excludes_zero"]
    better = [b + 0.1 * c for b, c in zip(base, counts)]     # +0.1 recall on every scenario
    shift = paired_bootstrap([_per_scenario(better, counts)] * 2, [_per_scenario(base, counts)] * 2, "recall@20",
                             n=200)
    assert shift["diff"] == pytest.approx(0.1) and shift["excludes_zero"]
    assert shift["ci95"][0] <= 0.1 + 1e-12 <= shift["ci95"][1] + 2e-12


def test_study_names_the_flag_of_a_bad_value():
    assert parse_names("all", ("a", "b")) == ("a", "b")
    assert parse_names("b, a", ("a", "b")) == ("b", "a") and parse_names(None, ("a",)) == ()
    with pytest.raises(ConfigError, match="--methods: unknown method 'nope'"):
        Study(methods=("s2meta", "nope"))
    with pytest.raises(ConfigError, match="--ablations: unknown ablation 'noinit'"):
        Study(methods=("s2meta",), ablations=("noinit",))
    with pytest.raises(ConfigError, match="--seeds: no seed"):
        Study(methods=("s2meta",), seeds=parse_seeds(" "))
    with pytest.raises(ConfigError, match="--seeds"):
        parse_seeds("0,x")
    with pytest.raises(ConfigError, match="--methods: .*include s2meta"):
        Study(methods=("itempop",), ablations=("fixedstep",))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cmp")
    write_raw("ml20m", str(root / "raw"), seed=0, n_users=400, n_scenarios=12, per_scenario=8, per_source=12)
    args = ["--dataset", "ml20m", "--data-dir", str(root / "raw"), "--cache-dir", str(root / "cache"),
            "--min-items", "5", "--max-items", "1000", "--embed-dim", "32", "--mf-epochs", "5",
            "--meta-steps", "2", "--meta-batch", "1", "--t-max", "3", "--t-min", "2", "--validate-every", "1",
            "--checkpoint-every", "1", "--global-steps", "20", "--global-batch", "64", "--quiet"]
    out = str(root / "study")
    code = cli.main(["compare", *args, "--methods", "s2meta,itempop,global", "--ablations", "fixedstep,randinit",
                     "--seeds", "3", "--out", out])
    yield code, args, out
    torch.set_num_threads(before)


def test_compare_writes_tables_statistics_and_chart(tiny, capsys):
    code, _, out = tiny
    assert code == 0
    doc = json.load(open(os.path.join(out, "compare.json")))
    assert list(doc["methods"]) == ["s2meta", "itempop", "global"]
    # RandInit under the demo preset's warm start: the ablation turns it off (no ω_R to warm-start)
    assert list(doc["ablations"]) == ["complete", "fixedstep", "randinit"]
    assert set(doc["paired_vs_s2meta"]) == {"methods/itempop", "methods/global", "ablations/fixedstep",
                                            "ablations/randinit"}
    assert doc["headroom"]["3"]["oracle"] >= 0 and "upper bound" in doc["headroom"]["3"]["label"]
    row = doc["methods"]["itempop"]
    assert row["mean"] == row["per_seed"]["3"] and row["std"]["recall@20"] == 0
    md = open(os.path.join(out, "compare.md")).read()
    assert "Table 3" in md and "Table 4" in md and "| FixedStep |" in md and "Headroom" in md
    with open(os.path.join(out, "recall20.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_finished_study_is_not_rerun_and_other_settings_are_refused(tiny, monkeypatch, capsys):
    code, args, out = tiny
    assert code == 0
    before = open(os.path.join(out, "compare.json")).read()

    def no_run(cfg):
        raise AssertionError("a finished (unit, seed) was run again")

    monkeypatch.setattr(commands, "run", no_run)
    assert cli.main(["compare", *args, "--methods", "s2meta,itempop,global", "--ablations", "fixedstep,randinit",
                     "--seeds", "3", "--out", out]) == 0
    assert open(os.path.join(out, "compare.json")).read() == before
    capsys.readouterr()
    for extra, flag in ((["--global-steps", "21"], "--global-steps"), (["--methods", "s2meta,bogus"], "--methods"),
                        (["--seeds", ""], "--seeds")):
        argv = ["compare", *args, "--seeds", "3", "--out", out] + extra
        assert cli.main(argv) == cli.EXIT_USAGE
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("s2meta compare: error: " + flag), err
    assert open(os.path.join(out, "compare.json")).read() == before


def test_run_selects_a_cross_domain_baseline_on_validation_and_records_the_choice(tiny, tmp_path):
    _, args, _ = tiny
    out = str(tmp_path / "run")
    assert cli.main(["run", *args, "--seed", "3", "--methods", "itempop", "cmf", "--baseline-grid", "reduced",
                     "--out", out]) == 0
    doc = json.load(open(os.path.join(out, "results.json")))
    assert list(doc["methods"]) == ["itempop", "cmf"]
    choice = json.load(open(os.path.join(out, "baselines", "cmf.json")))
    assert doc["hyperparameters"]["cmf"] == choice["hp"]
    assert len(choice["table"]) == 6 and choice["score"] == max(choice["table"].values())


def test_reduced_grids_only_hold_values_of_the_papers():
    from s2meta_fast.eval.cross_domain import CROSS_DOMAIN, reduced_grid
    for name, cls in CROSS_DOMAIN.items():
        reduced = reduced_grid(name)
        assert set(reduced) == set(cls.GRID), name
        assert all(set(reduced[k]) <= set(cls.GRID[k]) for k in reduced), name
