"""Prints fused-vs-reference ratios from a pytest-benchmark JSON file.

Usage: python benchmarks/summarize.py bench.json
Benchmarks in one pytest-benchmark group are compared with the group's member whose name
contains "reference" (the pure-PyTorch path) — the ratio is reference median / this median.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    with open(path) as handle:
        benchmarks = json.load(handle)["benchmarks"]
    groups = defaultdict(list)
    for bench in benchmarks:
        groups[bench.get("group") or bench["name"]].append(bench)
    print(f"{'group':44s} {'benchmark':52s} {'median':>12s} {'vs ref':>8s}")
    for group, members in sorted(groups.items()):
        reference = next((b for b in members if "reference" in b["name"]), None)
        for bench in sorted(members, key=lambda b: b["stats"]["median"]):
            median = bench["stats"]["median"]
            ratio = f"{reference['stats']['median'] / median:7.1f}x" if reference else "      -"
            print(f"{group[:44]:44s} {bench['name'][:52]:52s} {median * 1e6:10.1f}us {ratio}")


if __name__ == "__main__":
    main(sys.argv[1])
