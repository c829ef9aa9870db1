"""Checkpoint files that are never torn and whose damage is detected when they are read.

A checkpoint file is a short header — a magic tag and the SHA-256 of the payload — followed by
the payload, the bytes of ``torch.save(state)``. Writes go through a temp file and a rename, so
a crash or kill mid-write never leaves a torn file; the checksum catches what happens to a file
afterwards (a truncated copy, a bad disk). Files written before the header existed (plain
``torch.save``) still load, verified by a full load inside a guard.

:func:`rotate_save` keeps the last N of a series (``checkpoint.pt`` newest, then
``checkpoint.1.pt``, ...); :func:`newest_intact` picks the newest checkpoint that verifies.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import CheckpointError
from ..fileio import atomic_write_bytes

MAGIC = b"S2MCKPT1"
_HEADER = len(MAGIC) + 32


def _encode(state: Dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    return MAGIC + hashlib.sha256(payload).digest() + payload


def save_atomic(state: Dict[str, Any], path: str | os.PathLike) -> Path:
    """Writes `state` with its checksum to a temp file in the target folder, fsyncs, then renames.

    ``os.replace`` is atomic on POSIX within one filesystem, so readers see the old file or the
    new one, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, _encode(state))
    return path


def series(path: str | os.PathLike, keep: int) -> List[Path]:
    """The files of a kept series, newest first: ``name.pt``, ``name.1.pt``, ... ``name.{keep-1}.pt``."""
    path = Path(path)
    return [path] + [path.with_name(f"{path.stem}.{k}{path.suffix}") for k in range(1, max(keep, 1))]


def rotate_save(state: Dict[str, Any], path: str | os.PathLike, keep: int) -> Path:
    """Saves `state` as `path` and keeps the `keep` - 1 previous saves as ``stem.1.pt``, ``stem.2.pt``...

    The new file is complete on disk before any old one moves, so a crash at any point leaves
    at least the previous checkpoint intact under one of the series' names.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _encode(state)
    names = series(path, keep)

    def shift_older() -> None:
        for older, newer in zip(reversed(names[1:]), reversed(names[:-1])):
            if newer.exists():
                os.replace(newer, older)
    atomic_write_bytes(path, data, before_replace=shift_older)
    return path


def _damage(data: bytes) -> Tuple[Optional[bytes], Optional[str]]:
    """(payload, None) for an intact file, (None, what is wrong) otherwise."""
    if data.startswith(MAGIC):
        if len(data) < _HEADER:
            return None, f"truncated ({len(data)} bytes)"
        payload = data[_HEADER:]
        if hashlib.sha256(payload).digest() != data[len(MAGIC):_HEADER]:
            return None, f"checksum mismatch ({len(data)} bytes: truncated or corrupted)"
        return payload, None
    return data, None   # an older, unchecksummed checkpoint: the guarded load below decides


def load(path: str | os.PathLike, map_location: Optional[torch.device | str] = None) -> Dict[str, Any]:
    """Reads a checkpoint written by :func:`save_atomic` (trusted: our own files, full pickle).

    Raises :class:`CheckpointError` naming the file when it is missing, damaged or not a checkpoint.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except OSError as error:
        raise CheckpointError(f"checkpoint {path} cannot be read: {error.strerror or error}") from None
    payload, problem = _damage(data)
    if problem is None:
        try:
            state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)
        except Exception as error:  # any failure to unpickle means the file is not a usable checkpoint
            problem = f"unreadable ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        else:
            if isinstance(state, dict):
                return state
            problem = f"holds a {type(state).__name__}, not a checkpoint"
    raise CheckpointError(f"checkpoint {path} is damaged: {problem}")


def newest_intact(paths: Sequence[str | os.PathLike], map_location: Optional[torch.device | str] = None
                  ) -> Tuple[Optional[Path], Optional[Dict[str, Any]], List[Tuple[Path, str]]]:
    """The intact checkpoint with the highest ``step`` among the existing `paths`.

    Returns ``(path, state, damaged)``: ``damaged`` lists each existing file that failed to
    verify with the reason; ``path`` and ``state`` are None when no file verifies.
    """
    best: Tuple[Optional[Path], Optional[Dict[str, Any]]] = (None, None)
    damaged: List[Tuple[Path, str]] = []
    for candidate in map(Path, paths):
        if not candidate.exists():
            continue
        try:
            state = load(candidate, map_location=map_location)
        except CheckpointError as error:
            damaged.append((candidate, str(error)))
            continue
        if best[1] is None or int(state.get("step", -1)) > int(best[1].get("step", -1)):
            best = (candidate, state)
    return best[0], best[1], damaged
