"""Host-process settings for long CPU training loops.

Two costs of the Python host that a meta-step on the CPU pays and the kernels cannot remove, both
measured on the 2-core dev VM at B = 8 (docs/performance.md):

- glibc gives the heap's freed top back to the kernel once it exceeds a small threshold. A
  meta-step saves a few hundred MB of controller states for its backward and frees them at the
  end, so every step faulted 6,000-10,000 pages back in (9-20 ms of system time a step).
  Blocks above the mmap threshold (at most 32 MiB: B = 64's states are 45 MB each) get a fresh
  mapping every time, faulted in page by page: B = 64 ran at half B = 8's scenarios/s.
  `keep_freed_memory` serves every block from the heap (no mmap) and raises the trim threshold to
  2 GiB, so the heap keeps that memory for the next step.
- CPython's cyclic collector walks every tracked object (torch's modules included) in its full
  collections, which the autograd graph's many small objects trigger every few steps.
  `frozen_gc` moves everything alive before the loop out of its reach for the loop's duration.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import sys
from typing import Iterator

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_MAX = -4
_KEEP_BYTES = 2**31 - 1  # mallopt takes an int

_kept = False


def keep_freed_memory() -> bool:
    """Makes glibc serve large blocks from its heap and keep freed memory (up to 2 GiB above use).

    Process-wide and not undone: the process's resident size stays at its high-water mark, as with
    any caching allocator. Returns whether the settings took (False off glibc, e.g. on macOS).
    """
    global _kept
    if _kept:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _kept = bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES)) and bool(mallopt(_M_MMAP_MAX, 0))
    if not _kept:
        log.debug("mallopt refused the heap settings; freed memory goes back to the kernel as usual")
    return _kept


_freeze_depth = 0


@contextlib.contextmanager
def frozen_gc() -> Iterator[None]:
    """Within the block, full collections skip every object that was alive on entry.

    Nested blocks share the outermost one's freeze (``gc.unfreeze`` releases everything at once).
    """
    global _freeze_depth
    if _freeze_depth == 0:
        gc.collect()
        gc.freeze()
    _freeze_depth += 1
    try:
        yield
    finally:
        _freeze_depth -= 1
        if _freeze_depth == 0:
            gc.unfreeze()


@contextlib.contextmanager
def training_host(device, keep_memory: bool = True) -> Iterator[None]:
    """The settings for a training or evaluation loop on `device`.

    Args:
        device: the loop's device; the heap setting only matters on the CPU.
        keep_memory: also call :func:`keep_freed_memory` (CPU only). It changes glibc's allocator
            for the whole process and is never undone, so a library caller opts in:
            ``MetaTrainer(..., keep_freed_memory=True)``; the ``s2meta`` command line does
            (``--keep-freed-memory``, on by default).
    """
    if keep_memory and getattr(device, "type", str(device)) == "cpu":
        keep_freed_memory()
    with frozen_gc():
        yield
