"""Runs every emulated-kernel case in one sanitized process and writes the outcomes as JSON.

Started by test_cuda_emu.py with the ASan runtime preloaded (emu_build.sanitizer_env); a sanitizer
finding aborts this process, which the tests report with its stderr.
Usage: python emu_worker.py LIBRARY OUT.json
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import emu_cases as C  # noqa: E402


def configure(case: C.Case, schedule: str, seed: int = 0) -> None:
    torch.ops.s2meta_emu_ctl.configure(schedule, seed, case.shared)  # also restores every knob
    for name, value in case.knobs.items():
        torch.ops.s2meta_emu_ctl.set_knob(name, value)


def run_case(case: C.Case, dtype_name: str, schedule: str) -> dict:
    configure(case, schedule)
    dtype = C.DTYPES[dtype_name]
    start = time.perf_counter()
    try:
        error = C.compare(case.run(dtype), dtype)
    except Exception as e:  # noqa: BLE001 - a launch failure or wrong shape is the finding
        error = f"{type(e).__name__}: {e}"
    return {"ok": error is None, "detail": error or "", "seconds": round(time.perf_counter() - start, 3)}


def main(library: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.ops.load_library(library)
    results = {"cases": {}, "limits": {}, "mutants": {}}
    for case in C.CASES:
        for dtype_name in case.dtypes:
            for schedule in C.SCHEDULES:
                results["cases"][f"{case.name}|{dtype_name}|{schedule}"] = run_case(case, dtype_name, schedule)
                Path(out).write_text(json.dumps(results, indent=1))  # a sanitizer abort keeps what ran
    for name, (case, message) in C.LIMIT_CASES.items():
        configure(case, "forward")
        try:
            case.run(torch.float32)
            results["limits"][name] = {"ok": False, "detail": "no error raised"}
        except Exception as e:  # noqa: BLE001
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            results["limits"][name] = {"ok": re.search(message, str(e)) is not None, "detail": text}
    for mutant, (case_name, dtype_name) in C.MUTANT_CASES.items():
        torch.ops.s2meta_emu_ctl.set_mutant(mutant, True)
        outcome = {}
        for schedule in C.SCHEDULES:
            r = run_case(C.BY_NAME[case_name], dtype_name, schedule)
            outcome[schedule] = {"detected": not r["ok"], "detail": r["detail"][:400]}
        torch.ops.s2meta_emu_ctl.set_mutant(mutant, False)
        results["mutants"][mutant] = outcome
    results["counters"] = list(torch.ops.s2meta_emu_ctl.counters())
    Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
