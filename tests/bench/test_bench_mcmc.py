"""bench/mcmc_frappe.py's libFM side: the split it writes reads back as the same rows
(with LF line ends: libFM refuses CRLF), and a libFM run is parsed for its last test
RMSE and its per-iteration time (a stand-in binary that records its arguments plays
libFM, so no libFM build is needed)."""
import importlib.util
import json
import stat
import sys

import numpy as np
import pytest

import afmfast
from helpers.paths import REPO

BENCH = REPO / "bench" / "mcmc_frappe.py"

FAKE_LIBFM = """#!{python}
import json, sys
args = sys.argv[1:]
opts = dict(zip(args[::2], args[1::2]))
json.dump(args, open(opts["-train"] + ".argv", "w"))
if opts["-seed"] == "13":
    print("cannot read the data")
    sys.exit(1)
with open(opts["-rlog"], "w") as log:
    log.write("rmse\\ttime_learn\\talpha\\n")
    for i, t in enumerate([0.5, 0.25, 0.125]):
        log.write(f"0.9\\t{{t}}\\t1.0\\n")
for i, rmse in enumerate([0.7, 0.6, 0.55]):
    print(f"#Iter={{i:3d}}\\tTrain=0.5\\tTest={{rmse}}")
"""


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_mcmc_frappe", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_written_split_reads_back_as_the_same_rows(tmp_path):
    bench = load_bench()
    data = afmfast.Dataset([0, 2, 3, 5], [4, 1, 0, 2, 7], [1.0, 0.5, 2.0, 1.0, -3.25],
                           [1.0, -1.0, 4.5], 8)
    path = tmp_path / "rows.libfm"
    bench.write_libfm(data, path)
    assert b"\r" not in path.read_bytes()
    back = afmfast.load_libfm(path, n_features=8)
    np.testing.assert_array_equal(back.indptr, data.indptr)
    np.testing.assert_array_equal(back.indices, data.indices)
    np.testing.assert_array_equal(back.values, data.values)
    np.testing.assert_array_equal(back.y, data.y)
    ones = afmfast.Dataset([0, 1], [3], None, [1.0], 4)
    bench.write_libfm(ones, path)
    assert path.read_text() == "1 3:1\n"


@pytest.fixture
def fake_libfm(tmp_path):
    binary = tmp_path / "libFM"
    binary.write_text(FAKE_LIBFM.format(python=sys.executable))
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    return str(binary)


def test_libfm_run_reads_the_last_test_rmse_and_the_median_iteration_time(fake_libfm,
                                                                          tmp_path):
    bench = load_bench()
    train, valid = str(tmp_path / "train.libfm"), str(tmp_path / "valid.libfm")
    rmse, per_iter, wall = bench.libfm_run(fake_libfm, train, valid, 16, 3, 4, tmp_path)
    assert rmse == 0.55 and per_iter == 0.25 and wall > 0
    args = json.load(open(train + ".argv"))
    opts = dict(zip(args[::2], args[1::2]))
    assert opts["-method"] == "mcmc" and opts["-task"] == "r"
    assert opts["-dim"] == "1,1,16" and opts["-iter"] == "3" and opts["-seed"] == "4"
    assert opts["-test"] == valid and opts["-init_stdev"] == "0.1"


def test_libfm_run_that_fails_or_stops_early_is_an_error(fake_libfm, tmp_path):
    bench = load_bench()
    paths = str(tmp_path / "train.libfm"), str(tmp_path / "valid.libfm")
    with pytest.raises(RuntimeError, match="(?s)exited with 1.*cannot read the data"):
        bench.libfm_run(fake_libfm, *paths, 16, 3, 13, tmp_path)
    with pytest.raises(RuntimeError, match="after 3 of 5 iterations"):
        bench.libfm_run(fake_libfm, *paths, 16, 5, 4, tmp_path)
