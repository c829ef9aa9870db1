"""The host settings MetaTrainer.fit runs its loop under (s2meta_fast/meta/host.py)."""
from __future__ import annotations

import gc
import subprocess
import sys

import pytest
import torch

from s2meta_fast.meta.host import frozen_gc, training_host


def test_frozen_gc_freezes_inside_and_releases_after():
    before = gc.get_freeze_count()
    marker = [object()]
    with frozen_gc():
        assert gc.get_freeze_count() > before
    assert gc.get_freeze_count() == before
    assert marker  # objects frozen inside are back in reach of the collector, not lost


def test_frozen_gc_releases_on_error():
    before = gc.get_freeze_count()
    with pytest.raises(KeyError):
        with frozen_gc():
            raise KeyError("boom")
    assert gc.get_freeze_count() == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_keep_freed_memory_stops_the_refaulting():
    """In a fresh process, a loop that frees and reallocates 112 MB faults its pages in once, not each time:
    sixteen 4 MiB blocks (trimmed from the heap's top by default) and one 48 MiB block (a fresh mmap)."""
    code = (
        "import resource, sys, torch\n"
        "from s2meta_fast.meta.host import keep_freed_memory\n"
        "if sys.argv[1] == 'keep': assert keep_freed_memory()\n"
        "def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "def step():\n"
        "    held = [torch.ones(1 << 20) for _ in range(16)] + [torch.ones(12 << 20)]  # freed at return\n"
        "step(); step()\n"
        "start = faults()\n"
        "for _ in range(5): step()\n"
        "print(faults() - start)\n")
    counts = {}
    for mode in ("plain", "keep"):
        done = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        counts[mode] = int(done.stdout.split()[-1])
    # without the setting, most of 5 x 112 MiB faults again (~80k pages measured); with it, the heap
    # may still grow once when fragmentation leaves no hole for the 48 MiB block (12k pages)
    assert counts["keep"] < counts["plain"] / 4, counts


def test_training_host_is_reentrant():
    before = gc.get_freeze_count()
    with training_host(torch.device("cpu")):
        frozen = gc.get_freeze_count()
        with training_host("cpu"):
            assert gc.get_freeze_count() == frozen
        assert gc.get_freeze_count() == frozen  # the inner exit leaves the outer freeze in place
    assert gc.get_freeze_count() == before
