"""The CUDA kernels' device code, executed on the CPU under the emulator and the sanitizers.

emu_build.py compiles csrc/ops/cuda/*.cu as host C++ (launchers and kernels as written, only the CUDA
syntax mapped) with ASan + UBSan; emu_worker.py runs every case of emu_cases.py in one process started with
the ASan runtime preloaded, under two thread schedules, and these tests read its verdicts.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import emu_build as build  # noqa: E402
import emu_cases as C  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which(build.CXX) is None, reason=f"needs the host compiler {build.CXX}")


@pytest.fixture(scope="module")
def library() -> Path:
    return build.build()


@pytest.fixture(scope="module")
def verdicts(library, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("cuda_emu") / "results.json"
    done = subprocess.run([sys.executable, str(HERE / "emu_worker.py"), str(library), str(out)],
                          env=build.sanitizer_env(), capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        ran = json.loads(out.read_text())["cases"] if out.exists() else {}
        pytest.fail(f"the emulator worker died (exit {done.returncode}) after {len(ran)} cases; a sanitizer "
                    f"report or crash follows:\n{done.stderr[-15000:]}")
    return json.loads(out.read_text())


CASE_IDS = [f"{case.name}|{dtype}" for case in C.CASES for dtype in case.dtypes]


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_emulated_kernel_matches_reference(verdicts, case_id):
    failures = {schedule: verdicts["cases"][f"{case_id}|{schedule}"]["detail"] for schedule in C.SCHEDULES
                if not verdicts["cases"][f"{case_id}|{schedule}"]["ok"]}
    assert not failures, failures


@pytest.mark.parametrize("name", list(C.LIMIT_CASES))
def test_limit_is_rejected_with_its_message(verdicts, name):
    verdict = verdicts["limits"][name]
    assert verdict["ok"], f"expected /{C.LIMIT_CASES[name][1]}/, got: {verdict['detail']}"


@pytest.mark.parametrize("mutant", list(C.MUTANT_CASES))
def test_broken_kernel_is_caught(verdicts, mutant):
    """Each deliberately broken variant (emu_build.MUTANTS, and a dropped shared-memory opt-in) fails
    the comparison its case passes intact."""
    case_name, dtype = C.MUTANT_CASES[mutant]
    assert all(verdicts["cases"][f"{case_name}|{dtype}|{s}"]["ok"] for s in C.SCHEDULES)
    outcome = verdicts["mutants"][mutant]
    assert any(o["detected"] for o in outcome.values()), outcome


def test_missing_barrier_is_caught_under_every_schedule(verdicts):
    for mutant in ("lstm_forward_missing_barrier", "lstm_backward_missing_barrier", "score_matrix_missing_barrier"):
        assert all(o["detected"] for o in verdicts["mutants"][mutant].values()), (mutant, verdicts["mutants"][mutant])


def test_launch_over_48k_without_opt_in_fails(verdicts):
    detail = verdicts["mutants"]["ignore_shared_optin"]["forward"]["detail"]
    assert "no cudaFuncAttributeMaxDynamicSharedMemorySize opt-in" in detail, detail


def test_every_kernel_was_launched(verdicts):
    launches, blocks, barriers = verdicts["counters"]
    assert launches > 0 and blocks >= launches and barriers > 0


@pytest.mark.parametrize("primitive", ["__shfl_xor_sync(0xffffffffu, v, 1)", "__ballot_sync(0xffffffffu, v > 0)",
                                       "atomicAdd(&v, 1.0f)"])
def test_unmodelled_primitives_are_refused_at_compile_time(tmp_path, primitive):
    source = tmp_path / "kernel.cpp"
    source.write_text("template <typename T> __global__ void k(T v) { v += " + primitive + "; }\n"
                      "void launch() { k<float><<<1, 32>>>(1.0f); }\n")
    rewritten = tmp_path / "kernel.emu.cpp"
    rewritten.write_text(build.rewrite_launches(source.read_text()))
    done = subprocess.run([build.CXX, "-std=c++20", "-fsyntax-only", "-include", str(build.EMU / "cuda_emu.h"),
                           str(rewritten)], capture_output=True, text=True)
    assert done.returncode != 0
    assert "cuda_emu refuses " + primitive.split("(")[0] in done.stderr, done.stderr[-2000:]


def test_rewrite_maps_only_the_launch_syntax():
    text = "  k<T, 16><<<dim3(a, b), kThreads, bytes, stream>>>(x, y);"
    assert build.rewrite_launches(text) == "  ::s2meta_emu::launch(k<T, 16>, dim3(a, b), kThreads, bytes, stream)(x, y);"


def test_mutant_anchors_are_unique():
    for name in sorted({file for file, _, _ in build.MUTANTS.values()}):
        build.rewrite(name, (build.KERNELS / name).read_text())  # raises when an anchor moved

