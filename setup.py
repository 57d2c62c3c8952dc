"""Builds the C++ extension vlm2vec_rt._C from csrc/ (pybind11); metadata lives in pyproject.toml."""

from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext_modules = [
    Pybind11Extension(
        "vlm2vec_rt._C",
        sorted(glob("csrc/*.cpp")),
        depends=sorted(glob("csrc/*.h")),
        cxx_std=17,
        # -ffp-contract=off: the resampler's coefficients must round exactly as Pillow's (no fused
        # multiply-add). SIMD kernels are chosen at run time (target attributes), not by -march.
        extra_compile_args=["-O3", "-ffp-contract=off"],
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
