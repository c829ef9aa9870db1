"""Atomic checkpoint files: a crash or kill mid-write never leaves a torn checkpoint."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch


def save_atomic(state: Dict[str, Any], path: str | os.PathLike) -> Path:
    """Writes `state` with torch.save to a temp file in the target folder, fsyncs, then renames.

    ``os.replace`` is atomic on POSIX within one filesystem, so readers see the old file or the
    new one, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load(path: str | os.PathLike, map_location: Optional[torch.device | str] = None) -> Dict[str, Any]:
    """Reads a checkpoint written by :func:`save_atomic` (trusted: our own files, full pickle)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=False)
