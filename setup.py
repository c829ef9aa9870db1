"""Builds the fused kernels of s2meta_fast as one torch extension, ``s2meta_fast._C``.

Build switches (environment variables):
  S2META_CUDA=0      CPU-only build, even when torch and a CUDA toolkit are present.
  FORCE_CUDA=1       compile the CUDA kernels even when no toolkit is auto-detected
                     (CUDA_HOME must then point at one).
  CUDA_HOME          the toolkit root: the folder holding bin/nvcc and include/cuda.h; one that
                     does not hold both is an error (unless S2META_CUDA=0).
  TORCH_CUDA_ARCH_LIST  GPU architectures; defaults to "8.0;9.0" when no GPU is visible.
  MAX_JOBS           parallel compile jobs (ninja).
"""
from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
BUILD_INFO = ROOT / "s2meta_fast" / "_build_info.py"


def _is_toolkit_root(path: str | None) -> bool:
    return bool(path) and (Path(path) / "bin" / "nvcc").exists() and (Path(path) / "include" / "cuda.h").exists()


def _find_cuda_home() -> str | None:
    """Locates the toolkit root.

    torch guesses CUDA_HOME from the `nvcc` on PATH; where that nvcc is a wrapper script
    (as on our machines) the guess lands one level too high, so we look for the folder that
    really holds bin/nvcc and include/cuda.h before torch's build helpers are imported.
    """
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        if _is_toolkit_root(explicit):
            return explicit
        if os.environ.get("S2META_CUDA", "") == "0":
            return None  # a CPU-only build was asked for; the toolkit is not used
        # A named toolkit that cannot be used must not quietly turn into a CPU-only build.
        missing = [p for p in ("bin/nvcc", "include/cuda.h") if not (Path(explicit) / p).exists()]
        sys.exit(f"s2meta_fast: CUDA_HOME={explicit} is not a CUDA toolkit root (missing {', '.join(missing)}); "
                 "point CUDA_HOME at the folder holding bin/nvcc and include/cuda.h, or set S2META_CUDA=0 "
                 "for a CPU-only build")
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.insert(0, str(Path(os.path.realpath(nvcc)).parent.parent))
        try:  # a wrapper script names the real nvcc inside it
            text = Path(nvcc).read_text(errors="ignore")[:4096]
            for token in text.split():
                if token.endswith("/bin/nvcc"):
                    candidates.insert(0, str(Path(token).parent.parent))
        except OSError:
            pass
    for candidate in candidates:
        if _is_toolkit_root(candidate):
            return str(Path(candidate).resolve())
    return None


def _want_cuda(torch_has_cuda: bool, cuda_home: str | None) -> bool:
    if os.environ.get("S2META_CUDA", "") == "0":
        return False
    if os.environ.get("FORCE_CUDA", "") == "1":
        if not cuda_home:
            sys.exit("s2meta_fast: FORCE_CUDA=1 but no CUDA toolkit found; set CUDA_HOME to the "
                     "folder holding bin/nvcc and include/cuda.h")
        return True
    return torch_has_cuda and cuda_home is not None


cuda_home = _find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # must precede the import of torch.utils.cpp_extension

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

# The stable-ABI floor: torch compiles a py_limited_api extension with -DPy_LIMITED_API set to its
# own minimum CPython (older torch sets none: then the running interpreter's); the wheel's abi3 tag
# must name that same version.
LIMITED_API = int(getattr(cpp_extension, "min_supported_cpython", f"0x03{sys.version_info.minor:02X}0000"), 16)
ABI3_TAG = f"cp{LIMITED_API >> 24}{(LIMITED_API >> 16) & 0xFF}"

with_cuda = _want_cuda(torch.version.cuda is not None, cuda_home)
if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    visible = False
    try:
        visible = torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - a broken driver just means "no GPU visible"
        visible = False
    if not visible:
        # Without a visible GPU torch's arch detection indexes an empty list and crashes.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

cpp_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cpp"))
cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cu")) if with_cuda else []

# -g0 and light headers keep a translation unit at seconds, not tens of seconds, on 2 cores.
# The language standard is torch's choice: passing -std= breaks one torch or another.
# -fopenmp: at::parallel_for is an inline template whose OpenMP pragmas compile into *our* object
# files; without it every CPU kernel silently runs on one thread. The runtime it links is the
# libgomp.so.1 torch has already loaded.
cxx_flags = ["-O3", "-g0", "-fvisibility=hidden", "-fopenmp"]
nvcc_flags = ["-O3", "-Xcompiler=-g0", "-lineinfo", "--expt-relaxed-constexpr"]
macros = [("S2META_WITH_CUDA", "1")] if with_cuda else []
if not hasattr(cpp_extension, "min_supported_cpython"):  # older torch leaves the define to us
    macros.append(("Py_LIMITED_API", hex(LIMITED_API)))

BUILD_INFO.write_text(
    "# Written by setup.py at build time; the import guard compares it with the running torch.\n"
    f"TORCH_VERSION = {torch.__version__!r}\n"
    f"WITH_CUDA = {with_cuda!r}\n"
    f"CUDA_ARCH_LIST = {os.environ.get('TORCH_CUDA_ARCH_LIST', '') if with_cuda else ''!r}\n"
)

ext_cls = CUDAExtension if with_cuda else CppExtension
extension = ext_cls(
    name="s2meta_fast._C",
    sources=cpp_sources + cuda_sources,
    include_dirs=[str(ROOT / "csrc")],
    define_macros=macros,
    extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags} if with_cuda else {"cxx": cxx_flags},
    extra_link_args=["-fopenmp"],
    py_limited_api=True,
)

setup(
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": ABI3_TAG}},
)
