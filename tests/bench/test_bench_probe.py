"""bench/compare.py's CPU 0/1 probe: its C source ships with the repository and reads
sensible figures (a probe that failed to build would silently drop the placement column
from every comparison)."""
import importlib.util
import os
import shutil

import pytest

from helpers.paths import REPO

COMPARE = REPO / "bench" / "compare.py"


def load_compare():
    spec = importlib.util.spec_from_file_location("bench_compare", COMPARE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probe_source_is_in_the_repository():
    assert COMPARE.with_name("core_to_core.c").is_file()


@pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the probe needs two CPUs")
def test_probe_builds_and_reads_latency_and_throughput(tmp_path):
    compare = load_compare()
    probe = compare.build_core_probe(tmp_path)
    assert probe is not None
    latency_ns, flops_ratio = compare.core_probe(probe)
    assert 1.0 < latency_ns < 10_000.0
    assert 0.2 < flops_ratio < 2.5
