"""The fp32 CUDA kernels keep their register budget: no new spills or local-memory frames.

Reads the per-kernel resource usage (registers, stack frame) of the sm_90 code inside the built
extension with cuobjdump, so it costs no compilation and needs no GPU. A stack frame on a kernel
that has none means ptxas started spilling (or an array went to local memory); the figures for
every kernel are in docs/performance.md.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import s2meta_fast
import s2meta_fast._build_info as build_info

# fp32 kernel -> the largest stack frame (bytes) it may have. The MLP kernels keep their per-layer
# pointer tables in local memory (indexed by the runtime layer); everything else has none.
FP32_STACK_BUDGET = {
    "grad_preprocess_kernel": 0,
    "lstm_forward_kernel": 0,
    "lstm_backward_kernel": 0,
    "lstm_reduce_kernel": 0,
    "hinge_forward_kernel": 544,
    "hinge_backward_kernel": 688,
    "hinge_loss_kernel": 0,
    "reduce_partials_kernel": 0,
    "first_layer_kernel": 0,
    "pair_kernel": 464,
}


def _cuobjdump():
    candidates = [shutil.which("cuobjdump")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(str(Path(os.environ["CUDA_HOME"]) / "bin" / "cuobjdump"))
    try:  # torch's triton ships one where a minimal toolkit does not
        import triton  # noqa: F401
        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and Path(c).exists()), None)


def _extension() -> str:
    found = glob.glob(str(Path(s2meta_fast.__file__).parent / "_C*.so"))
    return found[0] if found else ""


@pytest.fixture(scope="module")
def fp32_kernels():
    if not getattr(build_info, "WITH_CUDA", False):
        pytest.skip("the extension was built without its CUDA kernels")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton) to read the kernels' resource usage")
    text = subprocess.run([tool, "--dump-resource-usage", _extension()], capture_output=True, text=True,
                          check=True).stdout
    usage = {}
    for name, reg, stack in re.findall(r"Function (\S+):\n\s+REG:(\d+) STACK:(\d+)", text):
        kernel = re.search(r"\d+([a-z_]+_kernel)If(?:E|Li)", name)  # first template argument: float
        if kernel:  # the worst of a kernel's fp32 instantiations
            usage[kernel.group(1)] = max(usage.get(kernel.group(1), (0, 0)), (int(reg), int(stack)), key=lambda u: u[1])
    return usage


def test_every_fp32_kernel_is_known(fp32_kernels):
    assert set(fp32_kernels) == set(FP32_STACK_BUDGET), "update FP32_STACK_BUDGET and docs/performance.md"


@pytest.mark.parametrize("kernel", sorted(FP32_STACK_BUDGET))
def test_fp32_kernel_stays_within_its_stack_budget(fp32_kernels, kernel):
    registers, stack = fp32_kernels[kernel]
    assert stack <= FP32_STACK_BUDGET[kernel], (
        f"{kernel}<float> now has a {stack}-byte stack frame ({registers} registers): ptxas spills or an array "
        "went to local memory; see docs/performance.md")
