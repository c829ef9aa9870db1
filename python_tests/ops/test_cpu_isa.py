"""S2META_CPU_ISA, the one knob that caps the instruction set of every CPU kernel.

Each op's own tests run its kernel under every cap and compare with the reference; these check the
knob itself.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import s2meta_fast
from cpu_isa_env import ISAS

pytestmark = pytest.mark.skipif(not s2meta_fast.backend().cpu_kernels, reason="compiled CPU kernels not built")


def test_reports_one_of_the_known_isas():
    assert torch.ops.s2meta.cpu_isa() in ISAS


def test_unknown_value_is_an_error_naming_the_variable():
    code = (
        "import torch, s2meta_fast\n"
        "try:\n"
        "    torch.ops.s2meta.lstm_update_multi(*__import__('s2meta_fast.ops.sample_inputs', fromlist=['x'])"
        ".make_multi_args(S=1, sizes=[20], dtype=torch.float32, seed=0).values())\n"
        "except RuntimeError as e:\n"
        "    print('error:', str(e).splitlines()[0])\n")
    env = dict(os.environ, S2META_CPU_ISA="sse9")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "S2META_CPU_ISA" in result.stdout and "'sse9'" in result.stdout, result.stdout
