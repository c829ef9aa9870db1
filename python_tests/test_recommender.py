"""Recommender: the model file, adapt / recommend / score, the unknown-id policy, export and recommend commands.

Everything runs on a tiny synthetic ML-20M-format run (3 meta-steps, d = 32): seconds, not minutes.
"""
import importlib.util
import json
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from s2meta_fast import Recommender, cli
from s2meta_fast.app import model_file
from s2meta_fast.app.recommender import UnknownIdError
from s2meta_fast.data.synthetic import write_raw
from s2meta_fast.errors import ModelFileError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, one_thread_module):
    root = tmp_path_factory.mktemp("rec")
    write_raw("ml20m", str(root / "raw"), seed=0, n_users=400, n_scenarios=12, per_scenario=8, per_source=12)
    out = str(root / "run")
    code = cli.main(["train", "--dataset", "ml20m", "--data-dir", str(root / "raw"), "--cache-dir",
                     str(root / "cache"), "--min-items", "5", "--max-items", "1000", "--embed-dim", "32",
                     "--mf-epochs", "5", "--meta-steps", "3", "--meta-batch", "1", "--t-max", "6", "--t-min", "2",
                     "--validate-every", "1", "--checkpoint-every", "1", "--quiet", "--seed", "3", "--out", out])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def model_path(run_dir, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("model") / "model.s2m")
    assert cli.main(["export", "--run", run_dir, "--out", path]) == 0
    return path


@pytest.fixture(scope="module")
def rec(run_dir):
    return Recommender.from_run(run_dir)


def scenario_pairs(rec, n=40, seed=0):
    rng = np.random.default_rng(seed)
    users = rng.choice(rec.user_ids, n)
    items = rng.choice(rec.item_ids[:60], n)
    return [(int(u), int(i)) for u, i in zip(users, items)]


# --------------------------------------------------------------------------------------------
# the model file


FRESH_PROCESS = """
import json, sys, torch
torch.set_num_threads(1)
from s2meta_fast import Recommender
path, (support, users, candidates) = sys.argv[1], [json.loads(a) for a in sys.argv[2:5]]
rec = Recommender.load(path)
scen = rec.adapt([tuple(p) for p in support], candidates, seed=11)
out = scen.recommend(users, k=10)
print(json.dumps({"items": out["item_id"].tolist(), "scores": out["score"].tolist(), "steps": scen.steps,
                  "theta": scen.theta.tolist()}))
"""


def test_round_trip_in_a_fresh_process_gives_the_same_top_k_and_scores(rec, model_path):
    support = scenario_pairs(rec)
    users, candidates = rec.user_ids[:7], rec.item_ids[100:130]
    scen = rec.adapt(support, candidates, seed=11)
    expected = scen.recommend(users, k=10)
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, model_path, json.dumps(support), json.dumps(users),
                           json.dumps(candidates)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["items"] == expected["item_id"].tolist() and len(got["items"]) == 70
    np.testing.assert_array_equal(np.array(got["theta"], dtype=np.float32), scen.theta.numpy())
    np.testing.assert_allclose(got["scores"], expected["score"].to_numpy(), rtol=0, atol=1e-6)
    assert got["steps"] == scen.steps


def test_adapt_matches_the_evaluation_of_the_run(rec, run_dir):
    """The Recommender adapts and scores a meta-test scenario exactly as `s2meta evaluate` does."""
    from s2meta_fast.app import run_folder, stages
    from s2meta_fast.eval.baselines import S2Meta

    checkpoint, cfg = run_folder.checkpoint_and_config(run_dir, {"device": "cpu", "resume": False})
    prepared = stages.prepare_data(cfg)
    learner = stages.load_learner(cfg, prepared, checkpoint)
    task = stages.eval_tasks(prepared, "test", cfg.run.seed)[0]
    theta = S2Meta(learner, stop="fixed").adapt([task], torch.Generator().manual_seed(21))
    users, items = np.asarray(prepared.user_ids), np.asarray(prepared.item_ids)
    support = list(zip(users[task.support_users].tolist(), items[task.support_items].tolist()))
    scen = rec.adapt(support, items[task.items].tolist(), stop="fixed", seed=21)
    assert scen.candidates == items[task.items].tolist()
    torch.testing.assert_close(scen.theta, theta[0], rtol=0, atol=0)
    expected = learner.scores(theta, torch.from_numpy(task.eval_users[None]), torch.from_numpy(task.items[None]))[0]
    got = scen.score(users[task.eval_users].tolist())["score"].to_numpy().reshape(expected.shape)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6, atol=1e-6)


