"""The profiling tools that docs/distributed.md's ml-tag analysis quotes: the memory
probe bench/random_lines.c builds and reads sensible figures (random lines, the
batch-order copy, an FM batch's table traffic), and bench/profile_phases.py profiles a
training read from a store (``--store``) of the plain FM (``--plain``)."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from helpers.paths import REPO

BENCH = REPO / "bench"


@pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")
def test_random_lines_builds_and_reads_latency_above_throughput(tmp_path):
    binary = tmp_path / "random_lines"
    subprocess.run([os.environ.get("CC", "cc"), "-O2", "-Wall", "-Werror",
                    str(BENCH / "random_lines.c"), "-o", str(binary), "-lm"], check=True)
    out = subprocess.run([str(binary), "8"], capture_output=True, text=True, check=True,
                         timeout=120).stdout
    chase, independent = map(float, re.search(
        r"8 MiB: chase_ns +([\d.]+) +independent_ns +([\d.]+)", out).groups())
    # a dependent load waits for the one before; independent ones overlap
    assert 0.5 < independent < chase < 10_000
    alone, polluted = map(float, re.search(
        r"copy: ([\d.]+) ns/row alone, ([\d.]+) ns/row between", out).groups())
    assert 0 < alone and 0 < polluted < 10_000
    loads, distinct, updates = re.search(
        r"V rows loaded ([\d.]+) ms a batch, V and accumulator rows of (\d+) distinct ids "
        r"updated ([\d.]+) ms", out).groups()
    # 12,288 draws over ml-tag's skewed fields repeat about a third of the ids
    assert 6000 < int(distinct) < 10000 and float(loads) > 0 and float(updates) > 0
    # and the two layouts weighed against it, each its own figures
    for variant in ("distinct ids sorted first", "V and accumulator interleaved"):
        loads, distinct, updates = re.search(
            rf"rows \({variant}\): V rows loaded ([\d.]+) ms a batch, V and accumulator "
            rf"rows of (\d+) distinct ids updated ([\d.]+) ms", out).groups()
        assert 6000 < int(distinct) < 10000 and float(loads) > 0 and float(updates) > 0


def test_profile_phases_from_a_store_of_the_plain_fm():
    out = subprocess.run(
        [sys.executable, str(BENCH / "profile_phases.py"), "--model", "fm", "--data",
         "mltag", "--rows", "30000", "--epochs", "2", "--threads", "1", "--store",
         "--plain"], capture_output=True, text=True, check=True, timeout=300).stdout
    assert "no batch norm or dropout; from a store" in out
    row = out.strip().splitlines()[-1].split()
    # threads, p10, median and the six phases, each a positive number of milliseconds
    assert row[0] == "1" and len(row) == 9
    assert all(float(v) >= 0 for v in row[1:]) and float(row[2]) > 0


def test_profile_phases_with_rows_in_runs():
    out = subprocess.run(
        [sys.executable, str(BENCH / "profile_phases.py"), "--model", "fm", "--data",
         "mltag", "--rows", "30000", "--epochs", "2", "--threads", "1", "--store",
         "--plain", "--shuffle-unit", "64"], capture_output=True, text=True, check=True,
        timeout=300).stdout
    assert "from a store; runs of 64 rows" in out
    assert float(out.strip().splitlines()[-1].split()[2]) > 0


def test_shuffle_unit_bench_compares_units_side_by_side():
    out = subprocess.run(
        [sys.executable, str(BENCH / "shuffle_unit.py"), "--data", "mltag", "--rows",
         "40000", "--units", "1", "8", "--reps", "2", "--epochs", "2"],
        capture_output=True, text=True, check=True, timeout=300).stdout
    rows = [line for line in out.splitlines() if line.startswith("ml-tag 40,000 rows")]
    # two settings x two units; unit 1 is the base of the ratios
    assert len(rows) == 4
    for line in rows:
        unit, seconds, ratio = re.split(r"\s{2,}", line.strip())[1:4]
        assert float(seconds) > 0 and ratio.endswith("x")
        if unit == "1":
            assert ratio == "1.000x"


def test_shuffle_unit_bench_on_two_dask_workers():
    pytest.importorskip("distributed")
    out = subprocess.run(
        [sys.executable, str(BENCH / "shuffle_unit.py"), "--data", "mltag", "--rows",
         "40000", "--units", "1", "8", "--reps", "1", "--epochs", "1", "--dask", "64"],
        capture_output=True, text=True, check=True, timeout=600).stdout
    rows = [line for line in out.splitlines() if "2 Dask workers, sync_every 64" in line]
    assert len(rows) == 4
    assert all(float(re.split(r"\s{2,}", line.strip())[2]) > 0 for line in rows)
