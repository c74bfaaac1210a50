"""Tests of ``afmfast.build_info``, the choice of instruction-set level
(``afmfast.kernels.dispatch``, ``AFMFAST_ISA``) and ``afmfast --version``.

Each level this CPU supports and this build has runs in its own process (``AFMFAST_ISA``
is read at import): short FM and AFM fits give bit-identical parameters for 1 and 2
threads within a level, and parameters close to the other levels'.
"""
import importlib
import importlib.machinery
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

import afmfast
from afmfast.kernels import dispatch

# the directory holding the afmfast this process imported: the repository (a developer's
# in-place build) or site-packages (an installed one); the subprocesses import the same
HOME = Path(afmfast.__file__).resolve().parent.parent
INFO = afmfast.build_info()
# levels of the kernels that this CPU can run and this build has
RUNNABLE = [level for level in dispatch.LEVELS if level in INFO["supported_isa"]
            and all(level in dispatch.built_levels().get(name, ())
                    and dispatch.module_file(name, level) is not None
                    for name in dispatch.KERNELS)]
needs_levels = pytest.mark.skipif(not RUNNABLE, reason="no kernels built with levels here")

V4 = dispatch.LEVEL_FEATURES["avx512"]
V3 = dispatch.LEVEL_FEATURES["avx2"]


def _start(args, tmp_path, isa=None):
    """Start python with ``args`` in a fresh process outside the repository, importing the
    afmfast this process imported, with AFMFAST_ISA set to ``isa``."""
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HOME),
                                                       os.environ.get("PYTHONPATH")]))}
    env.pop("AFMFAST_ISA", None)
    if isa is not None:
        env["AFMFAST_ISA"] = isa
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)


def _finish(proc, timeout=300):
    """(returncode, stdout, stderr) of a process from ``_start``."""
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _run(args, tmp_path, isa=None):
    return _finish(_start(args, tmp_path, isa))


def test_build_info_has_the_documented_keys_and_types():
    info = afmfast.build_info()
    assert info["version"] == afmfast.__version__
    assert info["kernel_isa"] in dispatch.LEVELS + (None,)
    assert set(info["backends"]) == {"fm", "afm", "mcmc"}
    for names in info["backends"].values():
        assert isinstance(names, list) and set(names) <= {"cython", "numba"}
    assert set(info["openmp"]) == {"enabled", "max_threads"}
    assert isinstance(info["openmp"]["enabled"], bool)
    assert isinstance(info["cpu_features"], list)
    assert all(isinstance(level, str) for level in info["supported_isa"] + info["built_isa"])
    assert isinstance(info["modules"], dict) and isinstance(info["machine"], str)
    if info["kernel_isa"] is not None:
        assert info["compile_args"] == dispatch.compile_args(info["kernel_isa"])
        assert all(isinstance(arg, str) for arg in info["compile_args"])
        assert "cython" in info["backends"]["fm"]
        assert info["openmp"]["enabled"] == ("-fopenmp" in info["compile_args"])
    if info["openmp"]["enabled"]:
        assert isinstance(info["openmp"]["max_threads"], int)
        assert info["openmp"]["max_threads"] >= 1


@needs_levels
def test_dispatch_loads_the_best_level_this_cpu_supports_under_the_usual_names():
    if os.environ.get("AFMFAST_ISA"):
        pytest.skip("AFMFAST_ISA is set")
    assert INFO["kernel_isa"] == RUNNABLE[0]
    assert INFO["kernel_isa"] in INFO["supported_isa"]
    assert set(dispatch.LEVEL_FEATURES[INFO["kernel_isa"]]) <= set(INFO["cpu_features"])
    for name in dispatch.KERNELS:
        module = importlib.import_module(f"afmfast.{name}")
        assert module.__name__ == f"afmfast.{name}"
        assert Path(module.__file__) == dispatch.module_file(name, INFO["kernel_isa"])
        assert getattr(afmfast, name) is module
        assert sys.modules[f"afmfast.{name}"] is module
    if "avx512f" not in INFO["cpu_features"]:
        assert "avx512" not in INFO["supported_isa"]
        assert all(level != "avx512" for level, _ in dispatch.CHOSEN.values())


