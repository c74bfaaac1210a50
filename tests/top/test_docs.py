"""The documentation stays true: the examples in the public docstrings run (doctest), every
public name and method has an ``Examples`` section, and the README's table of estimator
options lists every constructor and ``fit`` argument with its real default."""
import doctest
import importlib
import importlib.util
import inspect
import re

import pytest
from helpers.paths import README

import afmfast

# Modules whose docstring examples run here; together they define the whole public API.
MODULES = ["afmfast", "afmfast.models.fm", "afmfast.models.afm", "afmfast.demo",
           "afmfast.data.encoding", "afmfast.plotting", "afmfast.data.dataset",
           "afmfast.data.libfm", "afmfast.models.base", "afmfast.models.persistence",
           "afmfast.metrics", "afmfast.kernels.dispatch", "afmfast.kernels.backends",
           "afmfast.models.training", "afmfast.data.store", "afmfast.data.hashing",
           "afmfast.models.epoch_order", "afmfast.data.hashed_frames",
           "afmfast.dask.averaging", "afmfast.dask.estimators"]
# Optional packages (the [test] extra) that a module's examples use.
NEEDS = {"afmfast.data.encoding": "pandas", "afmfast.data.hashed_frames": "pandas",
         "afmfast.plotting": "matplotlib", "afmfast.data.dataset": "scipy",
         "afmfast.dask.averaging": "distributed", "afmfast.dask.estimators": "distributed"}
# Dunder methods that are public API (indexing); other dunders are not checked.
PUBLIC_DUNDERS = {"__getitem__", "__call__", "__iter__"}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def public_api():
    """{qualified name: object} of the public API: the names ``afmfast`` exports, the
    public functions and classes defined in ``MODULES``, and the public methods and
    properties those classes define or inherit from afmfast classes."""
    found = {f"afmfast.{n}": getattr(afmfast, n) for n in afmfast.__all__
             if n != "__version__"}
    for name in MODULES[1:]:
        if name in NEEDS and importlib.util.find_spec(NEEDS[name]) is None:
            continue  # an optional extra that is not installed
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if not attr.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj)) \
                    and obj.__module__ == name:
                found[f"{name}.{attr}"] = obj
    for obj in list(found.values()):
        if not inspect.isclass(obj):
            continue
        for klass in obj.__mro__:
            if not klass.__module__.startswith("afmfast"):
                continue  # e.g. scikit-learn's mixins: documented there
            for attr, member in vars(klass).items():
                if attr.startswith("_") and attr not in PUBLIC_DUNDERS:
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if inspect.isfunction(member) or isinstance(member, property):
                    found[f"{klass.__module__}.{klass.__qualname__}.{attr}"] = member
    return found


def test_public_api_is_found():
    api = public_api()
    for name in ["afmfast.FM", "afmfast.models.base.FactorizationModel.fit",
                 "afmfast.models.base.BinaryClassifier.predict_proba",
                 "afmfast.models.afm.AFM.explain", "afmfast.data.dataset.Dataset.__getitem__",
                 "afmfast.data.dataset.Dataset.from_csr", "afmfast.data.encoding.FeatureMap.fields",
                 "afmfast.metrics.auc", "afmfast.demo.make_demo_data", "afmfast.load",
                 "afmfast.Attention"]:
        assert name in api


def test_every_public_name_has_an_example():
    missing = sorted(name for name, obj in public_api().items()
                     if not re.search(r"^Examples\n--------\n(.*\n)*>>> ",
                                      inspect.getdoc(obj) or "", re.M))
    assert not missing, f"public names without an 'Examples' section: {missing}"


def test_every_public_name_lives_in_a_doctested_module():
    # the examples checked above are also run: their classes and functions are defined
    # in a module of MODULES
    for name, obj in public_api().items():
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__ in MODULES, name


def readme_table(first_header):
    """Rows (lists of cells) of the README table whose header starts with
    ``| first_header |``."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines)
                 if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def signature_defaults(func):
    return {name: p.default for name, p in inspect.signature(func).parameters.items()
            if name != "self"}


def test_readme_option_table_matches_the_constructors():
    fm, afm = signature_defaults(afmfast.FM), signature_defaults(afmfast.AFM)
    assert signature_defaults(afmfast.FMClassifier) == fm  # "take exactly the arguments"
    assert signature_defaults(afmfast.AFMClassifier) == afm
    rows = {row[0].strip("`"): row for row in readme_table("option")}
    assert sorted(rows) == sorted(set(fm) | set(afm)), "the table lists other arguments"
    for option, row in rows.items():
        for defaults, cell in ((fm, row[1]), (afm, row[2])):
            expected = f"`{defaults[option]!r}`" if option in defaults else "-"
            assert cell == expected, f"README option {option}: {cell} != {expected}"


def test_readme_fit_table_matches_fit():
    fit = signature_defaults(afmfast.FM.fit)
    for model in (afmfast.AFM, afmfast.FMClassifier, afmfast.AFMClassifier):
        assert signature_defaults(model.fit) == fit
    rows = {row[0].strip("`"): row for row in readme_table("fit argument")}
    assert sorted(rows) == sorted(fit)
    for name, default in fit.items():
        expected = "required" if default is inspect.Parameter.empty else f"`{default!r}`"
        assert rows[name][1] == expected, name
