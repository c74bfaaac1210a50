"""Which build of the compiled extensions this process runs, and how afmfast was built.

``setup.py`` compiles the kernels (``afmfast._fm_cython``, ``afmfast._afm_cython``) once
per instruction-set level into ``afmfast/_isa/<level>/``, and records the levels of every
extension and the compiler flags of each level in ``afmfast/_build_config.py``. This
module, imported first by ``afmfast/__init__.py``, picks for each extension the best
level that was built and that this CPU supports, and installs an import hook so that
``import afmfast._fm_cython`` (and ``from afmfast import _afm_cython``, ...) loads that
file: the rest of afmfast, the tests and the benchmarks import the extensions by their
usual names. The levels, best first:

    native     the one level of an ``AFMFAST_NATIVE=1`` build (-march=native)
    avx512     -march=x86-64-v4: needs AVX-512 F, BW, CD, DQ and VL
    avx2       -march=x86-64-v3: needs AVX, AVX2, FMA, BMI1, BMI2, F16C, LZCNT, MOVBE
               and the x86-64-v2 features
    baseline   no -march flag: any CPU of the platform

The CPU's features come from ``afmfast._cpu`` (CPUID, and XGETBV for whether the OS
saves the AVX and AVX-512 registers); without that extension only baseline (and native)
count as supported.

``AFMFAST_ISA`` (``native``, ``avx512``, ``avx2`` or ``baseline``; empty or ``auto``: the
best level) forces a level, to test or compare levels: every extension loads the best
level built at or below it (the reader has no avx512 build, so it loads avx2 then). A
level this CPU lacks gives a ``RuntimeWarning`` at ``import afmfast`` and the automatic
choice (loading code for instructions the CPU lacks would kill the process); so do
kernels not built at the level (then they load the best level below it, or the best
there is). Any other value raises ``ValueError`` at import.
"""
import importlib.abc
import importlib.machinery
import importlib.util
import os
import platform
import sys
import warnings
from pathlib import Path

LEVELS = ("native", "avx512", "avx2", "baseline")  # best first
_V2 = ("cmpxchg16b", "lahf_lm", "popcnt", "sse3", "ssse3", "sse4.1", "sse4.2")
_V3 = _V2 + ("avx", "avx2", "bmi", "bmi2", "f16c", "fma", "lzcnt", "movbe")
LEVEL_FEATURES = {
    "native": (),  # compiled for the machine that builds it, which is the one that runs it
    "avx512": _V3 + ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
    "avx2": _V3,
    "baseline": (),
}
KERNELS = ("_fm_cython", "_afm_cython")  # their level is build_info()'s "kernel_isa"
ENV = "AFMFAST_ISA"
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the afmfast package: _isa/ is there


def cpu_features():
    """The instruction-set features of this CPU that the OS enables (GCC's names), as a
    frozenset; empty off x86 or when the probe ``afmfast._cpu`` is not built.

    Examples
    --------
    >>> cpu_features() <= frozenset(LEVEL_FEATURES["avx512"])  # the features it probes
    True
    """
    try:
        from afmfast import _cpu
    except ImportError:
        return frozenset()
    return frozenset(_cpu.features())


def supported_levels(features=None):
    """The levels a CPU with ``features`` (default: this one's) can run, best first.

    Examples
    --------
    >>> supported_levels({"avx512f"})  # AVX-512 without AVX2 and the rest: not x86-64-v4
    ('native', 'baseline')
    """
    features = cpu_features() if features is None else set(features)
    return tuple(level for level in LEVELS if set(LEVEL_FEATURES[level]) <= features)


def built_levels():
    """{extension name: levels it was built at} from ``afmfast/_build_config.py``; empty
    for a build without that record (made before levels existed) or none at all.

    Examples
    --------
    >>> all(set(levels) <= set(LEVELS) for levels in built_levels().values())
    True
    """
    try:
        from afmfast import _build_config
    except ImportError:
        return {}
    return dict(_build_config.LEVELS)


def compile_args(level):
    """The compiler flags of ``level`` in this build, or None when not recorded.

    Examples
    --------
    >>> compile_args("no-such-level") is None
    True
    """
    try:
        from afmfast import _build_config
    except ImportError:
        return None
    args = _build_config.COMPILE_ARGS.get(level)
    return None if args is None else list(args)


def module_file(name, level, package_dir=PACKAGE_DIR):
    """The shared object of extension ``name`` at ``level`` under ``package_dir``
    (``<package_dir>/_isa/<level>/<name><suffix>``), or None when it is not there.

    Examples
    --------
    >>> module_file("_fm_cython", "no-such-level") is None
    True
    """
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = Path(package_dir) / "_isa" / level / (name + suffix)
        if path.is_file():
            return path
    return None


