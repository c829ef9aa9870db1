"""s2meta_fast: the s²Meta meta learner (Du et al., KDD'19) on fused C++/CUDA torch ops.

``s2meta_fast.backend()`` says which kernels are active; ``s2meta_fast.Recommender`` turns a
trained meta learner into recommendations for a new scenario (docs/recommend.md).
"""
from ._extension import Backend, backend
from . import ops

__version__ = "0.1.0"
__all__ = ["Backend", "backend", "ops", "Recommender", "__version__"]


def __getattr__(name):
    # lazy: the recommender pulls in pandas and the application layer, which `import s2meta_fast` need not pay for
    if name == "Recommender":
        from .app.recommender import Recommender
        return Recommender
    raise AttributeError(f"module 's2meta_fast' has no attribute {name!r}")
