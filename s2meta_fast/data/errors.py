"""Exceptions raised for bad input data.

Both subclass the built-in exception a caller would naturally catch (a missing file is a
``FileNotFoundError``, a bad row a ``ValueError``), so generic handlers keep working.
"""
from __future__ import annotations


class DataFileError(FileNotFoundError):
    """A required raw file or folder is absent; the message names it and its columns."""


class DataFormatError(ValueError):
    """A raw file is malformed; the message names the file and, where known, the line."""


class UnknownDatasetError(KeyError):
    """``prepare`` was given a dataset name that is not registered."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""
