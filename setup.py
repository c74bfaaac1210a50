"""Build of afmfast's compiled extensions: every ``csrc/*.pyx`` becomes ``afmfast.<name>``,
and ``csrc/_cpu.c`` the CPU probe ``afmfast._cpu``. The package itself is ``src/afmfast``
(a src layout: nothing in the repository's root shadows the installed package).

Instruction-set levels. The default build is portable: it runs on any x86-64 CPU and is
fast on new ones. Each module of ``MULTI_LEVEL`` (the kernels and the reader) is compiled
once per level it lists, and ``afmfast.dispatch`` loads, when ``afmfast.<name>`` is first
imported, the best level the CPU supports (``AFMFAST_ISA`` forces one; see that module):

    baseline   no -march flag: the x86-64 ABI (SSE2), every other module, and the only
               level on a CPU that is not x86-64
    avx2       -march=x86-64-v3 (AVX2, FMA, BMI1/2, ...)
    avx512     -march=x86-64-v4 (AVX-512 F/BW/CD/DQ/VL)

``AFMFAST_NATIVE=1`` makes one build of every module with ``-march=native`` instead (level
"native"): for a machine that compiles what it runs, never for a wheel that travels.
``AFMFAST_PORTABLE=1``, the older switch, is accepted and means the default.

A module's levels all compile the one C file Cython generates for it (``csrc/<name>.c``,
for the module name ``afmfast.<name>``, which every level's module then carries) through a
stub ``build/isa_src/<level>/<name>.c`` that includes it, so each level gets its own
object file. The shared objects go to ``afmfast/_isa/<level>/``; the build writes
``afmfast/_build_config.py`` (levels and compiler flags, read by ``afmfast.build_info``).
Every extension is optional: a compiler that does not know a -march level skips that
level, and without a working C compiler with OpenMP (or without Cython, in a build without
isolation) the package installs with no kernels, one warning, and runs on Numba.
``build_ext`` runs one compile job per CPU unless ``-j`` says otherwise.

Compiler flags: ``-O3 -fopenmp``. ``-ffast-math`` is never used: the kernels promise IEEE
results that are bit-identical for a fixed seed and thread count (within a level: the
levels differ in FMA contraction and vector width, so their results agree only to
rounding). ``-fno-math-errno`` is: it changes no result (sqrt of a negative is NaN either
way), it only lets GCC turn ``sqrtf`` into a vector instruction instead of a call that may
set errno, which keeps the optimisers' loops vectorised.

``AFMFAST_BUILD_ONLY=_reader`` (a comma-separated list of module names) limits an
in-place developer build to some extensions.
"""
import glob
import os
import platform
import pprint
import sys

import numpy as np

try:
    from Cython.Build import cythonize
except ImportError:
    cythonize = None
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

COMMON_ARGS = ["-O3", "-fopenmp", "-fno-math-errno"]
X86_LEVEL_ARGS = {"baseline": [], "avx2": ["-march=x86-64-v3"],
                  "avx512": ["-march=x86-64-v4"]}
# The levels of each module built at more than the baseline. The reader has a hand-written
# AVX2 path (its byte counting) and none for AVX-512, so it has no avx512 build.
MULTI_LEVEL = {"_fm_cython": ("baseline", "avx2", "avx512"),
               "_afm_cython": ("baseline", "avx2", "avx512"), "_reader": ("baseline", "avx2")}
DIRECTIVES = {"boundscheck": False, "wraparound": False, "cdivision": True,
              "initializedcheck": False}
STUB_DIR = os.path.join("build", "isa_src")


def _flag(name):
    return os.environ.get(name, "") in ("1", "true", "yes")


def level_args():
    """{level: compiler flags} of this build, best level last."""
    if _flag("AFMFAST_NATIVE"):
        return {"native": COMMON_ARGS + ["-march=native"]}
    if platform.machine().lower() in ("x86_64", "amd64"):
        return {level: COMMON_ARGS + args for level, args in X86_LEVEL_ARGS.items()}
    return {"baseline": list(COMMON_ARGS)}


def stub(level, c_file):
    """The file that compiles ``c_file`` for ``level`` (its own object file)."""
    path = os.path.join(STUB_DIR, level, os.path.basename(c_file))
    text = f'#include "{os.path.abspath(c_file)}"\n'
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.exists(path) or open(path).read() != text:  # keep its mtime otherwise
        with open(path, "w") as fh:
            fh.write(text)
    return path


