"""Builds the C++ extension ``llama_engine._C`` from every source in csrc/.

C++17, OpenMP, -O3. Kernels that use AVX2/AVX-512 carry their own target attributes and
are picked at run time from the CPU's features, so one build runs on any x86-64 machine.
"""
import glob
import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

extra_compile_args = ["-O3", "-fopenmp", "-std=c++17", "-fno-math-errno"]
if os.environ.get("LLAMA_ENGINE_NATIVE", "0") == "1":
    extra_compile_args.append("-march=native")

ext = Pybind11Extension(
    "llama_engine._C",
    sorted(glob.glob("csrc/*.cpp")),
    include_dirs=["csrc"],
    extra_compile_args=extra_compile_args,
    extra_link_args=["-fopenmp"],
    cxx_std=17,
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
