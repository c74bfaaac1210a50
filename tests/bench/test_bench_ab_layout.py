"""bench/ab_builds.py's interleaved layout (``--interleave``) and the kernel probes of
bench/probes: the layout holds the same values as the separate tables, the compiled FM
kernel refuses it with a clear error instead of reading it wrongly, and each patch that
the probes' README names is there and is a patch git can read."""
import importlib.util
import shutil
import subprocess

import numpy as np
import pytest
from helpers.paths import REPO

from afmfast.kernels import api
from afmfast.kernels.backends import get_backend

BENCH = REPO / "bench"


def load_ab_builds():
    # the script puts its folder on sys.path for its helpers, and bench/compare.py moves
    # it behind site-packages (bench_common.packages_before_bench)
    spec = importlib.util.spec_from_file_location("bench_ab_builds", BENCH / "ab_builds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_interleaved_tables_hold_the_same_values_side_by_side():
    ab = load_ab_builds()
    params = api.new_fm_params(50, 16, np.random.default_rng(0))
    state = api.new_opt_state(params, api.ADAGRAD)
    state.V[1] = 3.0
    p, s = ab.interleaved(params, state)
    np.testing.assert_array_equal(p.V, params.V)
    np.testing.assert_array_equal(s.V, state.V)
    # one table: a feature's V row, then its accumulator row, 2k floats apart row to row
    assert p.V.base is s.V.base is not None
    assert p.V.strides == (32 * 4, 4) and s.V.strides[1:] == (32 * 4, 4)
    assert s.V[0].ctypes.data - p.V.ctypes.data == 16 * 4
    # the other tables are left as they were
    assert p.w is params.w and s.w is state.w and p.dense is params.dense


def test_the_cython_kernel_refuses_the_interleaved_layout_cleanly():
    ab = load_ab_builds()
    try:
        kernels = get_backend("cython", "fm")
    except (ImportError, RuntimeError) as exc:
        pytest.skip(f"no compiled FM kernel: {exc}")
    rng = np.random.default_rng(1)
    n, M, k = 64, 50, 16
    indptr = np.arange(0, 3 * n + 1, 3, dtype=np.int64)
    X = (indptr, rng.integers(0, M, 3 * n).astype(np.int32), np.ones(3 * n, np.float32))
    y = rng.normal(size=n).astype(np.float32)
    params = api.new_fm_params(M, k, rng)
    state = api.new_opt_state(params, api.ADAGRAD)
    p, s = ab.interleaved(params, state)
    ws = kernels.fm_workspace(n, 3 * n, M, k, np.float32)
    cfg = api.StepConfig(lr=0.01, l2=0.0, keep=1.0, optimizer=api.ADAGRAD, batch_norm=0,
                         seed=0, step=0, n_threads=1)
    rows = np.arange(n, dtype=np.int64)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.fm_step(X, y, rows, p, s, cfg, ws)
    # the same tables laid out as the estimators lay them train
    assert np.isfinite(kernels.fm_step(X, y, rows, params, state, cfg, ws))


def test_probe_patches_named_by_the_readme_are_readable_patches():
    readme = (BENCH / "probes" / "README.md").read_text()
    patches = sorted((BENCH / "probes").glob("*.patch"))
    assert patches, "bench/probes has no patch"
    for patch in patches:
        assert f"`{patch.name}`" in readme
        text = patch.read_text()
        assert text.startswith("diff --git a/csrc/") and "\n+++ b/csrc/" in text
        if shutil.which("git"):
            # --numstat parses the whole patch without applying it anywhere
            out = subprocess.run(["git", "apply", "--numstat", str(patch)], cwd=REPO,
                                 capture_output=True, text=True, check=True).stdout
            assert out.strip() and all(line.split()[2].startswith("csrc/")
                                       for line in out.strip().splitlines())
