"""The package's own error types: a user's mistake or a damaged file, never a bug.

The CLI turns every :class:`S2MetaError` into one line on stderr and exit status 2; any other
exception is a bug and keeps its traceback. Each subclass also derives from the built-in
exception a caller would naturally catch where one fits (a bad option is a ``ValueError``), so
generic handlers written before these types existed keep working.
"""
from __future__ import annotations


class S2MetaError(Exception):
    """Base of every error whose message alone tells the user what to fix."""


class ConfigError(S2MetaError, ValueError):
    """A config file or option is invalid; the message says what was expected."""


class DataError(S2MetaError):
    """Input data is missing, malformed or filters down to nothing; the message names the file."""


class CheckpointError(S2MetaError):
    """A checkpoint is missing, damaged or was written for other settings; the message names it."""


class RunFolderError(S2MetaError):
    """The run folder (--out) cannot be used: not a folder, not writable, or locked by another run."""
