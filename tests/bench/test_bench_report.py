"""bench/compare.py's report: the README's tables render from a run's JSON document,
and rewriting them between their markers is idempotent and leaves the rest of the
README alone. A small document written here stands for a run; nothing is measured."""
import importlib
import json

import pytest

from helpers.paths import REPO

BENCH = REPO / "bench"


@pytest.fixture
def readme(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("comparison.readme")


def run(model, k, impl, m1, m2, torch_m=None):
    """A row of a document: medians at 1 and 2 threads, PyTorch / this from torch_m."""
    ratio = None if torch_m is None else {"1": torch_m[0] / m1, "2": torch_m[1] / m2}
    return dict(model=model, k=k, impl=impl, median_s={"1": m1, "2": m2},
                speedup=m1 / m2, pytorch_over_this=ratio)


def compare_doc(quick=False):
    rows = [run("fm", 16, "cython", 0.008, 0.004, (0.1, 0.07)),
            run("fm", 16, "numba", 0.009, 0.005, (0.1, 0.07)),
            run("fm", 16, "pytorch", 0.1, 0.07),
            run("afm", 256, "cython", 1.2, 0.6, (30.0, 20.0)),
            dict(model="afm", k=256, impl="numba", error="failed")]
    return dict(schema="afmfast-compare/1", kind="compare", quick=quick,
                command="python bench/compare.py --json run.json",
                started="2000-01-01 00:00:00", machine=dict(cpu="test CPU, 2 CPUs"),
                configs=[["fm", 16], ["afm", 256]],
                sets=[dict(name="frappe-mini train", runs=rows),
                      dict(name="synthetic ml-tag", runs=rows[:3])])


def load_doc():
    def rows(scale):
        return [dict(model="fm", k=16, impl=label, mean_s=t * scale)
                for label, t in (("afmfast default threads", 0.05), ("afmfast 1 thread", 0.06),
                                 ("PyTorch 2 threads", 0.4))]
    return dict(schema="afmfast-compare/1", kind="load", quick=False,
                command="python bench/compare.py --load 1 --json load.json",
                started="2000-01-01 00:00:00", machine=dict(cpu="test CPU, 2 CPUs"),
                configs=[["fm", 16]],
                phases=[dict(label="quiet", rows=rows(1.0)),
                        dict(label="1 busy loop", rows=rows(1.5))])


def write(tmp_path, name, doc):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


README_TEXT = """# title

Prose before.

<!-- compare:speed:begin -->
| old | table |
|---|---|
<!-- compare:speed:end -->

Prose between, with a | pipe.

<!-- compare:sets:begin -->
<!-- compare:sets:end -->
<!-- compare:load:begin -->
old load table
<!-- compare:load:end -->
Prose after.
"""


def test_tables_render_from_a_document(readme, tmp_path):
    docs = [compare_doc()]
    speed = readme.speed_table(docs)
    assert "| FM k=16 | 0.004 | 0.07 | 17.5x | 2.00x |" in speed
    assert "| AFM k=t=256 | 0.6 | 20 | 33.3x | 2.00x |" in speed
    sets = readme.sets_table(docs)
    # "best" backend: cython is the faster at 2 threads; the failed numba row is skipped
    assert "| FM k=16 | 17.5x | 2.00x | 17.5x | 2.00x |" in sets
    assert "| AFM k=t=256 | 33.3x | 2.00x | - | - |" in sets
    load = readme.load_table([load_doc()])
    assert "| FM k=16 | quiet | 0.05 | 0.06 | 0.83x | 8x |" in load
    assert "| FM k=16 | 1 busy loop | 0.075 | 0.09 | 0.83x | 8x |" in load
    block = readme.render("speed", docs)
    assert "`python bench/compare.py --json run.json`" in block  # the producing command


def test_readme_rewrite_is_idempotent_and_local(readme, tmp_path):
    path = tmp_path / "README.md"
    path.write_text(README_TEXT)
    paths = [write(tmp_path, "run.json", compare_doc()), write(tmp_path, "load.json",
                                                               load_doc())]
    assert sorted(readme.report(paths, readme=path)) == ["load", "sets", "speed"]
    once = path.read_text()
    readme.report(paths, readme=path)
    assert path.read_text() == once
    # outside the markers nothing moved
    def outside(text):
        parts = []
        for name in ("speed", "sets", "load"):
            begin, end = readme.markers(name)
            head, rest = text.split(begin, 1)
            parts.append(head)
            text = rest.split(end, 1)[1]
        return parts + [text]
    assert outside(once) == outside(README_TEXT)
    assert "| old | table |" not in once and "old load table" not in once


def test_only_the_tables_asked_for_and_no_quick_figures(readme, tmp_path):
    path = tmp_path / "README.md"
    path.write_text(README_TEXT)
    run_json = write(tmp_path, "run.json", compare_doc())
    assert readme.report([run_json], names=["sets"], readme=path) == ["sets"]
    assert "| old | table |" in path.read_text()
    quick = write(tmp_path, "quick.json", compare_doc(quick=True))
    with pytest.raises(ValueError, match="quick"):
        readme.report([quick], readme=path)
    with pytest.raises(KeyError):
        readme.rewrite("no markers here", "speed", "x")
