"""The afmfast command line, end to end on small generated libFM files."""
import os
import subprocess
import sys

import numpy as np
import pytest

from afmfast.cli import main
from afmfast.demo import make_demo_data


def _write_libfm(path, ds):
    lines = []
    for r in range(ds.n_rows):
        lo, hi = ds.indptr[r], ds.indptr[r + 1]
        toks = " ".join(f"{i}:{v:g}" for i, v in zip(ds.indices[lo:hi], ds.values[lo:hi]))
        lines.append(f"{ds.y[r]:.6g} {toks}".rstrip())
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    demo = make_demo_data(n_rows=3000, seed=11)
    (root / "toy").mkdir()
    _write_libfm(root / "toy" / "toy.train.libfm", demo.train[np.arange(2000)])
    _write_libfm(root / "toy" / "toy.validation.libfm", demo.valid)
    _write_libfm(root / "toy" / "toy.test.libfm", demo.train[np.arange(2000, 2400)])
    return root


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


COMMON = ("--epoch", "3", "--hidden_factor", "8", "--batch_size", "256")


def test_train_save_and_evaluate(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(capsys, "fm", "--path", str(data_dir), "--dataset", "toy", *COMMON)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("FM: dataset=toy, factors=8, #epoch=3, batch=256")
    assert sum(line.startswith("Epoch ") for line in lines) == 3
    assert any(line.startswith("Best Iter(validation)= ") for line in lines)
    assert any(line.startswith("Test RMSE: ") for line in lines)
    assert (tmp_path / "pretrain" / "fm_toy_8.npz").exists()
    test_line = [line for line in lines if line.startswith("Test RMSE")][0]

    code, out, err = _run(capsys, "fm", "--process", "evaluate", "--path", str(data_dir),
                          "--dataset", "toy", "--hidden_factor", "8")
    assert code == 0, err
    assert out.strip() == test_line

    # warm start from the pretrain file
    code, out, err = _run(capsys, "fm", "--path", str(data_dir), "--dataset", "toy",
                          *COMMON, "--pretrain", "1", "--epoch", "1")
    assert code == 0, err


def test_named_files_threads_backend_seed_and_save(data_dir, tmp_path, capsys):
    d = data_dir / "toy"
    saved = tmp_path / "m.npz"
    code, out, err = _run(capsys, "fm", "--train", str(d / "toy.train.libfm"),
                          "--validation", str(d / "toy.validation.libfm"), *COMMON,
                          "--pretrain", "0", "--threads", "1", "--backend", "numba",
                          "--seed", "7", "--optimizer", "AdamOptimizer", "--batch_norm", "0",
                          "--keep", "1", "--save", str(saved), "--verbose", "0")
    assert code == 0, err
    assert saved.exists()
    assert not (tmp_path / "pretrain").exists()


@pytest.mark.parametrize("flags,needle", [
    (("--hidden_factor", "0"), "--hidden_factor"),
    (("--keep", "1.5"), "--keep"),
    (("--lr", "-1"), "--lr"),
    (("--optimizer", "Foo"), "--optimizer"),
    (("--threads", "0"), "--threads"),
])
def test_usage_errors_exit_2_with_one_line(data_dir, flags, needle, capsys):
    code, out, err = _run(capsys, "fm", "--path", str(data_dir), "--dataset", "toy", *flags)
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fm", "--epoch", "many"])
    assert exc.value.code == 2


def test_data_errors_exit_1_naming_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.libfm"
    bad.write_text("1 3:1 4:1\n0 5:1 x\n")
    code, out, err = _run(capsys, "fm", "--train", str(bad), "--pretrain", "0", *COMMON)
    assert code == 1
    assert "bad.libfm" in err and "line 2" in err


def test_missing_dataset_exits_1(tmp_path, capsys):
    code, out, err = _run(capsys, "fm", "--path", str(tmp_path), "--dataset", "none")
    assert code == 1 and "none.train.libfm" in err


def test_python_m_afmfast_help():
    res = subprocess.run([sys.executable, "-m", "afmfast", "fm", "--help"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert res.returncode == 0
    assert "--hidden_factor" in res.stdout and "--lamda" in res.stdout


def test_afm_warm_start_from_fm_pretrain_and_mla(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(capsys, "fm", "--path", str(data_dir), "--dataset", "toy",
                          *COMMON, "--verbose", "0")
    assert code == 0, err
    code, out, err = _run(capsys, "afm", "--path", str(data_dir), "--dataset", "toy",
                          "--epoch", "2", "--hidden_factor", "[4,8]", "--batch_size", "256",
                          "--pretrain", "2", "--keep", "[0.9,0.8]", "--mla", "1",
                          "--activation", "tanh", "--valid_dimen", "8")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("AFM: dataset=toy, factors=8, attention=1, attention_size=4")
    assert sum(line.startswith("Epoch ") for line in lines) == 2
    assert any(line.startswith("Best Iter(validation)= ") for line in lines)
    pair_lines = [line for line in lines if line.startswith("  pair (")]
    assert len(pair_lines) == 5 * (8 * 7 // 2)
    assert "attention=" in pair_lines[0] and "interaction=" in pair_lines[0]
    assert (tmp_path / "pretrain" / "afm_toy_8.npz").exists()
    code, out, err = _run(capsys, "afm", "--process", "evaluate", "--path", str(data_dir),
                          "--dataset", "toy", "--hidden_factor", "[4,8]")
    assert code == 0, err
    assert out.startswith("Test RMSE: ")


@pytest.mark.parametrize("flags,needle", [
    (("--hidden_factor", "16"), "--hidden_factor"),
    (("--keep", "[1.0]"), "--keep"),
    (("--keep", "[1.0,0]"), "--keep"),
    (("--batch_norm", "1"), "--batch_norm"),
    (("--activation", "elu"), "--activation"),
])
def test_afm_usage_errors_exit_2(data_dir, flags, needle, capsys):
    try:
        code, out, err = _run(capsys, "afm", "--path", str(data_dir), "--dataset", "toy",
                              *flags)
    except SystemExit as exc:  # argparse rejects it before main's handler
        code, err = exc.code, capsys.readouterr().err
    assert code == 2
    assert needle in err


def test_afm_pretrain_1_without_fm_file_exits_1(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(capsys, "afm", "--path", str(data_dir), "--dataset", "toy",
                          "--pretrain", "1")
    assert code == 1 and "fm_toy_16.npz" in err