def forced_level(environ=None):
    """The level ``AFMFAST_ISA`` asks for, or None for the automatic choice.

    Examples
    --------
    >>> forced_level({"AFMFAST_ISA": "AVX2"}), forced_level({})
    ('avx2', None)
    """
    environ = os.environ if environ is None else environ
    value = environ.get(ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in LEVELS:
        raise ValueError(f"{ENV}={environ[ENV]!r} is not an instruction-set level: use one "
                         f"of {', '.join(LEVELS)}, or auto (or leave it unset)")
    return value


def choose(levels, package_dir=PACKAGE_DIR, features=None, environ=None):
    """{extension name: (level, path)} of the builds to load, for ``levels`` as
    ``built_levels()`` gives them; extensions with no usable file are left out.
    Warns (RuntimeWarning) when ``AFMFAST_ISA`` cannot be honoured.

    Examples
    --------
    >>> choose({}, features=())
    {}
    """
    features = cpu_features() if features is None else frozenset(features)
    supported = supported_levels(features)
    cap = forced_level(environ)
    if cap is not None and cap not in supported:
        missing = sorted(set(LEVEL_FEATURES[cap]) - features)
        warnings.warn(f"afmfast: {ENV}={cap} ignored: this CPU lacks {', '.join(missing)}; "
                      "using the best level it supports", RuntimeWarning, stacklevel=2)
        cap = None
    chosen, unbuilt = {}, []
    for name, built in levels.items():
        usable = [(level, path) for level in LEVELS if level in built and level in supported
                  for path in [module_file(name, level, package_dir)] if path is not None]
        if not usable:
            continue
        capped = [item for item in usable if cap is None
                  or LEVELS.index(item[0]) >= LEVELS.index(cap)]
        chosen[name] = (capped or usable)[0]
        if cap is not None and name in KERNELS and chosen[name][0] != cap:
            unbuilt.append(name)
    if unbuilt:
        warnings.warn(f"afmfast: {ENV}={cap}: {', '.join(unbuilt)} not built at that level; "
                      f"loading {', '.join(chosen[name][0] for name in unbuilt)}",
                      RuntimeWarning, stacklevel=2)
    return chosen


class _Finder(importlib.abc.MetaPathFinder):
    """Finds ``afmfast.<name>`` at the file dispatch chose for it."""

    def __init__(self, files):
        self.files = files

    def find_spec(self, fullname, path=None, target=None):
        file = self.files.get(fullname)
        return None if file is None else importlib.util.spec_from_file_location(fullname,
                                                                                 file)


def _install():
    """Choose the builds and hook them into the import system (once; again after a
    reload of afmfast, replacing the earlier hook). Returns the choice."""
    chosen = choose(built_levels())
    sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "_Finder"
                        or type(f).__module__ != __name__]
    sys.meta_path.insert(0, _Finder({f"afmfast.{name}": str(path)
                                     for name, (_, path) in chosen.items()}))
    return chosen


CHOSEN = _install()


def kernel_isa():
    """The level of the kernels this process loads ("native", "avx512", "avx2" or
    "baseline"), or None when they are not built or come from a build without levels.

    Examples
    --------
    >>> kernel_isa() in LEVELS + (None,)
    True
    """
    levels = {CHOSEN[name][0] for name in KERNELS if name in CHOSEN}
    return levels.pop() if len(levels) == 1 else None


def version_text():
    """The line ``afmfast --version`` prints: the version and the kernels' level ("unknown"
    when they are not built or come from a build without levels).

    Examples
    --------
    >>> version_text()  # doctest: +ELLIPSIS
    'afmfast ... (kernel ISA: ...)'
    """
    from afmfast._version import __version__

    return f"afmfast {__version__} (kernel ISA: {kernel_isa() or 'unknown'})"


def build_info():
    """How this installation of afmfast was built and what it runs here.

    Returns
    -------
    dict
        ``version`` (str); ``kernel_isa`` (str or None, see ``kernel_isa``);
        ``compile_args`` (list of str or None: the compiler flags of that level);
        ``backends`` ({"fm": [...], "afm": [...]}: the backends that import, Cython
        first); ``openmp`` ({"enabled": bool, "max_threads": int or None}: whether the
        Cython kernels were compiled with OpenMP, and ``omp_get_max_threads()`` of their
        runtime); ``cpu_features`` (sorted list of str); ``supported_isa`` and
        ``built_isa`` (levels, best first); ``modules`` ({extension: file loaded});
        ``compiler`` (str or None); ``machine`` (``platform.machine()``).

    Examples
    --------
    >>> import afmfast
    >>> info = afmfast.build_info()
    >>> info["kernel_isa"] in ("native", "avx512", "avx2", "baseline", None)
    True
    """
    from afmfast._version import __version__
    from afmfast.kernels import backends
    from afmfast.kernels import threads

    isa = kernel_isa()
    args = None if isa is None else compile_args(isa)
    available = {model: backends.available_backends(model) for model in backends.MODELS}
    cython = all("cython" in names for names in available.values())
    try:
        from afmfast import _cpu
        compiler = _cpu.compiler
    except ImportError:
        compiler = None
    built = {level for levels in built_levels().values() for level in levels}
    max_threads = threads._openmp_max_threads() if cython else None
    return {
        "version": __version__,
        "kernel_isa": isa,
        "compile_args": args,
        "backends": available,
        # a build without recorded flags: its kernels have OpenMP if they can query it
        "openmp": {"enabled": cython and ("-fopenmp" in args if args is not None
                                          else max_threads is not None),
                   "max_threads": max_threads},
        "cpu_features": sorted(cpu_features()),
        "supported_isa": list(supported_levels()),
        "built_isa": [level for level in LEVELS if level in built],
        "modules": {name: str(path) for name, (_, path) in CHOSEN.items()},
        "compiler": compiler,
        "machine": platform.machine(),
    }
