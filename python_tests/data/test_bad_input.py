"""Bad input: missing files name the file and its columns, malformed rows name file and line."""
import gzip
import logging
import os
import shutil

import pytest

from s2meta_fast.data import DataFileError, DataFormatError, EmptyDataError, prepare
from s2meta_fast.data.amazon import load_amazon
from s2meta_fast.data.movielens import load_ml20m, load_ml100k
from s2meta_fast.data.taobao import load_taobao

# Mirrors conftest.SMALL (test dirs are not packages, so no import from it).
SMALL = dict(min_items=10, max_items=500, mf_epochs=3, progress=False)


def _copy(src, tmp_path, name="d"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _edit_line(path, lineno, new):
    with open(path) as fh:
        lines = fh.readlines()
    lines[lineno - 1] = new + "\n"
    with open(path, "w") as fh:
        fh.writelines(lines)


def test_missing_folder(tmp_path):
    with pytest.raises(DataFileError) as exc:
        prepare("ml20m", tmp_path / "nowhere", cache_dir=str(tmp_path))
    msg = str(exc.value)
    assert "nowhere" in msg and "ratings.csv" in msg and "userId" in msg and "relevance" in msg
    with pytest.raises(DataFileError, match="ml20m needs data_dir"):
        prepare("ml20m", None, cache_dir=str(tmp_path))


@pytest.mark.parametrize("fmt,fname,column,loader", [
    ("ml20m", "genome-scores.csv", "relevance", load_ml20m),
    ("ml20m", "movies.csv", "genres", load_ml20m),
    ("taobao", "item_embedding.csv", "item_id", load_taobao),
    ("taobao", "theme_click_log.csv", "theme_id", load_taobao),
])
def test_missing_file_names_file_and_columns(synthetic_dirs, tmp_path, fmt, fname, column, loader):
    d = _copy(synthetic_dirs[fmt][0], tmp_path)
    os.remove(d / fname)
    with pytest.raises(DataFileError) as exc:
        loader(str(d))
    assert fname in str(exc.value) and column in str(exc.value)
    assert isinstance(exc.value, FileNotFoundError)


def test_amazon_missing_meta(synthetic_dirs, tmp_path):
    d = _copy(synthetic_dirs["amazon"][0], tmp_path)
    os.remove(d / "meta_Beauty.json.gz")
    with pytest.raises(DataFileError, match="meta_Beauty.json.gz.*asin, categories"):
        load_amazon(str(d))


def test_ml100k_missing_file(tmp_path):
    with pytest.raises(DataFileError, match="ml-100k.inter.*user_id, item_id"):
        load_ml100k(str(tmp_path))


def test_malformed_value_gives_line(synthetic_dirs, tmp_path):
    d = _copy(synthetic_dirs["ml20m"][0], tmp_path)
    _edit_line(d / "ratings.csv", 5, "12,abc,4.0,1100000000")
    with pytest.raises(DataFormatError) as exc:
        load_ml20m(str(d))
    assert "ratings.csv" in str(exc.value) and "line 5" in str(exc.value) and "movieId" in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_empty_and_nan_values_give_line(synthetic_dirs, tmp_path):
    d = _copy(synthetic_dirs["ml20m"][0], tmp_path)
    _edit_line(d / "genome-scores.csv", 7, "1,2,nan")
    with pytest.raises(DataFormatError, match=r"genome-scores.csv: line 7"):
        load_ml20m(str(d))
    d2 = _copy(synthetic_dirs["ml20m"][0], tmp_path, "d2")
    _edit_line(d2 / "ratings.csv", 3, "12,,4.0,1100000000")
    with pytest.raises(DataFormatError, match=r"ratings.csv: line 3"):
        load_ml20m(str(d2))


def test_wrong_field_count_gives_line(synthetic_dirs, tmp_path):
    d = _copy(synthetic_dirs["ml20m"][0], tmp_path)
    _edit_line(d / "ratings.csv", 4, "1,2,3.0,4,5,6")
    with pytest.raises(DataFormatError) as exc:
        load_ml20m(str(d))
    assert "ratings.csv" in str(exc.value) and "line 4" in str(exc.value)


def test_missing_header_column(synthetic_dirs, tmp_path):
    d = _copy(synthetic_dirs["ml20m"][0], tmp_path)
    _edit_line(d / "movies.csv", 1, "movieId,name,genres")
    with pytest.raises(DataFormatError, match="movies.csv: line 1.*title"):
        load_ml20m(str(d))


def test_amazon_bad_rating_and_meta_lines(synthetic_dirs, tmp_path):
    d = _copy(synthetic_dirs["amazon"][0], tmp_path)
    _edit_line(d / "ratings_Beauty.csv", 2, "AUSER,B0001,five,1300000000")
    with pytest.raises(DataFormatError, match=r"ratings_Beauty.csv: line 2.*rating"):
        load_amazon(str(d))
    d2 = _copy(synthetic_dirs["amazon"][0], tmp_path, "d2")
    path = d2 / "meta_Pet_Supplies.json.gz"
    with gzip.open(path, "rt") as fh:
        lines = fh.readlines()
    lines[2] = "{'asin': 'B1', 'categories': [['Pet Supplies', 'Dogs']\n"
    with gzip.open(path, "wt") as fh:
        fh.writelines(lines)
    with pytest.raises(DataFormatError, match=r"meta_Pet_Supplies.json.gz: line 3"):
        load_amazon(str(d2))


def test_taobao_bad_embedding_row(synthetic_dirs, tmp_path):
    d = _copy(synthetic_dirs["taobao"][0], tmp_path)
    _edit_line(d / "user_embedding.csv", 4, "999999,0.1 0.2")
    with pytest.raises(DataFormatError, match=r"user_embedding.csv: line 4: 2 values"):
        load_taobao(str(d))
    d2 = _copy(synthetic_dirs["taobao"][0], tmp_path, "d2")
    with open(d2 / "item_embedding.csv") as fh:
        lines = fh.readlines()
    vals = lines[5].split(",")[1].split()
    vals[3] = "x1"
    lines[5] = lines[5].split(",")[0] + "," + " ".join(vals) + "\n"
    with open(d2 / "item_embedding.csv", "w") as fh:
        fh.writelines(lines)
    with pytest.raises(DataFormatError, match=r"item_embedding.csv: line 6"):
        load_taobao(str(d2))


def test_small_scenarios_skipped_and_counted(synthetic_dirs, tmp_path, caplog):
    folder, m = synthetic_dirs["ml20m"]
    with caplog.at_level(logging.INFO, logger="s2meta_fast.data"):
        d = prepare("ml20m", folder, cache_dir=str(tmp_path), **{**SMALL, "min_items": 30, "heldout_user_frac": 0})
    n_skip = d.stats["scenarios_skipped"]["too_few_items"]
    assert n_skip > 0 and sum(d.stats["scenarios_skipped"].values()) == n_skip
    assert d.stats["n_scenarios_skipped"] + len(d.scenarios()) == m["n_tags"]
    assert all(s.n_items >= 30 for s in d.scenarios())
    assert f"{n_skip} skipped (too_few_items={n_skip}," in caplog.text


@pytest.mark.parametrize("settings,counts", [
    ({"min_items": 420}, "12 have fewer than min_items=420 items"),
    ({"min_eval": 100_000}, "12 fewer than 100064 interactions"),
])
def test_a_filter_that_leaves_no_scenario_is_named(synthetic_dirs, tmp_path, settings, counts):
    folder, m = synthetic_dirs["ml20m"]
    with pytest.raises(EmptyDataError) as exc:
        prepare("ml20m", folder, cache_dir=str(tmp_path), **{**SMALL, "max_items": 1000, **settings})
    msg = str(exc.value)
    assert "no scenario passes the filter" in msg and f"of {m['n_tags']} candidate scenarios" in msg
    assert counts in msg and folder in msg


def test_header_only_ratings_name_the_file(synthetic_dirs, tmp_path):
    d = _copy(synthetic_dirs["ml20m"][0], tmp_path)
    (d / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")
    with pytest.raises(EmptyDataError, match=r"ratings.csv: no data rows after the header"):
        load_ml20m(str(d))
    (d / "ratings.csv").write_text("")
    with pytest.raises(DataFormatError, match=r"ratings.csv: line 1 \(header\) lacks"):
        load_ml20m(str(d))


def test_filters_that_empty_a_loader_name_file_and_filter(synthetic_dirs, tmp_path):
    d = _copy(synthetic_dirs["amazon"][0], tmp_path)
    with pytest.raises(EmptyDataError, match=r"no rating >= min_rating=9.0 in ratings_"):
        load_amazon(str(d), min_rating=9.0)
    d = _copy(synthetic_dirs["ml20m"][0], tmp_path, "ml")
    with pytest.raises(EmptyDataError, match=r"genome-scores.csv: no \(movie, tag\) pair has relevance > 1.5"):
        load_ml20m(str(d), relevance=1.5)
    d = _copy(synthetic_dirs["taobao"][0], tmp_path, "tb")
    (d / "theme_item_pool.csv").write_text("theme_id,item_id\n999999,999999\n")
    with pytest.raises(EmptyDataError, match=r"theme_click_log.csv: none of its \d+ clicks"):
        load_taobao(str(d))
