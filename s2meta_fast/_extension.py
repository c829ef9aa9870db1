"""Loads the compiled kernels and says, loudly, when they are not there.

The compiled module ``s2meta_fast._C`` registers ``torch.ops.s2meta.*``. It is ABI-bound to the
torch it was built against, so we compare versions *before* loading it: a mismatch becomes a
message with the rebuild command instead of an undefined-symbol error.
``S2META_REQUIRE_EXT=1`` turns every reason for a missing extension into an ImportError (CI
sets it); otherwise the package warns and falls back to the pure-PyTorch reference ops.
"""
from __future__ import annotations

import dataclasses
import os
import warnings

import torch

REBUILD_HINT = ("rebuild it against the torch you run: "
                "`pip install --no-build-isolation --no-deps --force-reinstall .` in the s2meta_fast checkout")


@dataclasses.dataclass(frozen=True)
class Backend:
    """Which kernels serve the ops in this process."""

    extension_loaded: bool
    cpu_kernels: bool
    cuda_kernels: bool
    built_with_torch: str | None
    reason: str | None

    @property
    def name(self) -> str:
        if not self.extension_loaded:
            return "reference"
        return "compiled CPU+CUDA" if self.cuda_kernels else "compiled CPU"

    def __str__(self) -> str:
        text = f"s2meta_fast backend: {self.name}"
        if self.built_with_torch:
            text += f" (built against torch {self.built_with_torch})"
        if self.reason:
            text += f"; {self.reason}"
        return text


def _has_kernel(op: str, key: str) -> bool:
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"s2meta::{op}", key))


def _load() -> Backend:
    built_with = None
    try:
        from . import _build_info  # written by setup.py next to the compiled module
        built_with = _build_info.TORCH_VERSION
    except ImportError:
        pass
    if built_with is not None and built_with != torch.__version__:
        return Backend(False, False, False, built_with,
                       f"s2meta_fast._C was built against torch {built_with} but torch "
                       f"{torch.__version__} is running; {REBUILD_HINT}")
    try:
        from . import _C  # noqa: F401  (loading it registers torch.ops.s2meta.*)
    except ImportError as error:
        return Backend(False, False, False, built_with,
                       f"the compiled extension s2meta_fast._C could not be imported ({error}); {REBUILD_HINT}")
    return Backend(True, _has_kernel("lstm_update_multi", "CPU"), _has_kernel("lstm_update_multi", "CUDA"),
                   built_with, None)


BACKEND = _load()

if not BACKEND.extension_loaded:
    if os.environ.get("S2META_REQUIRE_EXT", "") == "1":
        raise ImportError(f"S2META_REQUIRE_EXT=1: {BACKEND.reason}")
    warnings.warn(f"s2meta_fast is running on the slow pure-PyTorch reference ops: {BACKEND.reason}",
                  RuntimeWarning, stacklevel=2)


def backend() -> Backend:
    """Returns which kernels are active: compiled CPU, compiled CPU+CUDA, or reference."""
    return BACKEND


def kernels_for(device: torch.device) -> bool:
    """True when a compiled kernel serves tensors on `device` (meta tensors use the fake impls)."""
    if device.type == "cpu":
        return BACKEND.cpu_kernels
    if device.type == "cuda":
        return BACKEND.cuda_kernels
    return BACKEND.extension_loaded and device.type == "meta"
