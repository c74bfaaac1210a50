"""Hooks and fixtures of the whole suite: the ``compiled`` marker (skipped when afmfast was
installed without its compiled extensions) and ``backend``, each FM kernel backend module
(tests/kernels and tests/models use it). The helpers the test folders share are the
``helpers`` package beside this file (plain functions and constants, imported by name:
``from helpers.problems import make_problem``)."""
import pytest
from helpers.backends import BACKENDS, HAVE_COMPILED

from afmfast.kernels.backends import get_backend


def pytest_configure(config):
    config.addinivalue_line("markers", "compiled: needs afmfast's compiled (Cython) "
                            "extensions; skipped when afmfast was installed without them")


def pytest_collection_modifyitems(config, items):
    if HAVE_COMPILED:
        return
    skip = pytest.mark.skip(reason="afmfast was installed without its compiled extensions")
    for item in items:
        if item.get_closest_marker("compiled"):
            item.add_marker(skip)


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each available FM kernel backend module (Cython first); AFM's kernel tests have
    their own fixture, ``afm_backend``."""
    return get_backend(request.param)