def test_loaded_model_equals_the_run_it_was_exported_from(rec, model_path):
    loaded = Recommender.load(model_path)
    assert loaded.user_ids == rec.user_ids and loaded.item_ids == rec.item_ids
    assert (loaded.kind, loaded.embed_dim, loaded.support_size) == ("interaction", 32, 64)
    assert loaded.default_stop == rec.default_stop
    assert loaded.info["meta_step"] >= 0 and loaded.info["dataset"] == "ml20m"
    for (name, a), (_, b) in zip(sorted(rec.learner.state_dict().items()), sorted(loaded.learner.state_dict().items())):
        assert torch.equal(a, b), name
    assert torch.equal(rec.learner.user_emb, loaded.learner.user_emb)
    assert torch.equal(rec.item_popularity, loaded.item_popularity)


def test_loading_unpickles_nothing(model_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("unpickling while loading a model file")
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    assert Recommender.load(model_path).kind == "interaction"


def test_the_file_is_a_safetensors_file(model_path):
    safetensors = pytest.importorskip("safetensors.torch")
    tensors, document = model_file.read(model_path)
    other = safetensors.load_file(model_path)
    assert sorted(other) == sorted(tensors) and all(torch.equal(other[k], tensors[k]) for k in tensors)


def _rewrite_header(path, out, edit):
    raw = open(path, "rb").read()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    edit(header)
    encoded = json.dumps(header).encode()
    with open(out, "wb") as fh:
        fh.write(struct.pack("<Q", len(encoded)) + encoded + raw[8 + size:])


def test_damaged_files_are_refused_with_their_reason(model_path, tmp_path):
    raw = open(model_path, "rb").read()
    (size,) = struct.unpack("<Q", raw[:8])
    cases = {
        "tiny": (raw[:5], "truncated or not a model file"),
        "header_cut": (raw[:8 + size // 2], "is truncated: its header needs"),
        "data_cut": (raw[:-100], "is truncated: its tensors need"),
        "flipped": (raw[:-50] + bytes([raw[-50] ^ 0xFF]) + raw[-49:], "checksum mismatch"),
        "appended": (raw + b"\0" * 8, "checksum mismatch"),
        "csv": (b"user_id,item_id\n1,2\n" * 4, "not an s2meta_fast model file"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.s2m"
        path.write_bytes(content)
        with pytest.raises(ModelFileError, match=message):
            Recommender.load(str(path))
    with pytest.raises(ModelFileError, match="no model file"):
        Recommender.load(str(tmp_path / "absent.s2m"))


def test_newer_version_wrong_checksum_and_foreign_files_are_refused(model_path, tmp_path):
    newer = tmp_path / "newer.s2m"
    _rewrite_header(model_path, newer, lambda h: h["__metadata__"].update(format_version="2"))
    with pytest.raises(ModelFileError, match="format version 2, written by a newer s2meta_fast.*upgrade"):
        Recommender.load(str(newer))
    wrong = tmp_path / "wrong.s2m"
    _rewrite_header(model_path, wrong, lambda h: h["__metadata__"].update(sha256="0" * 64))
    with pytest.raises(ModelFileError, match="checksum mismatch"):
        Recommender.load(str(wrong))
    edited = tmp_path / "edited.s2m"   # a changed document with the old checksum
    _rewrite_header(model_path, edited, lambda h: h["__metadata__"].update(
        document=h["__metadata__"]["document"].replace('"embed_dim":32', '"embed_dim":64')))
    with pytest.raises(ModelFileError, match="checksum mismatch"):
        Recommender.load(str(edited))
    foreign = tmp_path / "foreign.s2m"
    _rewrite_header(model_path, foreign, lambda h: h["__metadata__"].update(format="something-else"))
    with pytest.raises(ModelFileError, match="not an s2meta_fast model file"):
        Recommender.load(str(foreign))


def test_save_is_atomic_and_round_trips(rec, tmp_path):
    path = tmp_path / "again.s2m"
    rec.save(path)
    rec.save(path)   # overwriting leaves one whole file, no temp files
    assert os.listdir(tmp_path) == ["again.s2m"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask   # not mkstemp's private 0600
    again = Recommender.load(path)
    support = scenario_pairs(rec, seed=4)
    a = rec.adapt(support, seed=2).recommend(rec.user_ids[:3], k=5)
    b = again.adapt(support, seed=2).recommend(rec.user_ids[:3], k=5)
    pd.testing.assert_frame_equal(a, b)


@cuda
def test_cpu_model_loads_on_cuda_and_back(rec, model_path, tmp_path):
    on_gpu = Recommender.load(model_path, device="cuda")
    assert on_gpu.device.type == "cuda"
    support = scenario_pairs(rec, seed=5)
    users = rec.user_ids[:5] + ["nobody"]
    scen = on_gpu.adapt(support, seed=3)
    out = scen.recommend(users, k=8)
    assert len(out) == 6 * min(8, len(scen.candidates)) and np.isfinite(out["score"]).all()
    # the same θ scores the same on both devices
    cpu_scen = rec.adapt(support, seed=3)
    cpu_scen.theta = scen.theta.cpu()
    np.testing.assert_allclose(scen.score(users)["score"], cpu_scen.score(users)["score"], rtol=1e-4, atol=1e-5)
    back = tmp_path / "from_gpu.s2m"
    on_gpu.save(back)
    tensors, _ = model_file.read(back)
    original, _ = model_file.read(model_path)
    assert all(torch.equal(tensors[k], original[k]) for k in original)


def test_cuda_without_a_gpu_is_a_clear_error(model_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device is available"):
        Recommender.load(model_path, device="cuda")


# --------------------------------------------------------------------------------------------
# adapt, recommend, score


def test_recommend_returns_top_k_per_user_in_order(rec):
    scen = rec.adapt(scenario_pairs(rec), rec.item_ids[100:150], seed=0)
    assert scen.steps == sum(scen.record["updated"]) and len(scen.record["support_loss"]) == 6
    assert all(0.0 <= p <= 1.0 for p in scen.record["stop_prob"])
    users = rec.user_ids[10:14]
    out = scen.recommend(users, k=20)
    assert list(out.columns) == ["user_id", "item_id", "score", "rank", "fallback"]
    assert out["user_id"].tolist() == [u for u in users for _ in range(20)]
    assert not out["fallback"].any()
    for user, group in out.groupby("user_id", sort=False):
        assert group["rank"].tolist() == list(range(1, 21))
        assert group["score"].is_monotonic_decreasing and group["item_id"].is_unique
        full = scen.score([user])
        best = full.sort_values("score", ascending=False, kind="stable").head(20)
        np.testing.assert_allclose(sorted(best["score"]), sorted(group["score"]), rtol=1e-6)
    assert set(out["item_id"]) <= set(scen.candidates)


def test_candidates_default_to_the_support_items_and_k_caps_at_them(rec):
    support = scenario_pairs(rec, n=30)
    scen = rec.adapt(support, seed=0)
    assert sorted(scen.candidates) == sorted({i for _, i in support})
    out = scen.recommend(rec.user_ids[:2], k=1000)
    assert len(out) == 2 * len(scen.candidates)


def test_same_seed_same_result_and_seeds_matter(rec):
    support = scenario_pairs(rec)
    a, b = rec.adapt(support, seed=5, stop="fixed"), rec.adapt(support, seed=5, stop="fixed")
    assert torch.equal(a.theta, b.theta) and a.steps == rec.learner.config.steps
    assert not torch.equal(a.theta, rec.adapt(support, seed=6, stop="fixed").theta)
    assert all(np.isnan(p) for p in a.record["stop_prob"])


def test_ids_given_as_strings_resolve_and_come_back_as_the_models(rec):
    support = scenario_pairs(rec)
    as_text = pd.DataFrame({"user_id": [str(u) for u, _ in support], "item_id": [f" {i}" for _, i in support]})
    a = rec.adapt(support, seed=1).recommend(rec.user_ids[:3], k=5)
    b = rec.adapt(as_text, seed=1).recommend([str(u) for u in rec.user_ids[:3]], k=5)
    pd.testing.assert_frame_equal(a, b)


def test_exclude_support_items_lists_and_pairs(rec):
    support = scenario_pairs(rec, n=60)
    scen = rec.adapt(support, seed=0)
    user = support[0][0]
    own = {i for u, i in support if u == user}
    everything = scen.recommend([user], k=1000)
    assert own <= set(everything["item_id"])
    assert not own & set(scen.recommend([user], k=1000, exclude="support")["item_id"])
    banned = everything["item_id"].tolist()[:3]
    for exclude in (banned, [(user, i) for i in banned], pd.DataFrame({"user_id": [user] * 3, "item_id": banned})):
        out = scen.recommend([user], k=1000, exclude=exclude)
        assert not set(banned) & set(out["item_id"]) and len(out) == len(everything) - 3
        assert out["rank"].tolist() == list(range(1, len(out) + 1))


def test_adapt_many_adapts_each_scenario(rec):
    supports = [scenario_pairs(rec, n=40, seed=s) for s in range(3)] + [scenario_pairs(rec, n=10, seed=9)]
    many = rec.adapt_many(supports, seed=4, stop="fixed")
    assert [s.n_support for s in many] == [40, 40, 40, 10]
    assert all(s.steps == rec.learner.config.steps for s in many)
    for support, scen in zip(supports, many):
        assert sorted(scen.candidates) == sorted({i for _, i in support})
    # one scenario through adapt_many is the same call as adapt
    one = rec.adapt_many([supports[0]], seed=4)[0]
    assert torch.equal(one.theta, rec.adapt(supports[0], seed=4).theta)
    # blocks run one after the other on the call's generator: the first block is the same call alone
    blocked = rec.adapt_many(supports, seed=4, stop="fixed", block_size=2)
    assert all(torch.equal(a.theta, b.theta) for a, b in zip(blocked[:2], rec.adapt_many(supports[:2], seed=4,
                                                                                         stop="fixed")))
    assert [s.n_support for s in blocked] == [40, 40, 40, 10]
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        rec.adapt_many(supports, block_size=0)
    with pytest.raises(ValueError, match="candidates: 1 entries for 4 scenarios"):
        rec.adapt_many(supports, candidates=[None])


def test_bad_arguments_name_themselves(rec):
    support = scenario_pairs(rec)
    with pytest.raises(ValueError, match="stop must be one of"):
        rec.adapt(support, stop="never")
    with pytest.raises(ValueError, match="on_unknown must be one of"):
        rec.adapt(support, on_unknown="ignore")
    with pytest.raises(ValueError, match="seed must be"):
        rec.adapt(support, seed=-1)
    with pytest.raises(ValueError, match="support: expected columns user_id and item_id"):
        rec.adapt(pd.DataFrame({"user": [1], "item": [2]}))
    with pytest.raises(ValueError, match=r"support\[1\]: expected a \(user_id, item_id\) pair"):
        rec.adapt([support[0], (1, 2, 3)])
    scen = rec.adapt(support, seed=0)
    with pytest.raises(ValueError, match="k must be a positive int"):
        scen.recommend(rec.user_ids[:2], k=0)
    with pytest.raises(ValueError, match="users: no user"):
        scen.recommend([])
    with pytest.raises(ValueError, match="exclude: a string must be 'support'"):
        scen.recommend(rec.user_ids[:2], exclude="seen")
    with pytest.raises(ValueError, match="exclude: expected None"):
        scen.recommend(rec.user_ids[:2], exclude=5)


# --------------------------------------------------------------------------------------------
# the unknown-id policy, case by case


def test_support_pairs_with_unknown_ids_are_dropped_and_counted(rec):
    support = scenario_pairs(rec, n=20)
    noisy = support + [("ghost", support[0][1]), (support[0][0], "no-such-item"), ("ghost", "no-such-item")]
    scen = rec.adapt(noisy, seed=0)
    assert (scen.n_support, scen.n_dropped, scen.dropped_unknown_user, scen.dropped_unknown_item) == (20, 3, 2, 1)
    assert ("ghost", "no-such-item") in scen.dropped_pairs
    assert torch.equal(scen.theta, rec.adapt(support, seed=0).theta)   # the same as never given
    assert any("3 support pair(s) dropped" in n for n in scen.notes)


def test_no_usable_support_pair_is_an_error(rec):
    with pytest.raises(ValueError, match="none of the 2 support pairs can be used: 1 name an unknown user, "
                                         "1 an unknown item"):
        rec.adapt([("ghost", rec.item_ids[0]), (rec.user_ids[0], "nothing")])
    with pytest.raises(ValueError, match="support: no support pair"):
        rec.adapt([])
    with pytest.raises(ValueError, match="single item"):
        rec.adapt([(rec.user_ids[0], rec.item_ids[0]), (rec.user_ids[1], rec.item_ids[0])])


def test_fewer_support_pairs_than_trained_work_and_are_reported(rec):
    scen = rec.adapt(scenario_pairs(rec, n=5), seed=0)
    assert scen.n_support == 5 and scen.trained_support == 64
    assert any("fewer than the 64" in n for n in scen.notes)
    assert len(scen.recommend(rec.user_ids[:2], k=3)) == 6


def test_unknown_candidate_is_an_error_naming_it_unless_dropped(rec):
    support = scenario_pairs(rec)
    candidates = rec.item_ids[100:110] + ["mystery", 987654321]
    with pytest.raises(UnknownIdError, match=r"candidates: 2 unknown item id\(s\): 'mystery', 987654321") as info:
        rec.adapt(support, candidates)
    assert info.value.positions == [10, 11]
    scen = rec.adapt(support, candidates, on_unknown="drop", seed=0)
    assert scen.candidates_dropped == ["mystery", 987654321]
    assert set(rec.item_ids[100:110]) <= set(scen.candidates) and "mystery" not in scen.candidates


def test_user_without_embedding_gets_itempop_flagged(rec):
    support = scenario_pairs(rec, n=60, seed=3)
    scen = rec.adapt(support, seed=0)
    out = scen.recommend([rec.user_ids[0], "stranger", -5], k=10)
    assert not out.loc[out["user_id"] == rec.user_ids[0], "fallback"].any()
    stranger = out[out["user_id"] == "stranger"]
    assert stranger["fallback"].all() and len(stranger) == 10
    assert out.loc[out["user_id"] == -5, "item_id"].tolist() == stranger["item_id"].tolist()
    counts = pd.Series([i for _, i in support]).value_counts()
    support_count = stranger["item_id"].map(counts).fillna(0).to_numpy()
    assert (np.diff(support_count) <= 0).all()                    # ranked by support count first
    assert (np.floor(stranger["score"].to_numpy()) == support_count).all()   # global popularity only breaks ties
    assert stranger["item_id"].iloc[0] == counts.index[0] or counts.iloc[0] == support_count[0]


def test_score_policy(rec):
    scen = rec.adapt(scenario_pairs(rec), seed=0)
    items = rec.item_ids[200:203]
    out = scen.score([rec.user_ids[0], "stranger"], items)
    assert out.shape == (6, 4) and out["fallback"].tolist() == [False] * 3 + [True] * 3
    with pytest.raises(UnknownIdError, match="items: 1 unknown item id"):
        scen.score([rec.user_ids[0]], items + ["mystery"])
    dropped = scen.score([rec.user_ids[0]], items + ["mystery"], on_unknown="drop")
    assert dropped["item_id"].tolist() == items
    full = scen.score(rec.user_ids[:2])
    assert len(full) == 2 * len(scen.candidates)


# --------------------------------------------------------------------------------------------
# the commands


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_recommend_command_end_to_end(rec, model_path, tmp_path, capsys):
    support = scenario_pairs(rec, n=30)
    sup = _write(tmp_path / "support.csv", "user_id,item_id\n" + "".join(f"{u},{i}\n" for u, i in support)
                 + "\nghost,1\n")
    users = _write(tmp_path / "users.csv", "user_id\n" + "".join(f"{u}\n" for u in rec.user_ids[:4]) + "stranger\n")
    items = _write(tmp_path / "items.csv", "item\n" + "".join(f"{i}\n" for i in rec.item_ids[100:120]))
    out = str(tmp_path / "recs.csv")
    argv = ["recommend", "--model", model_path, "--support", sup, "--users", users, "--candidates", items,
            "--k", "5", "--seed", "7"]
    assert cli.main(argv + ["--out", out]) == 0
    summary = capsys.readouterr().out
    assert "30 support pairs used, 1 dropped (1 unknown user, 0 unknown item)" in summary
    assert "5 users (1 without embedding: ItemPop), 25 rows" in summary and "inner steps" in summary
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["user_id", "item_id", "score", "rank", "fallback"] and len(frame) == 25
    expected = rec.adapt(support, rec.item_ids[100:120], seed=7).recommend(rec.user_ids[:4], k=5)
    assert frame["item_id"].tolist()[:20] == expected["item_id"].tolist()

    assert cli.main(argv + ["--out", "-"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert len(rows) == 25 and rows[0]["rank"] == 1 and "support pairs used" in captured.err

    jsonl = str(tmp_path / "recs.jsonl")
    assert cli.main(argv + ["--out", jsonl]) == 0
    assert len(open(jsonl).read().splitlines()) == 25


def test_recommend_command_errors_name_the_file_and_line(rec, model_path, tmp_path, capsys):
    sup = _write(tmp_path / "support.csv", "user_id,item_id\n" + "".join(f"{u},{i}\n" for u, i in scenario_pairs(rec)))
    users = _write(tmp_path / "users.csv", "user_id\n1\n")
    items = _write(tmp_path / "items.csv", f"item_id\n{rec.item_ids[0]}\n\nmystery\n")
    out = str(tmp_path / "recs.csv")
    base = ["recommend", "--model", model_path, "--users", users, "--out", out]
    assert cli.main(base + ["--support", sup, "--candidates", items]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"{items}: 1 unknown item id(s): 'mystery'" in err and "line(s) 4; pass --on-unknown drop" in err
    assert not os.path.exists(out)
    assert cli.main(base + ["--support", sup, "--candidates", items, "--on-unknown", "drop"]) == 0
    assert "1 unknown candidates dropped" in capsys.readouterr().out

    assert cli.main(base + ["--support", users]) == cli.EXIT_USAGE
    assert "expected column(s) user_id, item_id in the header row, got user_id" in capsys.readouterr().err
    assert cli.main(base + ["--support", str(tmp_path / "absent.csv")]) == cli.EXIT_USAGE
    assert "absent.csv' does not exist" in capsys.readouterr().err
    assert cli.main(["recommend", "--model", sup, "--support", sup, "--users", users, "--out", out]) == cli.EXIT_USAGE
    assert "not an s2meta_fast model file" in capsys.readouterr().err
    assert cli.main(base[:-1] + [str(tmp_path / "recs.txt"), "--support", sup]) == cli.EXIT_USAGE
    assert "unknown extension .txt" in capsys.readouterr().err
    assert cli.main(base + ["--support", sup, "--k", "0"]) == cli.EXIT_USAGE


def test_recommend_command_writes_parquet_or_says_what_it_needs(rec, model_path, tmp_path, capsys):
    sup = _write(tmp_path / "support.csv", "user_id,item_id\n" + "".join(f"{u},{i}\n" for u, i in scenario_pairs(rec)))
    users = _write(tmp_path / "users.csv", f"user_id\n{rec.user_ids[0]}\n")
    out = str(tmp_path / "recs.parquet")
    code = cli.main(["recommend", "--model", model_path, "--support", sup, "--users", users, "--k", "3", "--out", out])
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        assert code == cli.EXIT_USAGE and "needs pyarrow or fastparquet" in capsys.readouterr().err
        assert not os.listdir(tmp_path) == [] and not os.path.exists(out)
        return
    assert code == 0 and len(pd.read_parquet(out)) == 3


def test_export_command_errors(tmp_path, capsys):
    assert cli.main(["export", "--run", str(tmp_path), "--out", str(tmp_path / "m.s2m")]) == cli.EXIT_USAGE
    assert "no trained meta learner in" in capsys.readouterr().err
    os.makedirs(tmp_path / "run")
    open(tmp_path / "run" / "best.pt", "wb").close()
    assert cli.main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "m.s2m")]) == cli.EXIT_USAGE
    assert "config.yaml' is missing" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "m.s2m")


@pytest.mark.skipif(importlib.util.find_spec("recbole") is None, reason="recbole (MovieLens-100K) is not installed")
def test_export_and_recommend_on_movielens_100k(tmp_path, capsys):
    """The real data's raw ids through train -> export -> recommend (1 meta-step, 2 MF epochs: seconds)."""
    run = str(tmp_path / "run")
    assert cli.main(["train", "--dataset", "ml100k", "--mf-epochs", "2", "--cache-dir", str(tmp_path / "cache"),
                     "--meta-steps", "1", "--meta-batch", "1", "--t-max", "5", "--validate-every", "1",
                     "--checkpoint-every", "1", "--quiet", "--out", run]) == 0
    model = str(tmp_path / "ml100k.s2m")
    assert cli.main(["export", "--run", run, "--out", model]) == 0
    assert "wrote" in capsys.readouterr().out
    rec = Recommender.load(model)
    assert rec.kind == "interaction" and rec.embed_dim == 64 and len(rec.item_ids) > 1000
    support = scenario_pairs(rec, n=64, seed=1)
    sup = _write(tmp_path / "support.csv", "user_id,item_id\n" + "".join(f"{u},{i}\n" for u, i in support))
    users = _write(tmp_path / "users.csv", "user_id\n" + "".join(f"{u}\n" for u in rec.user_ids[:10]))
    items = _write(tmp_path / "items.csv", "item_id\n" + "".join(f"{i}\n" for i in rec.item_ids[:1000]))
    out = str(tmp_path / "recs.csv")
    assert cli.main(["recommend", "--model", model, "--support", sup, "--users", users, "--candidates", items,
                     "--k", "20", "--out", out]) == 0
    assert "64 support pairs used, 0 dropped" in capsys.readouterr().out
    frame = pd.read_csv(out)
    assert len(frame) == 200 and not frame["fallback"].any()
    expected = rec.adapt(support, rec.item_ids[:1000], seed=0).recommend(rec.user_ids[:10], k=20)   # --seed 0
    assert frame["item_id"].tolist() == expected["item_id"].tolist()
    assert frame["user_id"].tolist() == expected["user_id"].tolist()