def test_supported_levels_need_every_feature_of_the_level():
    assert dispatch.supported_levels(V4) == ("native", "avx512", "avx2", "baseline")
    assert dispatch.supported_levels(V3) == ("native", "avx2", "baseline")
    assert dispatch.supported_levels(set(V4) - {"avx512vl"}) == ("native", "avx2", "baseline")
    assert dispatch.supported_levels(set(V3) - {"movbe"}) == ("native", "baseline")
    assert dispatch.supported_levels(()) == ("native", "baseline")


def _fake_build(root, layout):
    """A package directory with empty files where a build of ``layout`` ({name: levels})
    puts its extensions."""
    for name, levels in layout.items():
        for level in levels:
            path = root / "_isa" / level / (name + importlib.machinery.EXTENSION_SUFFIXES[0])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    return layout


def _levels(chosen):
    return {name: level for name, (level, _) in chosen.items()}


def test_choose_takes_the_best_built_level_the_cpu_has(tmp_path):
    layout = _fake_build(tmp_path, {"_fm_cython": ("baseline", "avx2", "avx512"),
                                    "_reader": ("baseline", "avx2")})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _levels(dispatch.choose(layout, tmp_path, V4, {})) == {
            "_fm_cython": "avx512", "_reader": "avx2"}
        assert _levels(dispatch.choose(layout, tmp_path, V3, {})) == {
            "_fm_cython": "avx2", "_reader": "avx2"}
        assert _levels(dispatch.choose(layout, tmp_path, (), {})) == {
            "_fm_cython": "baseline", "_reader": "baseline"}
        # AFMFAST_ISA caps the level; the reader has no avx512 build and takes avx2
        assert _levels(dispatch.choose(layout, tmp_path, V4, {"AFMFAST_ISA": "avx512"})) == {
            "_fm_cython": "avx512", "_reader": "avx2"}
        assert _levels(dispatch.choose(layout, tmp_path, V4, {"AFMFAST_ISA": "Baseline"})) == {
            "_fm_cython": "baseline", "_reader": "baseline"}
        assert _levels(dispatch.choose(layout, tmp_path, V3, {"AFMFAST_ISA": "auto"})) == {
            "_fm_cython": "avx2", "_reader": "avx2"}
    # a level recorded as built but whose file is missing is not loaded
    (tmp_path / "_isa" / "avx2" / ("_fm_cython" + importlib.machinery.EXTENSION_SUFFIXES[0])
     ).unlink()
    assert _levels(dispatch.choose(layout, tmp_path, V3, {})) == {
        "_fm_cython": "baseline", "_reader": "avx2"}
    assert dispatch.choose({"_fm_cython": ("avx2",)}, tmp_path / "none", V3, {}) == {}


def test_afmfast_isa_the_cpu_lacks_warns_and_takes_the_best_it_has(tmp_path):
    layout = _fake_build(tmp_path, {"_fm_cython": ("baseline", "avx2", "avx512")})
    with pytest.warns(RuntimeWarning, match=r"AFMFAST_ISA=avx512 ignored: this CPU lacks "
                      r"avx512bw, avx512cd, avx512dq, avx512f, avx512vl"):
        chosen = dispatch.choose(layout, tmp_path, V3, {"AFMFAST_ISA": "avx512"})
    assert _levels(chosen) == {"_fm_cython": "avx2"}


def test_afmfast_isa_not_built_warns_and_loads_what_was_built(tmp_path):
    layout = _fake_build(tmp_path, {"_fm_cython": ("native",), "_afm_cython": ("native",)})
    with pytest.warns(RuntimeWarning, match="_fm_cython, _afm_cython not built at that "
                      "level; loading native, native"):
        chosen = dispatch.choose(layout, tmp_path, V3, {"AFMFAST_ISA": "avx2"})
    assert _levels(chosen) == {"_fm_cython": "native", "_afm_cython": "native"}


