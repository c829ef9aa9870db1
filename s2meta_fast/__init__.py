"""s2meta_fast: the s²Meta meta learner (Du et al., KDD'19) on fused C++/CUDA torch ops.

``s2meta_fast.backend()`` says which kernels are active.
"""
from ._extension import Backend, backend
from . import ops

__version__ = "0.1.0"
__all__ = ["Backend", "backend", "ops", "__version__"]
