"""Strict CSV reading: every kind of corrupted row is reported with its file and line."""
import os
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from s2meta_fast.data import DataFormatError
from s2meta_fast.data._io import read_table

DTYPES = {"a": np.int64, "b": np.int32, "x": np.float32}
CORRUPTIONS = {
    "text_in_int": lambda r: f"{r[0]},oops,{r[2]},7",
    "empty_int": lambda r: f",{r[1]},{r[2]},7",
    "nan_float": lambda r: f"{r[0]},{r[1]},nan,7",
    "inf_float": lambda r: f"{r[0]},{r[1]},inf,7",
    "fraction_in_int": lambda r: f"{r[0]}.5,{r[1]},{r[2]},7",
    "extra_field": lambda r: f"{r[0]},{r[1]},{r[2]},7,8",
    "missing_field": lambda r: f"{r[0]},{r[1]}",
    "int32_overflow": lambda r: f"{r[0]},3000000000,{r[2]},7",
}


def _write(rows, corrupt_at=None, how=None, header=True):
    fd, path = tempfile.mkstemp(suffix=".csv")
    with os.fdopen(fd, "w") as fh:
        if header:
            fh.write("a,b,x,ts\n")
        for k, r in enumerate(rows):
            fh.write((CORRUPTIONS[how](r) if k == corrupt_at else f"{r[0]},{r[1]},{r[2]},7") + "\n")
    return path


rows_st = st.lists(st.tuples(st.integers(0, 10**12), st.integers(-1000, 1000),
                             st.floats(-1e3, 1e3, allow_nan=False, width=32)), min_size=1, max_size=60)


@settings(max_examples=30, deadline=None)
@given(rows=rows_st)
def test_valid_files_round_trip(rows):
    path = _write(rows)
    try:
        df = read_table(path, ["a", "b", "x"], DTYPES, strict_fields=True)
        assert list(df["a"]) == [r[0] for r in rows] and list(df["b"]) == [r[1] for r in rows]
        np.testing.assert_allclose(df["x"].to_numpy(), np.array([r[2] for r in rows], np.float32), rtol=1e-6)
    finally:
        os.remove(path)


@settings(max_examples=40, deadline=None)
@given(rows=rows_st, data=st.data(), how=st.sampled_from(sorted(CORRUPTIONS)), header=st.booleans())
def test_corrupt_row_reports_line(rows, data, how, header):
    k = data.draw(st.integers(0, len(rows) - 1))
    path = _write(rows, k, how, header)
    try:
        with pytest.raises(DataFormatError) as exc:
            if header:
                read_table(path, ["a", "b", "x"], DTYPES, strict_fields=True)
            else:
                read_table(path, ["a", "b", "x"], DTYPES, header=False, names=["a", "b", "x", "ts"],
                           strict_fields=True)
        assert f"{path}: line {k + 1 + header}:" in str(exc.value)
    finally:
        os.remove(path)
