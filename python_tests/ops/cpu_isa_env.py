"""The S2META_CPU_ISA knob as the tests drive it: which clone a child process should report."""
from __future__ import annotations

import os

import torch

import s2meta_fast  # noqa: F401  (loads torch.ops.s2meta)

ISAS = ("baseline", "avx2", "avx512")  # narrowest first


def expected_cpu_isa(requested: str) -> str:
    """The ISA a child process run with S2META_CPU_ISA=requested reports: the request, capped by
    what this CPU supports (this process's own choice, when it runs without the knob)."""
    if os.environ.get("S2META_CPU_ISA"):
        # This process is capped itself, so it cannot tell what the CPU supports: only a cap
        # at or below its own is predictable.
        own = torch.ops.s2meta.cpu_isa()
        return requested if ISAS.index(requested) <= ISAS.index(own) else own
    supported = torch.ops.s2meta.cpu_isa()
    return ISAS[min(ISAS.index(requested), ISAS.index(supported))]
