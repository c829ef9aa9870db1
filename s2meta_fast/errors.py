"""The package's own exceptions: a user's mistake, a missing input or a damaged file, never a bug.

``s2meta`` reports an :class:`S2MetaError` as one line naming what to fix and lets anything
else (a bug) show its traceback. Each class also subclasses the built-in exception a caller
would naturally catch (a missing file is a ``FileNotFoundError``, a bad value a ``ValueError``),
so generic handlers keep working. Nothing here imports the rest of the package: every layer
may raise these.
"""
from __future__ import annotations


class S2MetaError(Exception):
    """Base class: the message says what was wrong and how to fix it."""


class ConfigError(S2MetaError, ValueError):
    """A config file, option or command line is invalid; the message says what was expected."""


class DataError(S2MetaError):
    """The data cannot serve the run: a raw file is missing or malformed, or filters down to nothing."""


class CheckpointError(S2MetaError):
    """A checkpoint is missing, damaged or was written for other settings; the message names it."""


class RunFolderError(S2MetaError, FileNotFoundError):
    """The run folder (--out) cannot be used: it lacks what a command needs (a checkpoint, its
    config.yaml), is a file or not writable, or another run holds its lock."""


class InputError(S2MetaError, ValueError):
    """An input of a command or library call cannot be used: a table without the expected columns,
    ids the model does not know where that is an error, no usable row."""


class ModelFileError(S2MetaError, ValueError):
    """A model file cannot be loaded: missing, truncated, corrupt, from a newer format version, or
    not a model file at all."""


class TrainingError(S2MetaError, RuntimeError):
    """Meta-training cannot go on (e.g. the meta-loss stays non-finite); the last checkpoint is intact."""


__all__ = ["CheckpointError", "ConfigError", "DataError", "InputError", "ModelFileError", "RunFolderError",
           "S2MetaError", "TrainingError"]