def kernel_extensions(levels):
    """Cythonize every csrc/*.pyx once; one Extension per (module, level) it is built at.
    Returns the extensions and {module: its levels} (of every module, also those that
    AFMFAST_BUILD_ONLY leaves out: the layout a full build has)."""
    only = {name for name in os.environ.get("AFMFAST_BUILD_ONLY", "").split(",") if name}
    names = [os.path.splitext(os.path.basename(src))[0]
             for src in sorted(glob.glob(os.path.join("csrc", "*.pyx")))]
    built = {name: tuple(level for level in MULTI_LEVEL.get(name, ("baseline",))
                         if level in levels) or tuple(levels) for name in names}
    cythonized = cythonize(
        [Extension("afmfast." + name, [os.path.join("csrc", name + ".pyx")])
         for name in names if not only or name in only],
        language_level=3, compiler_directives=DIRECTIVES)
    extensions = []
    for ext in cythonized:
        name = ext.name.rsplit(".", 1)[1]
        for level in built[name]:
            extensions.append(Extension(
                f"afmfast._isa.{level}.{name}", [stub(level, ext.sources[0])],
                include_dirs=[np.get_include(), "csrc"],
                depends=ext.sources,
                extra_compile_args=levels[level],
                extra_link_args=["-fopenmp"],
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
                optional=True,  # no compiler, no OpenMP: install without it (one warning)
            ))
    return extensions, built


class BuildExt(build_ext):
    """build_ext with one job per CPU by default; writes afmfast/_build_config.py with the
    levels that did build, and warns once when a module built at no level at all."""

    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def run(self):
        build_py = self.get_finalized_command("build_py")
        if self.inplace:  # setuptools copies into afmfast/_isa/<level>/ without making it
            for ext in self.extensions:
                os.makedirs(build_py.get_package_dir(ext.name.rsplit(".", 1)[0]),
                            exist_ok=True)
        super().run()
        built = {name: tuple(level for level in levels if os.path.exists(
                     self.get_ext_fullpath(f"afmfast._isa.{level}.{name}")))
                 for name, levels in BUILT.items()}
        missing = sorted(name for name, levels in built.items() if not levels)
        if missing or not BUILT:
            warn_without_kernels(missing or ["the kernels"], BUILT and
                                 "see the compiler errors above; a C compiler with OpenMP, "
                                 "e.g. gcc, is needed" or "Cython is not installed")
        package = (build_py.get_package_dir("afmfast") if self.inplace
                   else os.path.join(self.build_lib, "afmfast"))
        os.makedirs(package, exist_ok=True)
        with open(os.path.join(package, "_build_config.py"), "w") as fh:
            fh.write('"""Written by setup.py: how the compiled extensions were built."""\n'
                     f"LEVELS = {pprint.pformat({n: v for n, v in built.items() if v})}\n"
                     f"COMPILE_ARGS = {pprint.pformat(LEVEL_ARGS)}\n")


def warn_without_kernels(names, why):
    """The one warning of an install that could not compile (no C compiler, or one
    without OpenMP): the package still installs and runs on its Numba backend."""
    sys.stderr.write(
        "\n" + "=" * 78 + "\nWARNING: afmfast could not compile " + ", ".join(names) +
        f" ({why})."
        "\nafmfast is installed without them: it trains with its Numba backend and reads"
        "\nlibFM files with its Numba reader, which give the same results more slowly."
        "\nTo get the compiled kernels, install gcc and reinstall afmfast."
        "\n" + "=" * 78 + "\n\n")


LEVEL_ARGS = level_args()
if cythonize is None:  # a build without isolation, in an environment without Cython
    EXTENSIONS, BUILT = [], {}
else:
    EXTENSIONS, BUILT = kernel_extensions(LEVEL_ARGS)
# Always (it is small): without it afmfast.dispatch knows no CPU feature and takes baseline.
EXTENSIONS.append(Extension("afmfast._cpu", [os.path.join("csrc", "_cpu.c")], optional=True))

setup(ext_modules=EXTENSIONS, cmdclass={"build_ext": BuildExt})
