"""pytest-benchmark timings of ``afmfast.load_libfm`` (group "reader").

Runs on a synthetic one-hot file generated into pytest's tmp directory (about 20 MB,
LF and CRLF variants) and on the Frappe validation file when ``../shared`` beside the
repository holds it, with 1 thread and with the default (all CPUs available). Each benchmark records ``mb_per_s`` (10^6 bytes per second of the
mean time) in ``extra_info``. Run: ``pytest bench/test_bench_reader.py``.
"""
import os
from pathlib import Path

import pytest

from afmfast.data.libfm import load_libfm
from reader_speed import FRAPPE, make_synthetic, reference_style_load


@pytest.fixture(scope="module", params=["lf", "crlf"])
def synthetic(request, tmp_path_factory):
    crlf = request.param == "crlf"
    path = tmp_path_factory.mktemp("reader") / f"synth_{request.param}.libfm"
    return make_synthetic(path, size_mb=20, crlf=crlf)


def _run(benchmark, fn, path):
    result = benchmark(fn, path)
    benchmark.extra_info["file"] = Path(path).name
    benchmark.extra_info["mb"] = os.path.getsize(path) / 1e6
    if benchmark.stats is not None:
        benchmark.extra_info["mb_per_s"] = (os.path.getsize(path) / 1e6
                                            / benchmark.stats.stats.mean)
    return result


def _load(n_threads):
    return lambda path: load_libfm(path, n_threads=n_threads)


@pytest.mark.benchmark(group="reader")
@pytest.mark.parametrize("n_threads", [1, None], ids=["1thread", "allcpus"])
def test_load_libfm_synthetic(benchmark, synthetic, n_threads):
    ds = _run(benchmark, _load(n_threads), synthetic)
    assert ds.max_row_nnz == 10


@pytest.mark.benchmark(group="reader")
@pytest.mark.parametrize("n_threads", [1, None], ids=["1thread", "allcpus"])
@pytest.mark.skipif(not FRAPPE.exists(), reason="research data ../shared absent")
def test_load_libfm_frappe(benchmark, n_threads):
    ds = _run(benchmark, _load(n_threads), FRAPPE)
    assert len(ds) == 57722


@pytest.mark.benchmark(group="reader", min_rounds=3)
@pytest.mark.skipif(not FRAPPE.exists(), reason="research data ../shared absent")
def test_reference_style_python_loader_frappe(benchmark):
    X, Y = _run(benchmark, reference_style_load, FRAPPE)
    assert len(Y) == 57722
