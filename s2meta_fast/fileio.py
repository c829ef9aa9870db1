"""Atomic file writes, the one implementation every writer of the package uses.

A file is written to a temp file in its own folder, flushed to disk, given the mode a plain
``open()`` would give it (not ``mkstemp``'s 0600), then renamed over the target. ``os.replace``
is atomic on POSIX within one filesystem, so a reader or a crash sees the old file or the new
one, never half of one; a failed write leaves no temp file behind.
"""
from __future__ import annotations

import os
import tempfile
from typing import Callable, Iterable, Optional, Union

Chunks = Union[bytes, bytearray, memoryview, Iterable[Union[bytes, bytearray, memoryview]]]
# Every temp file of an atomic write starts with this; one that outlives its write was left by a
# writer killed mid-write (the run folder's transaction drops them when it continues a run).
TEMP_PREFIX = ".tmp-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Union[str, os.PathLike], write: Callable[[str], None],
                 before_replace: Optional[Callable[[], None]] = None) -> str:
    """Calls ``write(tmp_path)`` to fill a temp file, then renames it to `path`.

    before_replace: called after the data is on disk and before the rename (a checkpoint
    series shifts its older files there, so a crash in between loses no intact file).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{TEMP_PREFIX}{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_bytes(path: Union[str, os.PathLike], chunks: Chunks,
                       before_replace: Optional[Callable[[], None]] = None) -> str:
    """`chunks` (bytes, or an iterable of them) written atomically to `path`."""
    parts = [chunks] if isinstance(chunks, (bytes, bytearray, memoryview)) else chunks

    def write(tmp: str) -> None:
        with open(tmp, "wb") as stream:
            for part in parts:
                stream.write(part)
    return atomic_write(path, write, before_replace)


def atomic_write_text(path: Union[str, os.PathLike], text: str) -> str:
    """`text` (UTF-8) written atomically to `path`."""
    return atomic_write_bytes(path, text.encode("utf-8"))
