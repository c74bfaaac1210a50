"""The kernel backends that import here and afmfast's compiled extensions."""
import importlib

from afmfast.kernels.backends import available_backends

BACKENDS = available_backends()
# Whether afmfast was installed with its compiled extensions (an install without a C
# compiler has only Numba): tests marked ``compiled`` are skipped without them
# (tests/conftest.py).
HAVE_COMPILED = "cython" in BACKENDS and "cython" in available_backends("afm")


def compiled_module(name):
    """The compiled extension ``name`` (e.g. "afmfast._fm_cython"), or None when afmfast
    was installed without it; a test module that needs it is marked ``compiled``."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None
