"""Registers, stack frames and spills of every CUDA kernel, as ptxas reports them for one architecture.

Compiles each csrc/ops/cuda/*.cu to a cubin with ``-Xptxas -v`` (device code only; minutes on 2 cores,
most of it the host-side parse of the torch headers) and prints a markdown table, the one in
docs/performance.md. Needs a CUDA toolkit, not a GPU.

    CUDA_HOME=/usr/local/cuda-13.0 python benchmarks/ptxas_usage.py [--arch sm_90]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY = re.compile(r"Function properties for (\S+)\n\s+(\d+) bytes stack frame, (\d+) bytes spill stores, "
                   r"(\d+) bytes spill loads\nptxas info\s+: Used (\d+) registers(.*)")


def kernel_name(mangled: str) -> str:
    name = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip() or mangled
    name = re.sub(r"s2meta::\(anonymous namespace\)::", "", name)
    return re.sub(r"\(.*", "", name).replace("void ", "")


def usage(source: Path, arch: str, nvcc: str) -> list:
    from torch.utils.cpp_extension import include_paths
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-cubin", f"-arch={arch}", "-O3", "--expt-relaxed-constexpr", "-std=c++20",
               "-DS2META_WITH_CUDA=1", f"-I{ROOT / 'csrc'}", *[f"-isystem{p}" for p in include_paths()],
               "-Xptxas", "-v", str(source), "-o", str(Path(tmp) / "k.cubin")]
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"nvcc failed on {source.name}:\n{done.stderr[-5000:]}")
    rows = []
    for m in ENTRY.finditer(done.stderr):
        smem = re.search(r"(\d+) bytes smem", m.group(6))
        rows.append((kernel_name(m.group(1)), int(m.group(5)), int(m.group(2)), int(m.group(3)), int(m.group(4)),
                     int(smem.group(1)) if smem else 0))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90")
    args = parser.parse_args()
    nvcc = str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    print("| kernel | registers | stack frame (B) | spill stores (B) | spill loads (B) | static smem (B) |")
    print("|---|---|---|---|---|---|")
    for source in sorted((ROOT / "csrc" / "ops" / "cuda").glob("*.cu")):
        for row in sorted(usage(source, args.arch, nvcc)):
            print("| `%s` | %d | %d | %d | %d | %d |" % row)


if __name__ == "__main__":
    main()
