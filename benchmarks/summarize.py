"""Prints fused-vs-reference ratios from a pytest-benchmark JSON file.

Usage: python benchmarks/summarize.py bench.json

Benchmarks that differ only in their ``impl`` parameter (reference / compiled / fused / ...) form
one case; each row shows its median and the reference's median divided by it.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def case_key(bench: dict) -> str:
    params = {k: v for k, v in (bench.get("params") or {}).items() if k != "impl"}
    base = bench["name"].split("[", 1)[0]
    return base + "[" + "-".join(str(v) for v in params.values()) + "]"


def main(path: str) -> None:
    with open(path) as handle:
        benchmarks = json.load(handle)["benchmarks"]
    cases = defaultdict(list)
    for bench in benchmarks:
        cases[case_key(bench)].append(bench)
    print(f"{'case':58s} {'impl':16s} {'median':>12s} {'vs reference':>13s}")
    for case, members in sorted(cases.items()):
        reference = next((b for b in members if (b.get("params") or {}).get("impl") == "reference"), None)
        for bench in sorted(members, key=lambda b: b["stats"]["median"]):
            median = bench["stats"]["median"]
            ratio = f"{reference['stats']['median'] / median:12.1f}x" if reference else "             -"
            impl = str((bench.get("params") or {}).get("impl", "?"))
            print(f"{case[:58]:58s} {impl:16s} {median * 1e6:10.1f}us {ratio}")


if __name__ == "__main__":
    main(sys.argv[1])
