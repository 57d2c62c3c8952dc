"""`from vlm2vec_rt import tiling`: the public face of the C++ image tiling (API.md).

A re-export of `vlm2vec_rt.preprocess.tiling`, where the functions and their documentation live.
"""

from .preprocess import tiling as _impl
from .preprocess.tiling import *  # noqa: F403

__all__ = list(_impl.__all__)
