"""Builds the CUDA kernels of csrc/ops/cuda as host C++ for the emulator (see emu/cuda_emu.h).

Each ``.cu`` file is copied with only the CUDA syntax mapped:
  * ``kernel<<<grid, block, shared, stream>>>(args)`` -> ``s2meta_emu::launch(kernel, grid, block, shared, stream)(args)``;
  * ``extern __shared__ T name[];`` -> the block's dynamic shared buffer, ``__shared__ T name[n];`` -> a per-block
    static buffer;
  * ``TORCH_LIBRARY_IMPL(s2meta, CUDA, m)`` -> a ``s2meta_emu`` library whose ops take CPU tensors.
Launchers, plans and kernel bodies are compiled as written. Two test hooks are woven in by name:
*knobs* turn a few grid caps (``kMax...Blocks...``) into runtime-settable values so the tests reach the
grid-stride paths with small inputs, and *mutants* are deliberately broken variants (a missing barrier,
an off-by-one tail) switched on at run time, to show that the harness catches them; one more,
``ignore_shared_optin``, lives in the emulated runtime (cudaFuncSetAttribute does nothing).

The library is built with AddressSanitizer and UndefinedBehaviorSanitizer, so it must be loaded into a
process started with the ASan runtime preloaded (see ``sanitizer_env``).

Usage: python python_tests/cuda_emu/emu_build.py  -> prints the path of the built library.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
EMU = HERE / "emu"
CSRC = ROOT / "csrc"
KERNELS = CSRC / "ops" / "cuda"
BUILD = ROOT / "build" / "cuda_emu"

CXX = os.environ.get("CXX", "g++")
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize=vptr", "-fno-sanitize-recover=all"]
CXXFLAGS = ["-std=c++20", "-fPIC", "-O1", "-g1", "-fno-omit-frame-pointer", "-D_GLIBCXX_USE_CXX11_ABI=1",
            "-DS2META_CUDA_EMU=1", "-Wno-unused-function", *SANITIZE]

# Grid caps the tests may lower at run time (their values in the source stay the defaults).
KNOBS = ("kMaxForwardBlocksPerSegment", "kMaxBackwardBlocksPerSegment", "kMaxBackwardBlocks")

# name -> (file, text that must occur exactly once, its broken replacement behind the runtime switch)
MUTANTS: Dict[str, Tuple[str, str, str]] = {
    # The forward reads the controller's weights before every thread has copied its share.
    "lstm_forward_missing_barrier": (
        "lstm_update_kernel.cu",
        "load_controller(a, k, sw);\n  __syncthreads();\n  const int H",
        "load_controller(a, k, sw);\n  if (!::s2meta_emu::mutant(\"lstm_forward_missing_barrier\")) __syncthreads();\n"
        "  const int H"),
    # The backward's next tile overwrites the stash while other threads still sum the previous one.
    "lstm_backward_missing_barrier": (
        "lstm_update_kernel.cu",
        "      row[e] += acc;\n    }\n    __syncthreads();",
        "      row[e] += acc;\n    }\n    if (!::s2meta_emu::mutant(\"lstm_backward_missing_barrier\")) __syncthreads();"),
    # The pair strip's first layer is read before it is written.
    "score_matrix_missing_barrier": (
        "score_matrix_kernel.cu",
        "act[0][c * ld[0] + j] = z < T(0) ? T(0) : z;\n  }\n  __syncthreads();",
        "act[0][c * ld[0] + j] = z < T(0) ? T(0) : z;\n  }\n"
        "  if (!::s2meta_emu::mutant(\"score_matrix_missing_barrier\")) __syncthreads();"),
    # The last, partial chunk of triples is never scored.
    "hinge_tail_off_by_one": (
        "hinge_score_kernel.cu",
        "const int64_t chunks = (N + plan.triples - 1) / plan.triples;\n      TORCH_CHECK(S <= 65535, \"hinge_score:",
        "const int64_t chunks = ::s2meta_emu::mutant(\"hinge_tail_off_by_one\") ? N / plan.triples\n"
        "                                                                      : (N + plan.triples - 1) / plan.triples;"
        " TORCH_CHECK(S <= 65535, \"hinge_score:"),
}


def _kernel_start(text: str, end: int) -> int:
    """Start of the kernel expression ending at `end` (a name, maybe qualified, maybe with template args)."""
    i = end
    while i > 0 and text[i - 1].isspace():
        i -= 1
    while i > 0:
        ch = text[i - 1]
        if ch == ">":
            depth = 0
            while i > 0:
                i -= 1
                if text[i] == ">":
                    depth += 1
                elif text[i] == "<":
                    depth -= 1
                    if depth == 0:
                        break
        elif ch.isalnum() or ch in "_:":
            i -= 1
        else:
            break
    return i


def rewrite_launches(text: str) -> str:
    out, pos = [], 0
    while True:
        start = text.find("<<<", pos)
        if start < 0:
            out.append(text[pos:])
            return "".join(out)
        stop = text.find(">>>", start)
        if stop < 0:
            raise ValueError("unterminated <<< in kernel source")
        begin = _kernel_start(text, start)
        kernel = text[begin:start].strip()
        if not kernel:
            raise ValueError(f"no kernel name before <<< at offset {start}")
        config = text[start + 3:stop]
        out.append(text[pos:begin])
        out.append(f"::s2meta_emu::launch({kernel}, {config})")
        pos = stop + 3


_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w:]+(?:\s+[\w:]+)*?)\s+(\w+)\s*\[\s*\]\s*;")
_STATIC_SHARED = re.compile(r"__shared__\s+([\w:]+(?:\s+[\w:]+)*?)\s+(\w+)\s*\[([^\]]+)\]\s*;")
_KNOB = re.compile(r"constexpr\s+(?:int|int64_t)\s+(" + "|".join(KNOBS) + r")\s*=\s*(\d+)\s*;")


def rewrite(name: str, text: str) -> str:
    """The host-C++ form of kernel file `name` (line numbers kept, so __FILE__:__LINE__ point at the .cu)."""
    for mutant, (file, anchor, broken) in MUTANTS.items():
        if file == name:
            count = text.count(anchor)
            if count != 1:
                raise ValueError(f"mutant {mutant}: expected its anchor once in {file}, found it {count} times; "
                                 "update MUTANTS in python_tests/cuda_emu/emu_build.py")
            if broken.count("\n") != anchor.count("\n"):
                raise ValueError(f"mutant {mutant} changes the line count")
            text = text.replace(anchor, broken)
    text = _KNOB.sub(lambda m: f'const int& {m.group(1)} = ::s2meta_emu::knob("{m.group(1)}", {m.group(2)});', text)
    text = _EXTERN_SHARED.sub(lambda m: f"{m.group(1)}* {m.group(2)} = static_cast<{m.group(1)}*>(::s2meta_emu::dynamic_shared());", text)
    text = _STATIC_SHARED.sub(
        lambda m: f"{m.group(1)}* {m.group(2)} = static_cast<{m.group(1)}*>(::s2meta_emu::static_shared(__FILE__, __LINE__, "
                  f"sizeof({m.group(1)}) * ({m.group(3)})));", text)
    text = rewrite_launches(text)
    marker = "TORCH_LIBRARY_IMPL(s2meta, CUDA, m)"
    at = text.find(marker)
    if at < 0:
        raise ValueError(f"{name}: no {marker} block; the emulator registers the ops it finds there")
    head, tail = text[:at], text[at + len(marker):]
    text = head + "TORCH_LIBRARY_FRAGMENT(s2meta_emu, m)" + tail.replace("m.impl(", "m.def(")
    return f'#line 1 "{(KERNELS / name).relative_to(ROOT)}"\n' + text


def _torch_paths() -> Tuple[List[str], List[str]]:
    from torch.utils.cpp_extension import include_paths, library_paths
    return include_paths(), library_paths()


def _digest(paths) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p).encode())
        h.update(Path(p).read_bytes())
    return h.hexdigest()


def build(jobs: int | None = None, verbose: bool = False) -> Path:
    """Compiles (only what changed) and links the emulated kernels; returns the library's path."""
    includes, libs = _torch_paths()
    BUILD.mkdir(parents=True, exist_ok=True)
    flags = CXXFLAGS + [f"-I{EMU / 'include'}", f"-I{EMU}", f"-I{CSRC}"]
    flags += [f"-isystem{p}" for p in includes] + ["-include", str(EMU / "cuda_emu.h")]
    headers = [p for p in CSRC.rglob("*") if p.suffix in (".h", ".cuh")] + [p for p in EMU.rglob("*.h")]
    base = hashlib.sha256((_digest(headers) + " ".join(flags) + CXX).encode()).hexdigest()

    units = []
    for cu in sorted(KERNELS.glob("*.cu")):
        src = BUILD / (cu.stem + ".emu.cpp")
        text = rewrite(cu.name, cu.read_text())
        if not src.exists() or src.read_text() != text:
            src.write_text(text)
        units.append(src)
    units.append(EMU / "runtime.cpp")

    def compile_one(src: Path) -> Path:
        obj = BUILD / (src.stem + ".o")
        key = hashlib.sha256((base + src.read_text()).encode()).hexdigest()
        stamp = obj.with_suffix(".key")
        if obj.exists() and stamp.exists() and stamp.read_text() == key:
            return obj
        cmd = [CXX, *flags, "-c", str(src), "-o", str(obj)]
        if verbose:
            print(" ".join(cmd), file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"cuda_emu: compiling {src.name} failed:\n{done.stderr[-20000:]}")
        stamp.write_text(key)
        return obj

    jobs = jobs or int(os.environ.get("MAX_JOBS", "2"))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        objects = list(pool.map(compile_one, units))
    lib = BUILD / "libs2meta_cuda_emu.so"
    link = [CXX, "-shared", *SANITIZE, "-o", str(lib), *map(str, objects)]
    link += [f"-L{p}" for p in libs] + [f"-Wl,-rpath,{p}" for p in libs] + ["-lc10", "-ltorch_cpu", "-ltorch"]
    if not lib.exists() or any(o.stat().st_mtime > lib.stat().st_mtime for o in objects):
        done = subprocess.run(link, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"cuda_emu: linking failed:\n{done.stderr[-20000:]}")
    return lib


def sanitizer_env(base: Dict[str, str] | None = None) -> Dict[str, str]:
    """Environment for a process that loads the library: the ASan runtime first, leak checks off
    (the interpreter keeps its allocations), any sanitizer report fatal."""
    preload = []
    for name in ("libasan.so", "libstdc++.so"):
        path = subprocess.run([CXX, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        if not path or not Path(path).exists():
            raise RuntimeError(f"cuda_emu: {CXX} names no {name} ({path!r}); install the compiler's runtime libraries")
        preload.append(str(Path(path).resolve()))
    env = dict(os.environ if base is None else base)
    # libstdc++ right after the ASan runtime: python itself does not link it, and ASan's
    # __cxa_throw interceptor must find it at start-up or the first C++ exception aborts.
    env["LD_PRELOAD"] = " ".join(preload)
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=1:detect_stack_use_after_return=0:allocator_may_return_null=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    return env


if __name__ == "__main__":
    print(build(verbose="-v" in sys.argv))
