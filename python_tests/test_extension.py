"""The package never runs silently without its compiled kernels."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import s2meta_fast

ROOT = Path(__file__).resolve().parents[1]
FAKE_BUILD = textwrap.dedent("""
    import sys, types
    fake = types.ModuleType("s2meta_fast._build_info")
    fake.TORCH_VERSION = "0.0.0-other"
    sys.modules["s2meta_fast._build_info"] = fake
""")


def _run(code: str, require: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("S2META_REQUIRE_EXT", None)
    if require:
        env["S2META_REQUIRE_EXT"] = "1"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_backend_reports_compiled_kernels():
    backend = s2meta_fast.backend()
    if os.environ.get("S2META_REQUIRE_EXT") == "1":
        assert backend.extension_loaded and backend.cpu_kernels, str(backend)
    assert backend.name in {"compiled CPU", "compiled CPU+CUDA", "reference"}
    assert backend.name in str(backend)


def test_every_op_has_a_cpu_kernel_when_compiled():
    if not s2meta_fast.backend().extension_loaded:
        pytest.skip("extension not built")
    for op in ["grad_preprocess", "lstm_update_multi", "lstm_update_multi_backward", "hinge_score",
               "hinge_score_backward", "score_matrix"]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"s2meta::{op}", "CPU"), op


def test_torch_version_mismatch_warns_with_rebuild_command():
    result = _run(FAKE_BUILD + "import warnings; warnings.simplefilter('always')\n"
                  "import s2meta_fast; print(s2meta_fast.backend().name)", require=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "reference"
    assert "built against torch 0.0.0-other" in result.stderr
    assert "pip install --no-build-isolation" in result.stderr


def test_torch_version_mismatch_is_an_import_error_when_required():
    result = _run(FAKE_BUILD + "import s2meta_fast", require=True)
    assert result.returncode != 0
    assert "ImportError" in result.stderr and "S2META_REQUIRE_EXT=1" in result.stderr
    assert "0.0.0-other" in result.stderr


def test_reference_fallback_still_computes():
    result = _run(FAKE_BUILD + textwrap.dedent("""
        import warnings; warnings.simplefilter('ignore')
        import torch, s2meta_fast
        from s2meta_fast import ops
        out = ops.grad_preprocess(torch.tensor([1.0, -1e-9]))
        print(out.tolist())
    """), require=False)
    assert result.returncode == 0, result.stderr
    assert "[[0.0, 1.0], [-1.0" in result.stdout


def test_cpu_kernels_are_built_with_openmp():
    # at::parallel_for's OpenMP pragmas compile into our own objects: built without -fopenmp,
    # every CPU kernel silently runs on one thread (it happened once; the symbol proves the fix)
    if not s2meta_fast.backend().extension_loaded:
        pytest.skip("extension not built")
    import s2meta_fast._C as compiled
    with open(compiled.__file__, "rb") as handle:
        assert b"GOMP_parallel" in handle.read()


def test_cuda_home_without_a_toolkit_fails_the_build(tmp_path):
    """A CUDA_HOME that lacks include/cuda.h must stop the build, not quietly drop the CUDA kernels."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("#!/bin/sh\n")
    env = {k: v for k, v in os.environ.items() if k not in ("S2META_CUDA", "FORCE_CUDA", "CUDA_PATH")}
    env["CUDA_HOME"] = str(tmp_path)
    done = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0
    assert f"CUDA_HOME={tmp_path} is not a CUDA toolkit root (missing include/cuda.h)" in done.stderr
    assert "S2META_CUDA=0" in done.stderr
