"""The examples in the public docstrings run (doctest, on the installed package)."""
import doctest
import importlib

import pytest

MODULES = ["afmfast", "afmfast.fm", "afmfast.afm", "afmfast.demo", "afmfast.encoding",
           "afmfast.plotting", "afmfast.dataset", "afmfast.estimator", "afmfast.persistence"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    if name in ("afmfast.encoding",):
        pytest.importorskip("pandas")
    if name == "afmfast.plotting":
        pytest.importorskip("matplotlib")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