@pytest.mark.parametrize("value", ["avx3", "sse2", "x86-64-v3"])
def test_unknown_afmfast_isa_is_a_value_error_naming_it(value):
    with pytest.raises(ValueError, match=f"AFMFAST_ISA='{value}' is not an instruction-set "
                       "level: use one of native, avx512, avx2, baseline, or auto"):
        dispatch.forced_level({"AFMFAST_ISA": value})


FIT = textwrap.dedent("""
    import sys
    import numpy as np
    import afmfast
    from afmfast.demo import make_demo_data

    data = make_demo_data(n_rows=3000, seed=3)
    out = {"isa": np.array(afmfast.build_info()["kernel_isa"])}
    for threads in (1, 2):
        common = dict(n_factors=8, batch_size=256, n_epochs=2, early_stopping=False,
                      n_threads=threads, adaptive_threads=False, backend="cython",
                      verbose=0)
        for model in (afmfast.FM(keep=0.8, **common),
                      afmfast.AFM(attention_size=8, keep=(1.0, 0.8), **common)):
            model.fit(data.train)
            for key, value in model._arrays().items():
                out[f"{type(model).__name__}.{key}.{threads}"] = value
    np.savez(sys.argv[1], **out)
""")


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    """{level: parameters of the fits in a process that loads that level}."""
    tmp = tmp_path_factory.mktemp("levels")
    script = tmp / "fit.py"
    script.write_text(FIT)
    procs = {level: _start([str(script), str(tmp / f"{level}.npz")], tmp, isa=level)
             for level in RUNNABLE}
    out = {}
    for level, proc in procs.items():
        code, _, err = _finish(proc)
        assert code == 0, err
        assert "RuntimeWarning" not in err, err
        with np.load(tmp / f"{level}.npz") as f:
            out[level] = dict(f)
    return out


@needs_levels
def test_each_level_fits_bit_identically_for_one_and_two_threads(fits):
    for level, arrays in fits.items():
        assert str(arrays.pop("isa")) == level
        one = {k[:-2]: v for k, v in arrays.items() if k.endswith(".1")}
        two = {k[:-2]: v for k, v in arrays.items() if k.endswith(".2")}
        assert one.keys() == two.keys() and len(one) >= 6
        for key in one:
            np.testing.assert_array_equal(one[key], two[key], err_msg=f"{level} {key}")


@needs_levels
def test_levels_agree_within_rounding(fits):
    ref_level, ref = RUNNABLE[-1], fits[RUNNABLE[-1]]
    for level in RUNNABLE[:-1]:
        for key, value in fits[level].items():
            if key != "isa":
                np.testing.assert_allclose(value, ref[key], rtol=1e-3, atol=1e-4,
                                           err_msg=f"{level} vs {ref_level}: {key}")


@needs_levels
def test_version_prints_the_version_and_the_level(tmp_path):
    code, out, err = _run(["-m", "afmfast", "--version"], tmp_path, isa=RUNNABLE[-1])
    assert code == 0, err
    assert out.strip() == f"afmfast {afmfast.__version__} (kernel ISA: {RUNNABLE[-1]})"


@needs_levels
def test_a_level_this_cpu_lacks_is_never_loaded(tmp_path):
    lacking = [level for level in dispatch.LEVELS if level not in INFO["supported_isa"]]
    if not lacking:
        pytest.skip("this CPU supports every level")
    procs = {level: _start(["-c", "import afmfast; print(afmfast.kernels.dispatch.kernel_isa())"],
                           tmp_path, isa=level) for level in lacking}
    for level, proc in procs.items():
        code, out, err = _finish(proc)
        assert code == 0, err
        assert out.strip() == RUNNABLE[0]
        assert f"AFMFAST_ISA={level} ignored: this CPU lacks" in err
