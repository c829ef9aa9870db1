"""Strict, vectorised CSV reading shared by the raw-format loaders.

The happy path is a single pandas C-engine read with explicit dtypes (fast and lean on
20M-row files). Only when that fails do we pay for a second pass that finds the first bad
row, because pandas' own conversion errors carry no line number.
"""
from __future__ import annotations

import csv
import os
from typing import Callable, Dict, Mapping, Sequence

import numpy as np
import pandas as pd

from .errors import DataFileError, DataFormatError, EmptyDataError

_CHUNK = 1_000_000


def require_dir(folder: str | os.PathLike, dataset: str, files: Mapping[str, Sequence[str]]) -> str:
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        listing = "; ".join(f"{f} ({', '.join(c)})" for f, c in files.items())
        raise DataFileError(f"{dataset}: data folder {folder!r} does not exist; it must hold {listing}")
    return folder


def require_file(path: str, columns: Sequence[str], note: str = "") -> str:
    if not os.path.isfile(path):
        extra = f" {note}" if note else ""
        raise DataFileError(f"missing file {path!r}: it must have the columns {', '.join(columns)}{extra}")
    return path


def require_files(data_dir: str | os.PathLike | None, dataset: str,
                  files: Mapping[str, Sequence[str]]) -> Dict[str, str]:
    """Paths of a dataset's raw files, by name; an error names every file and its columns."""
    if data_dir is None:
        listing = "; ".join(f"{f} ({', '.join(c)})" for f, c in files.items())
        raise DataFileError(f"{dataset} needs data_dir= a folder holding {listing}")
    folder = require_dir(data_dir, dataset, files)
    return {name: require_file(os.path.join(folder, name), columns) for name, columns in files.items()}


def _is_int_dtype(dt) -> bool:
    return np.issubdtype(np.dtype(dt), np.integer)


def _is_numeric(dt) -> bool:
    return np.dtype(dt).kind in "iuf"


def _csv_kwargs(columns, header: bool, names, sep: str, quoting: int) -> tuple[dict, dict]:
    """pandas arguments selecting ``columns``, and the renaming that gives them their bare names.

    Column names are never forced onto the file: pandas then raises on a row with too many
    fields ("Expected 4 fields in line 9, saw 6") instead of silently shifting it into an index.
    """
    kw = dict(sep=sep, engine="c", keep_default_na=False, on_bad_lines="error", quoting=quoting)
    if header:
        # RecBole atomic files annotate names as "user_id:token"; the bare name is what matters.
        kw.update(header=0, usecols=lambda c: c.split(":")[0] in columns)
        return kw, {}
    pos = [list(names).index(c) for c in columns]
    kw.update(header=None, usecols=pos)
    return kw, {p: c for p, c in zip(pos, columns)}


def _bare(df: pd.DataFrame, rename: dict) -> pd.DataFrame:
    return df.rename(columns=rename) if rename else df.rename(columns=lambda c: str(c).split(":")[0])


def _first_bad_row(path: str, kw: dict, rename: dict, dtypes: Mapping[str, object],
                   header_lines: int) -> tuple[int, str, str]:
    """Returns (line number, column, offending text) of the first row that fails its dtype."""
    with pd.read_csv(path, dtype=str, chunksize=_CHUNK, **kw) as reader:   # closed on an early return
        return _scan_chunks(reader, rename, dtypes, header_lines)


def _scan_chunks(reader, rename: dict, dtypes: Mapping[str, object], header_lines: int) -> tuple[int, str, str]:
    base = 0
    for chunk in reader:
        chunk = _bare(chunk, rename)
        for col, dt in dtypes.items():
            if col not in chunk or not _is_numeric(dt):
                continue
            text = chunk[col]
            conv = pd.to_numeric(text.where(text.str.len() > 0, None), errors="coerce")
            vals = conv.to_numpy(dtype=np.float64, na_value=np.nan)
            bad = ~np.isfinite(vals)
            if _is_int_dtype(dt):
                info = np.iinfo(np.dtype(dt))
                with np.errstate(invalid="ignore"):
                    bad |= (vals != np.round(vals)) | (vals < info.min) | (vals > info.max)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                return base + i + header_lines + 1, col, str(text.iloc[i])
        base += len(chunk)
    return -1, "", ""


