"""Exceptions raised for bad input data.

All are :class:`s2meta_fast.errors.DataError`, and each also subclasses the built-in exception
a caller would naturally catch (a missing file is a ``FileNotFoundError``, a bad row a
``ValueError``), so generic handlers keep working.
"""
from __future__ import annotations

from ..errors import DataError


class DataFileError(DataError, FileNotFoundError):
    """A required raw file or folder is absent; the message names it and its columns."""


class DataFormatError(DataError, ValueError):
    """A raw file is malformed; the message names the file and, where known, the line."""


class EmptyDataError(DataError, ValueError):
    """Data that parses but leaves nothing to work with (no rows, no users, no scenarios); the
    message names the file or folder and the filter that emptied it."""


class UnknownDatasetError(DataError, KeyError):
    """``prepare`` was given a dataset name that is not registered."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


__all__ = ["DataError", "DataFileError", "DataFormatError", "EmptyDataError", "UnknownDatasetError"]
