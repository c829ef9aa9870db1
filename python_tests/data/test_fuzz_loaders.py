"""Fuzzed raw files: every raw-format loader either loads or raises the package's data error
naming the file — never another exception, never a hang.

Each example starts from a tiny valid dataset and damages one of its files: replaced by
generated CSV-like text or bytes, a generated line spliced in, cut at a random byte, and for
the gzipped Amazon metadata also broken compression.
"""
import gzip
import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from s2meta_fast.data.amazon import load_amazon
from s2meta_fast.data.errors import DataFileError
from s2meta_fast.data.movielens import load_ml20m
from s2meta_fast.data.scenarios import RawData
from s2meta_fast.data.synthetic import write_raw
from s2meta_fast.data.taobao import load_taobao
from s2meta_fast.errors import DataError

LOADERS = {"ml20m": load_ml20m, "amazon": load_amazon, "taobao": load_taobao}
# Cheap: a few dozen examples per loader, each a read of a ~100-user dataset
# (S2META_FUZZ_EXAMPLES=2000 for a longer hunt).
FUZZ = settings(max_examples=int(os.environ.get("S2META_FUZZ_EXAMPLES", 40)), deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])

CSV_CHARS = st.sampled_from(list("0123456789,.-e\"' \t\n\r:;[]{}") + ["nan", "inf", "1e99", "\x00", "é", "\ufeff"])
csv_text = st.lists(CSV_CHARS, max_size=300).map("".join)
csv_line = st.lists(st.sampled_from(list("0123456789,.-e\"' ") + ["nan", "-1", "9" * 25]), max_size=40).map("".join)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = {}
    for fmt in LOADERS:
        folder = str(tmp_path_factory.mktemp(f"fuzz_{fmt}"))
        write_raw(fmt, folder, seed=1, n_users=80, n_scenarios=3, per_scenario=3, per_source=3)
        out[fmt] = folder
    return out


mutation = st.one_of(
    st.tuples(st.just("replace_text"), csv_text),
    st.tuples(st.just("replace_bytes"), st.binary(max_size=300)),
    st.tuples(st.just("splice_line"), csv_line, st.floats(0, 1)),
    st.tuples(st.just("cut"), st.floats(0, 1)),
)


def _mutate(path, how):
    gz = path.endswith(".gz")
    with (gzip.open(path, "rb") if gz else open(path, "rb")) as fh:
        data = fh.read()
    kind = how[0]
    if kind == "replace_text":
        data = how[1].encode("utf-8")
    elif kind == "replace_bytes":
        data = how[1]
    elif kind == "splice_line":
        lines = data.split(b"\n")
        at = int(how[2] * len(lines))
        lines.insert(at, how[1].encode())
        data = b"\n".join(lines)
    elif kind == "cut" and not gz:
        data = data[:int(how[1] * len(data))]
    if gz and kind == "replace_bytes":
        with open(path, "wb") as fh:     # not gzip at all
            fh.write(data)
    elif gz and kind == "cut":
        packed = gzip.compress(data)
        with open(path, "wb") as fh:     # a truncated gzip stream
            fh.write(packed[:int(how[1] * len(packed))])
    elif gz:
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        with open(path, "wb") as fh:
            fh.write(data)


def _check(fmt, folder, name, how):
    work = tempfile.mkdtemp(prefix=f"fuzz-{fmt}-")
    try:
        data_dir = os.path.join(work, "d")
        shutil.copytree(folder, data_dir)
        _mutate(os.path.join(data_dir, name), how)
        try:
            raw = LOADERS[fmt](data_dir)
        except DataError as error:
            msg = str(error)
            named = name in msg or (isinstance(error, DataFileError) and data_dir in msg)
            assert named, f"{type(error).__name__} does not name {name}: {msg}"
        else:
            assert isinstance(raw, RawData)
    finally:
        shutil.rmtree(work)


def _files(folder):
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("fmt", sorted(LOADERS))
def test_fuzzed_raw_files_load_or_raise_a_data_error_naming_the_file(tiny, fmt):
    names = _files(tiny[fmt])

    @FUZZ
    @given(name=st.sampled_from(names), how=mutation)
    def check(name, how):
        _check(fmt, tiny[fmt], name, how)

    check()