def read_table(path: str, columns: Sequence[str], dtypes: Mapping[str, object], *, header: bool = True,
               names: Sequence[str] | None = None, sep: str = ",", quoting: int = csv.QUOTE_MINIMAL,
               chunk_filter: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
               strict_fields: bool = False) -> pd.DataFrame:
    """Reads ``columns`` of a delimited file with the given dtypes.

    header=True: the first line names the columns and must contain every one of ``columns``.
    header=False: ``names`` gives the positional column names.
    chunk_filter: applied to each chunk of rows as it is read, so only what it keeps is ever
    held in memory at once (the 12M-row ML-20M genome).
    strict_fields: for unquoted files, reject rows with a wrong number of fields (pandas
    silently ignores extra fields once ``usecols`` is given).
    Raises DataFileError if absent, DataFormatError (with file and line) if a row is malformed.
    """
    require_file(path, columns)
    if header:
        with open(path, "r", encoding="utf-8", errors="replace") as fh:
            first = fh.readline().rstrip("\r\n")
        present = [c.strip().strip('"') for c in first.split(sep)]
        bare = [c.split(":")[0] for c in present]
        missing = [c for c in columns if c not in bare]
        if missing:
            raise DataFormatError(f"{path}: line 1 (header) lacks column(s) {', '.join(missing)}; "
                                  f"expected {', '.join(columns)}, found {', '.join(present)}")
        header_lines = 1
    else:
        assert names is not None
        header_lines = 0
    if strict_fields:
        check_field_counts(path, sep, len(present) if header else len(names), header_lines)
    kw, rename = _csv_kwargs(columns, header, names, sep, quoting)
    typed = {(c if header else list(names).index(c)): dtypes[c] for c in columns if c in dtypes}
    if header:
        # dtype keys must match the file's own (possibly annotated) names.
        typed = {p: dtypes[b] for p, b in zip(present, bare) if b in columns and b in dtypes}
    n_rows = 0
    try:
        if chunk_filter is None:
            df = _bare(pd.read_csv(path, dtype=typed, **kw), rename)
            _check_columns(path, df, columns)
            _check_finite(path, df, dtypes, header_lines)
            n_rows = len(df)
        else:
            parts, base = [], header_lines
            with pd.read_csv(path, dtype=typed, chunksize=_CHUNK, **kw) as reader:
                for chunk in reader:
                    chunk = _bare(chunk, rename)
                    _check_columns(path, chunk, columns)
                    _check_finite(path, chunk, dtypes, base)
                    base += len(chunk)
                    n_rows += len(chunk)
                    parts.append(chunk_filter(chunk))
            df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(columns))
    except DataFormatError:
        raise
    except pd.errors.EmptyDataError:
        raise EmptyDataError(f"{path}: the file is empty; expected rows with the columns {', '.join(columns)}") \
            from None
    except pd.errors.ParserError as exc:
        raise DataFormatError(f"{path}: malformed row: {_one_line(exc)}") from None
    except (ValueError, TypeError, OverflowError) as exc:
        try:
            line, col, text = _first_bad_row(path, kw, rename, dtypes, header_lines)
        except (ValueError, TypeError, OverflowError, pd.errors.ParserError):
            line = -1
        if line < 0:
            raise DataFormatError(f"{path}: cannot parse: {_one_line(exc)}") from None
        raise DataFormatError(f"{path}: line {line}: column {col!r} has {text!r}, "
                              f"expected {np.dtype(dtypes[col]).name}") from None
    if n_rows == 0:
        raise EmptyDataError(f"{path}: no data rows{' after the header' if header else ''}; expected rows with "
                             f"the columns {', '.join(columns)}")
    return df if chunk_filter is not None else df[list(columns)]


def _check_columns(path: str, df: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:  # a header the quick check above read differently from the CSV parser (quotes)
        raise DataFormatError(f"{path}: line 1 (header): cannot find column(s) {', '.join(missing)}")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return " ".join(text.split()) if text else type(exc).__name__


def check_field_counts(path: str, sep: str, n_fields: int, header_lines: int, block: int = 1 << 24) -> None:
    """Every non-empty line has n_fields fields; vectorised over raw bytes, one block at a time."""
    lines_before = 0
    carry = b""
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(block)
            data = carry + chunk
            if not chunk:
                if not data:
                    break
                if not data.endswith(b"\n"):
                    data += b"\n"
                carry = b""
            else:
                cut = data.rfind(b"\n")
                if cut < 0:
                    carry = data
                    continue
                data, carry = data[:cut + 1], data[cut + 1:]
            buf = np.frombuffer(data, np.uint8)
            nl = np.flatnonzero(buf == ord("\n"))
            counts = np.bincount(np.searchsorted(nl, np.flatnonzero(buf == ord(sep))), minlength=nl.size)
            length = nl - np.concatenate([[0], nl[:-1] + 1])
            empty = (length == 0) | ((length == 1) & (buf[np.maximum(nl - 1, 0)] == ord("\r")))
            bad = (counts[:nl.size] != n_fields - 1) & ~empty
            bad[:max(0, header_lines - lines_before)] = False
            if bad.any():
                k = int(np.flatnonzero(bad)[0])
                raise DataFormatError(f"{path}: line {lines_before + k + 1}: {counts[k] + 1} fields, "
                                      f"expected {n_fields}")
            lines_before += nl.size
            if not chunk:
                break


def _check_finite(path: str, df: pd.DataFrame, dtypes: Mapping[str, object], lines_before: int) -> None:
    # Float parsing accepts 'nan'/'inf' text; a rating or relevance like that is a bad row.
    for col, dt in dtypes.items():
        if col in df and np.issubdtype(np.dtype(dt), np.floating):
            bad = ~np.isfinite(df[col].to_numpy())
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise DataFormatError(f"{path}: line {i + lines_before + 1}: column {col!r} is empty or not finite")
