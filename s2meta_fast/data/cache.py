"""The on-disk cache of prepared data and embeddings: entries that heal, a folder that may be read-only.

Entries are ``.npz`` files, written atomically (temp file + rename). Reading one is a full load
inside a guard: every array is read, which makes ``zipfile`` check each member's CRC-32, so a
truncated or corrupted entry fails there instead of later. A damaged entry is reported in one
line, deleted and rebuilt by the caller. A cache folder that cannot be written means no caching
(with a warning), never a failed run.
"""
from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from typing import Callable, Optional, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# What reading a damaged .npz (truncated zip, bad CRC, missing member, mangled header) raises.
DAMAGE = (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, TypeError, IndexError)


def read_entry(path: str, read: Callable[[str], T], what: str) -> Optional[T]:
    """``read(path)``, or None when the entry is absent or damaged (then it is deleted, with a warning)."""
    if not os.path.isfile(path):
        return None
    try:
        return read(path)
    except DAMAGE as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        try:
            os.unlink(path)
            action = "deleted it; rebuilding"
        except OSError as unlink_error:
            action = f"could not delete it ({unlink_error.strerror}); rebuilding without it"
        log.warning("cache: %s entry %s is damaged (%s: %s); %s", what, path, type(error).__name__, reason, action)
        return None


def writable(folder: str) -> Optional[str]:
    """None if files can be created in `folder` (made if absent), else the reason they cannot."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        return error.strerror or str(error)
    return None


def usable(cache_dir: str, use_cache: bool) -> bool:
    """Whether to cache in `cache_dir`: False (with a one-line warning) when it cannot be written."""
    if not use_cache:
        return False
    problem = writable(cache_dir)
    if problem is not None:
        log.warning("cache: folder %s is not writable (%s); running without a cache", cache_dir, problem)
        return False
    return True


def write_entry(path: str, write: Callable[[str], None], what: str) -> bool:
    """``write(path)`` (atomic by the writer); a failure (disk full, folder gone) is a warning, not an error."""
    try:
        write(path)
    except OSError as error:
        log.warning("cache: could not write %s entry %s (%s); continuing without caching it", what, path,
                    error.strerror or error)
        return False
    log.info("cache: %s cached at %s", what, path)
    return True
