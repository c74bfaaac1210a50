"""Build of afmfast's Cython extensions (every ``csrc/*.pyx`` becomes ``afmfast.<name>``).

Compiler flags: ``-O3 -fopenmp``, and ``-march=native`` because ``pip install .`` compiles
on the machine that will run the code (machines here are AVX2-only or AVX-512, and the
kernels gain from the widest vectors present). A wheel meant for other machines must not
carry ``-march=native``: build it with ``AFMFAST_PORTABLE=1`` (then only the x86-64
baseline is assumed). ``-ffast-math`` is never used: the kernels promise IEEE results that
are bit-identical for a fixed seed and thread count. ``-fno-math-errno`` is: it changes
no result (sqrt of a negative is NaN either way), it only lets GCC turn ``sqrtf`` into a
vector instruction instead of a call that may set errno, which keeps the optimisers'
loops vectorised (AFM k=256 on ml-tag: 0.93x the step time, by
``python bench/ab_builds.py --model afm --k 256 --data mltag --base DIR``).

``AFMFAST_BUILD_ONLY=_reader`` (a comma-separated list of module names) limits an
in-place developer build to some extensions.
"""
import glob
import os

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

compile_args = ["-O3", "-fopenmp", "-fno-math-errno"]
if os.environ.get("AFMFAST_PORTABLE", "") not in ("1", "true", "yes"):
    compile_args.append("-march=native")

only = {name for name in os.environ.get("AFMFAST_BUILD_ONLY", "").split(",") if name}
sources = sorted(glob.glob(os.path.join("csrc", "*.pyx")))
extensions = [
    Extension(
        "afmfast." + os.path.splitext(os.path.basename(src))[0],
        [src],
        include_dirs=[np.get_include(), "csrc"],
        extra_compile_args=compile_args,
        extra_link_args=["-fopenmp"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    for src in sources
    if not only or os.path.splitext(os.path.basename(src))[0] in only
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    ),
)
