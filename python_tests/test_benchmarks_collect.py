"""`make bench` runs every comparison: pytest collects each benchmark file with all its rows.

Collection only (no timing), in a subprocess so that the benchmarks' imports and parametrization
are exercised as `pytest benchmarks` sees them. CUDA rows are collected everywhere (and skipped
at run time without a GPU), so the counts do not depend on the machine.
"""
from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Benchmarks per file; adding rows is fine (raise the number), losing them is the failure we catch.
EXPECTED = {
    "bench_lstm_update.py": 48,      # 4 sizes x 3 impls x 2 modes x 2 devices
    "bench_grad_preprocess.py": 36,  # 3 sizes x 3 impls x 2 modes x 2 devices
    "bench_hinge_score.py": 46,      # hinge fwd+bwd: 4 sizes x 5 impls x 2 devices; score_matrix: 3 x 2
    "bench_meta_step.py": 12,        # 3 impls x 2 meta-batch sizes x 2 devices
    "bench_eval.py": 8,              # 2 impls x 2 block sizes x 2 devices
    "bench_recommend.py": 8,         # request: 2 impls x 2 devices; 64 scenarios: adapt_many / single x 2 devices
}
# The ops whose comparison includes torch.compile of the reference; the meta-step and evaluation
# compare fused with reference only (their docstrings say why).
THREE_WAY = ("bench_lstm_update.py", "bench_grad_preprocess.py", "bench_hinge_score.py")


@pytest.fixture(scope="module")
def collected() -> list:
    done = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "--collect-only", "-q",
                           "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"collecting the benchmarks failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return [line for line in done.stdout.splitlines() if "::" in line]


def test_every_benchmark_file_is_collected_in_full(collected):
    per_file = Counter(Path(node.split("::", 1)[0]).name for node in collected)
    files = {p.name for p in (ROOT / "benchmarks").glob("bench_*.py")}
    assert files == set(EXPECTED), f"benchmark files changed: {sorted(files)}; update EXPECTED"
    for name, count in EXPECTED.items():
        assert per_file[name] >= count, f"{name}: {per_file[name]} benchmarks collected, expected {count}"


def test_each_comparison_has_fused_reference_and_compiled_rows(collected):
    for name in EXPECTED:
        ids = [node for node in collected if Path(node.split("::", 1)[0]).name == name]
        impls = {impl for node in ids for impl in ("fused", "reference", "compiled")
                 if re.search(rf"[\[-]{impl}[\]-]", node)}
        want = {"fused", "reference", "compiled"} if name in THREE_WAY else {"fused", "reference"}
        assert impls == want, f"{name}: implementations {sorted(impls)}, expected {sorted(want)}"
        assert any("cpu" in node for node in ids) and any("cuda" in node for node in ids), name
