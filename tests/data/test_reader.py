"""Tests of ``afmfast.load_libfm`` and the native parser ``afmfast._reader``.

They check the reader's contract: accepted layouts (LF, CRLF, missing final newline,
rows without nonzeros, real values, scientific notation, ids as they are, BOM), every
rejected input with its line number in the message, exact agreement with a slow
pure-Python parser of the same grammar on random files and on random bytes (also where
the parser's fast paths apply: short ids and values with at least 32 bytes after them),
independence of the thread count and chunk size, buffers without a byte after their end
(memory maps of page-sized files), and the real Frappe file when ``../shared`` beside
the repository is present (it is research data and never copied into the repository).
"""
import math
import mmap
import os
import re
import threading

import numpy as np
import pytest
from helpers.backends import compiled_module
from helpers.paths import FRAPPE
from hypothesis import given, settings
from hypothesis import strategies as st

from afmfast.data import libfm, libfm_numba
from afmfast.data.dataset import Dataset
from afmfast.data.libfm import load_libfm

# Every test here runs once per parser: the compiled one (when afmfast was built with
# it) and its Numba twin, each held to the reference parser below and to the same
# messages; test_reader_parity.py holds them to each other.
PARSERS = {"numba": libfm_numba}
if compiled_module("afmfast._reader") is not None:
    PARSERS["compiled"] = compiled_module("afmfast._reader")
_reader = PARSERS.get("compiled", libfm_numba)  # set per test by the fixture below


@pytest.fixture(autouse=True, params=sorted(PARSERS))
def parser(request, monkeypatch):
    """The parser under test, as the module's ``_reader`` and as load_libfm's."""
    monkeypatch.setattr(libfm, "_parser", lambda: PARSERS[request.param])
    monkeypatch.setitem(globals(), "_reader", PARSERS[request.param])
    return PARSERS[request.param]


def write(tmp_path, data, name="d.libfm"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def load_bytes(tmp_path, data, **kw):
    return load_libfm(write(tmp_path, data), **kw)


# ---------------------------------------------------------------- slow reference parser

_NUM = re.compile(rb"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\Z")


class RefError(Exception):
    def __init__(self, line, kind):
        super().__init__(f"line {line}: {kind}")
        self.line, self.kind = line, kind


def _num(tok):
    if not _NUM.match(tok):
        return None
    return np.float32(float(tok))


def ref_parse(data, n_features=None):
    """Straightforward parser of the grammar in afmfast._reader's docstring."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if b"\0" in data:
        raise RefError(data.count(b"\n", 0, data.index(b"\0")) + 1, "NUL")
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    indptr, indices, values, y = [0], [], [], []
    limit = 2**31 if n_features is None else n_features
    with np.errstate(over="ignore"):
        for no, line in enumerate(lines, 1):
            if line.endswith(b"\r"):
                line = line[:-1]
            body = line.strip(b" \t")
            if body == b"" or body.startswith(b"\r"):
                raise RefError(no, "EMPTY_LINE")
            if b"\r" in line:
                raise RefError(no, "LONE_CR")
            toks = re.split(rb"[ \t]+", body)
            label = _num(toks[0])
            if label is None:
                raise RefError(no, "LABEL_NAN")
            if not np.isfinite(label):
                raise RefError(no, "LABEL_NONFINITE")
            for tok in toks[1:]:
                ids, colon, val = tok.partition(b":")
                if ids[:1] == b"-" and ids[1:2].isdigit():
                    raise RefError(no, "NEG_ID")
                if ids[:1].isdigit() and int(re.match(rb"\d+", ids).group()) > 2**31 - 1:
                    raise RefError(no, "BIG_ID")
                if not colon:
                    raise RefError(no, "NO_COLON")
                if not ids.isdigit():
                    raise RefError(no, "BAD_ID")
                fid = int(ids)
                if fid >= limit:
                    raise RefError(no, "ID_RANGE")
                v = _num(val)
                if v is None:
                    raise RefError(no, "VALUE_NAN")
                if not np.isfinite(v):
                    raise RefError(no, "VALUE_NONFINITE")
                indices.append(fid)
                values.append(v)
            y.append(label)
            indptr.append(len(indices))
    return (np.array(indptr, np.int64), np.array(indices, np.int32),
            np.array(values, np.float32), np.array(y, np.float32))


def native(data, n_features=None):
    """(arrays, None) or (None, (line, kind)) from the native parser."""
    start = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    limit = 2**31 if n_features is None else n_features
    code, off, indptr, indices, values, y, _ = _reader.parse(data, start, limit)
    if code:
        names = {v: k for k, v in _reader.ERROR_CODES.items()}
        return None, (data.count(b"\n", 0, off) + 1, names[code])
    return (indptr, indices, values, y), None


def assert_same(data, n_features=None, check_kind=True):
    got, err = native(data, n_features)
    try:
        want = ref_parse(data, n_features)
    except RefError as e:
        assert err is not None, f"native accepted what the reference rejects: {e}"
        assert err[0] == e.line, (err, e)
        if check_kind:
            assert err[1] == e.kind, (err, e)
        return
    assert err is None, f"native rejected ({err}) what the reference accepts"
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)


# ---------------------------------------------------------------- good files

def test_lf_crlf_and_final_newline_agree(tmp_path):
    rows = [b"1 3:1 10:0.5", b"-1 0:2", b"0.25 7:1"]
    variants = [b"\n".join(rows) + b"\n", b"\r\n".join(rows) + b"\r\n",
                b"\n".join(rows), b"\r\n".join(rows)]
    for i, data in enumerate(variants):
        ds = load_bytes(tmp_path, data)
        assert isinstance(ds, Dataset)
        np.testing.assert_array_equal(ds.indptr, [0, 2, 3, 4])
        np.testing.assert_array_equal(ds.indices, [3, 10, 0, 7])
        np.testing.assert_array_equal(ds.values, np.float32([1, 0.5, 2, 1]))
        np.testing.assert_array_equal(ds.y, np.float32([1, -1, 0.25]))
        assert ds.n_features == 11, i


def test_dtypes_and_contiguity(tmp_path):
    ds = load_bytes(tmp_path, b"1 3:1\n0 2:1 1:1\n")
    for arr, dt in ((ds.indptr, np.int64), (ds.indices, np.int32),
                    (ds.values, np.float32), (ds.y, np.float32)):
        assert arr.dtype == dt and arr.flags.c_contiguous
    assert ds.max_row_nnz == 2


def test_rows_without_nonzeros(tmp_path):
    ds = load_bytes(tmp_path, b"1\n-1 4:1\n0.5\n2")
    np.testing.assert_array_equal(ds.indptr, [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(ds.y, np.float32([1, -1, 0.5, 2]))
    assert ds.n_features == 5
    ds = load_bytes(tmp_path, b"1\n2\n")
    assert ds.nnz == 0 and ds.n_features == 0 and len(ds) == 2


def test_real_values_and_scientific_notation(tmp_path):
    toks = [b"0.5", b"-2.75", b"1e-3", b"2.5E+2", b".5", b"3.", b"+4", b"-0",
            b"0.1234567890123456789012", b"1e-40", b"123456789012345678901234567890"]
    data = b"".join(b"%s %d:%s\n" % (t, i, t) for i, t in enumerate(toks))
    ds = load_bytes(tmp_path, data)
    want = np.array([np.float32(float(t)) for t in toks], np.float32)
    np.testing.assert_array_equal(ds.values, want)
    np.testing.assert_array_equal(ds.y, want)


def test_one_hot_file_keeps_no_values_and_trains_the_same(tmp_path):
    """A file whose every value is 1 keeps no values array (the kernels read none), its
    ``values`` are still the ones, and FM and AFM train on it exactly as on the same
    rows with the ones given; one other value keeps the array."""
    import afmfast

    rng = np.random.default_rng(0)
    lines = [b"%d %d:1 %d:1 %d:1" % (rng.choice([-1, 1]), a, 10 + b, 20 + c)
             for a, b, c in rng.integers(0, 10, (300, 3))]
    ds = load_bytes(tmp_path, b"\n".join(lines) + b"\n")
    assert ds.X[2].size == 0 and ds.values.dtype == np.float32
    np.testing.assert_array_equal(ds.values, np.ones(ds.nnz, np.float32))
    with_ones = afmfast.Dataset(ds.indptr, ds.indices, np.ones(ds.nnz, np.float32), ds.y,
                                n_features=ds.n_features)
    for make in (lambda: afmfast.FM(n_factors=4, n_epochs=2, batch_size=64, verbose=0),
                 lambda: afmfast.AFM(n_factors=4, attention_size=4, n_epochs=2,
                                     batch_size=64, verbose=0)):
        fits = [make().fit(d) for d in (ds, with_ones)]
        np.testing.assert_array_equal(fits[0].predict(ds), fits[1].predict(with_ones))
    mixed = load_libfm(write(tmp_path, b"\n".join(lines[:-1] + [b"1 0:1 11:0.5"]) + b"\n",
                             name="mixed.libfm"))
    assert mixed.X[2].size == mixed.nnz and mixed.values[-1] == 0.5


def test_ids_used_as_they_are(tmp_path):
    ds = load_bytes(tmp_path, b"1 1000:1 0:1 5:1 5:2\n")
    np.testing.assert_array_equal(ds.indices, [1000, 0, 5, 5])
    assert ds.n_features == 1001
    ds = load_bytes(tmp_path, b"1 2147483647:1\n")
    assert ds.indices[0] == 2**31 - 1 and ds.n_features == 2**31


def test_n_features_given(tmp_path):
    ds = load_bytes(tmp_path, b"1 3:1\n", n_features=100)
    assert ds.n_features == 100
    ds = load_bytes(tmp_path, b"1 3:1\n", n_features=4)
    assert ds.n_features == 4


def test_separators_tabs_and_multiple_spaces(tmp_path):
    ds = load_bytes(tmp_path, b"  1\t3:1   4:2 \t\r\n\t-1  2:1\t\n")
    np.testing.assert_array_equal(ds.indices, [3, 4, 2])
    np.testing.assert_array_equal(ds.y, np.float32([1, -1]))


def test_bom_skipped(tmp_path):
    ds = load_bytes(tmp_path, b"\xef\xbb\xbf1 3:1\n")
    assert len(ds) == 1 and ds.indices[0] == 3


@pytest.mark.parametrize("data", [b"", b"\xef\xbb\xbf"])
def test_empty_file(tmp_path, data):
    ds = load_bytes(tmp_path, data)
    assert len(ds) == 0 and ds.nnz == 0 and ds.n_features == 0
    assert ds.indptr.tolist() == [0] and ds.max_row_nnz == 0
    assert load_bytes(tmp_path, data, n_features=7).n_features == 7


def test_accepts_pathlike_and_str(tmp_path):
    p = write(tmp_path, b"1 3:1\n")
    assert load_libfm(str(p)).nnz == load_libfm(p).nnz == 1


# ---------------------------------------------------------------- bad files

BAD = [
    # (content, line, words expected in the message)
    (b"1 3:1\nabc 3:1\n", 2, "label is not a number"),
    (b"1 3:1\n1 3:1 7\n", 2, "without ':'"),
    (b"1 3:1\r\n1 3:1\r\n-1 -3:1\r\n", 3, "negative feature id"),
    (b"1 3:1\n1 3.5:1\n", 2, "not a non-negative integer"),
    (b"1 3:1\n1 a:1\n", 2, "not a non-negative integer"),
    (b"1 :1\n", 1, "not a non-negative integer"),
    (b"1 3:1\n1 2147483648:1\n", 2, "above 2^31-1"),
    (b"1 3:1\n1 99999999999999999999999:1\n", 2, "above 2^31-1"),
    (b"nan 3:1\n", 1, "label is NaN or infinite"),
    (b"1 3:1\n-inf 3:1\n", 2, "label is NaN or infinite"),
    (b"1e999 3:1\n", 1, "label is NaN, infinite"),
    (b"1 3:1\n1 3:NaN\n", 2, "value is NaN or infinite"),
    (b"1 3:1\n1 3:inf\n", 2, "value is NaN or infinite"),
    (b"1 3:1e39\n", 1, "beyond the float32 range"),
    (b"1 3:abc\n", 1, "value is not a number"),
    (b"1 3:\n", 1, "value is not a number"),
    (b"1 3:1.2.3\n", 1, "value is not a number"),
    (b"1 3:1:2\n", 1, "value is not a number"),
    (b"1 3:1,5\n", 1, "value is not a number"),
    (b"1 3:1\n\n1 3:1\n", 2, "empty line"),
    (b"1 3:1\n   \n", 2, "empty line"),
    (b"1 3:1\n\n", 2, "empty line"),
    (b"\n", 1, "empty line"),
    (b"1 3:1\n2 3:1\r3 3:1\n", 2, "carriage return"),
    (b"1 3:1\n2 3:\x001\n", 2, "NUL"),
    (b"1 3:1\n2 3:1\n\x00", 3, "NUL"),
    (b"1 3:1\n1 1_0:1\n", 2, "not a non-negative integer"),
    (b"1 3:0x10\n", 1, "value is not a number"),
    (b"1_0 3:1\n", 1, "label is not a number"),
]


@pytest.mark.parametrize("data,line,what", BAD)
def test_bad_input_names_file_line_and_problem(tmp_path, data, line, what):
    path = write(tmp_path, data)
    with pytest.raises(ValueError) as info:
        load_libfm(path)
    msg = str(info.value)
    assert str(path) in msg
    assert f"line {line}:" in msg
    assert what in msg


def test_id_at_or_above_given_n_features(tmp_path):
    path = write(tmp_path, b"1 3:1\n1 0:1 9:1\n")
    with pytest.raises(ValueError, match=r"line 2: feature id >= n_features = 9: '9:1'"):
        load_libfm(path, n_features=9)
    assert load_libfm(path, n_features=10).n_features == 10


def test_bad_n_features_argument(tmp_path):
    path = write(tmp_path, b"1 3:1\n")
    with pytest.raises(ValueError, match="n_features"):
        load_libfm(path, n_features=-1)


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nope.libfm"
    with pytest.raises(FileNotFoundError, match="nope.libfm"):
        load_libfm(path)


def test_every_error_code_has_a_message():
    from afmfast.data.libfm import _MESSAGES
    assert set(_reader.ERROR_CODES) == set(_MESSAGES)


def test_line_numbers_far_into_a_file(tmp_path):
    data = b"1 3:1\r\n" * 12345 + b"1 3:x\r\n" + b"1 3:1\r\n" * 10
    with pytest.raises(ValueError, match="line 12346: value is not a number"):
        load_bytes(tmp_path, data)


# ---------------------------------------------------------------- against the reference

def join_lines(rng, lines, crlf):
    """``lines`` joined by CRLF (with probability ``crlf``) or LF, with an end of line
    after the last one 70% of the time."""
    eol = b"\r\n" if rng.random() < crlf else b"\n"
    data = eol.join(lines)
    if rng.random() < 0.7:
        data += eol
    return data


def random_file(rng, n_rows):
    def num():
        kind = rng.integers(6)
        if kind == 0:
            return b"1"
        if kind == 1:
            return b"-1"
        if kind == 2:
            return b"%d" % rng.integers(-1000, 1000)
        if kind == 3:
            return repr(float(rng.normal())).encode()
        if kind == 4:
            return b"%.*e" % (int(rng.integers(0, 20)), rng.normal() * 10.0 ** rng.integers(-30, 30))
        return b"%.*f" % (int(rng.integers(0, 25)), rng.normal())

    def sep():
        return [b" ", b"  ", b"\t", b" \t "][rng.integers(4)]

    lines = []
    for _ in range(n_rows):
        toks = [num()]
        for _ in range(rng.integers(0, 12)):
            toks.append(b"%d:%s" % (rng.integers(0, 5000), num()))
        line = sep().join(toks)
        if rng.random() < 0.1:
            line = sep() + line + sep()
        lines.append(line)
    return join_lines(rng, lines, crlf=0.5)


@pytest.mark.parametrize("seed", range(8))
def test_random_files_match_reference(seed):
    rng = np.random.default_rng(seed)
    data = random_file(rng, int(rng.integers(0, 400)))
    assert_same(data)
    assert native(data)[1] is None


@pytest.mark.parametrize("seed", range(8))
def test_random_mutations_match_reference(seed):
    # one corrupted byte: the native parser must reject exactly when the reference does,
    # on the same line, and never crash
    rng = np.random.default_rng(100 + seed)
    data = bytearray(random_file(rng, 50))
    alphabet = b" \t\r\n:-+.eE0123456789xn\0"
    for _ in range(100):
        d = bytearray(data)
        pos = int(rng.integers(len(d)))
        d[pos] = alphabet[rng.integers(len(alphabet))]
        assert_same(bytes(d), check_kind=False)


line_chars = st.sampled_from([b" ", b"\t", b":", b"-", b"+", b".", b"e", b"1", b"0",
                              b"9", b"2147483648", b"\r", b"\n", b"\r\n", b"nan", b"\0",
                              b"x", b"\xef\xbb\xbf"])


@settings(max_examples=300, deadline=None)
@given(st.lists(line_chars, max_size=40))
def test_random_bytes_never_crash_and_match_reference(parts):
    data = b"".join(parts)
    assert_same(data, check_kind=False)
    assert_same(data, n_features=5, check_kind=False)


@settings(max_examples=500, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False),
       st.sampled_from(["", ".3e", ".17e", ".25f", ".0f", ".1f", ".20g"]))
def test_numbers_parse_exactly_like_python_float(x, fmt):
    tok = format(x, fmt).encode()
    assert _reader.parse_double(tok) == float(tok)
    assert math.copysign(1, _reader.parse_double(tok)) == math.copysign(1, float(tok))


@settings(max_examples=300, deadline=None)
@given(st.from_regex(r"\A[+-]?([0-9]{1,30}\.?[0-9]{0,30}|\.[0-9]{1,30})([eE][+-]?[0-9]{1,4})?\Z"))
def test_decimal_strings_parse_exactly_like_python_float(s):
    assert _reader.parse_double(s.encode()) == float(s)


def test_parse_double_rejects_what_python_float_also_rejects_here():
    for tok in [b"inf", b"nan", b"1_0", b"0x10", b" 1", b"", b"-", b".", b"1e", b"e5",
                b"1.2.3", b"--1"]:
        assert _reader.parse_double(tok) is None, tok


# ---------------------------------------------------------------- parallel chunks

def same_result(a, b):
    """Two parse results (or tuples of arrays) alike bit for bit: equal scalars, None
    for None, arrays of the same dtype, shape and bytes (so -0.0 is not 0.0)."""
    def same(x, y):
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            return (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)
                    and (x.dtype, x.shape) == (y.dtype, y.shape)
                    and x.tobytes() == y.tobytes())
        return x == y
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("seed", range(6))
def test_chunked_parse_does_not_depend_on_thread_count(seed):
    rng = np.random.default_rng(200 + seed)
    data = random_file(rng, int(rng.integers(0, 300)))
    one = _reader.parse(data, 0, 2**31, 1)
    assert one[0] == 0
    for n_threads in (2, 3, 7, 64):
        assert same_result(one, _reader.parse(data, 0, 2**31, n_threads, 1))


@pytest.mark.parametrize("seed", range(4))
def test_chunked_parse_reports_the_first_error(seed):
    rng = np.random.default_rng(300 + seed)
    data = bytearray(random_file(rng, 100))
    alphabet = b" \t\r\n:-+.ex\0"
    for _ in range(60):
        d = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            d[int(rng.integers(len(d)))] = alphabet[rng.integers(len(alphabet))]
        d = bytes(d)
        one = _reader.parse(d, 0, 50, 1)
        for n_threads in (2, 5):
            assert same_result(one, _reader.parse(d, 0, 50, n_threads, 1))


def test_load_libfm_n_threads(tmp_path):
    path = write(tmp_path, b"1 3:1\n-1 4:2\n" * 1000)
    a, b = load_libfm(path, n_threads=1), load_libfm(path, n_threads=2)
    assert same_result(a.X + (a.y,), b.X + (b.y,))
    c = load_libfm(path)  # default: all CPUs available
    assert same_result(a.X + (a.y,), c.X + (c.y,))
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="n_threads must be None or a positive integer"):
            load_libfm(path, n_threads=bad)


def fast_path_file(rng, n_rows):
    """One-hot-like rows whose tokens mostly take the parser's fast paths (ids of 1-8
    digits, values 1 or short decimals), with a few general-path tokens mixed in."""
    def value():
        kind = rng.integers(10)
        if kind < 6:
            return b"1"
        if kind == 6:
            return b"%d" % rng.integers(0, 10**int(rng.integers(1, 9)))
        if kind == 7:
            return b"%.*f" % (int(rng.integers(0, 9)), rng.normal() * 10.0**rng.integers(0, 8))
        if kind == 8:
            return [b"-0", b"+2", b"0.", b"3.5", b"-1234567.1234567", b"9999999.9999999",
                    b"12345678", b"1.23456789", b"1e3", b".5"][rng.integers(10)]
        return repr(float(rng.normal())).encode()

    lines = []
    for _ in range(n_rows):
        toks = [[b"1", b"-1", b"0", b"0.5", b"+1", b"-0.25"][rng.integers(6)]]
        for _ in range(rng.integers(0, 15)):
            toks.append(b"%d:%s" % (rng.integers(0, 10**int(rng.integers(1, 9))), value()))
        lines.append(b" ".join(toks))
    return join_lines(rng, lines, crlf=0.3)


@pytest.mark.parametrize("seed", range(8))
def test_fast_path_files_match_reference(seed):
    rng = np.random.default_rng(400 + seed)
    data = fast_path_file(rng, int(rng.integers(1, 300)))
    assert_same(data)
    assert native(data)[1] is None
    assert_same(data, n_features=10**6)  # ids >= 10^6 are errors here


@pytest.mark.parametrize("seed", range(8))
def test_fast_path_mutations_match_reference(seed):
    rng = np.random.default_rng(500 + seed)
    data = fast_path_file(rng, 60)
    alphabet = b" \t\r\n:-+.eE0123456789xn\0\x0b"
    for _ in range(100):
        d = bytearray(data)
        for _ in range(int(rng.integers(1, 3))):
            d[int(rng.integers(len(d)))] = alphabet[rng.integers(len(alphabet))]
        assert_same(bytes(d), check_kind=False)
        assert_same(bytes(d), n_features=5000, check_kind=False)


@settings(max_examples=300, deadline=None)
@given(st.lists(line_chars, max_size=40), st.integers(0, 3))
def test_random_bytes_with_room_for_fast_paths_match_reference(parts, n_after):
    # the fuzzed bytes come first, followed by valid rows, so that the fast paths (which
    # need 32 bytes after a token) run on them
    data = b"".join(parts) + b"\n1 1:1 22:1\n" + b"-1 333:1 4444:0.5\n" * n_after
    assert_same(data, check_kind=False)
    assert_same(data, n_features=400, check_kind=False)


@settings(max_examples=500, deadline=None)
@given(st.from_regex(r"\A[+-]?[0-9]{1,8}(\.[0-9]{0,8})?\Z"))
def test_short_numbers_fast_path_is_exact(s):
    tok = s.encode()
    assert _reader.parse_double(tok) == float(s)
    assert _reader.parse_double(tok, fast=False) == float(s)
    assert math.copysign(1, _reader.parse_double(tok)) == math.copysign(1, float(s))


@pytest.mark.parametrize("seed", range(4))
def test_results_do_not_depend_on_chunk_size_or_threads(seed):
    rng = np.random.default_rng(600 + seed)
    data = fast_path_file(rng, 400)
    one = _reader.parse(data, 0, 2**31, 1)
    assert one[0] == 0
    for n_threads in (1, 2, 5):
        for chunk in (1, 7, 100, 4096, 1 << 18):
            assert same_result(one, _reader.parse(data, 0, 2**31, n_threads, chunk))


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_numba_parser_reads_slow_tokens_in_batches(monkeypatch, batch):
    # The Numba parser leaves numbers that need Python's float to batches: when one is
    # full it stops and resumes at the start of the line it was reading (a batch too
    # small for one line is doubled). The batch size must change no result and no
    # error; compared with the parser under test (the compiled one or Numba's default).
    rng = np.random.default_rng(700 + batch)
    files = [random_file(rng, 60), random_file(rng, 60) + b"1 1:1e39\n",
             b"1 1:1e39 2:x\n" * 3, b"0.1000000000000000001 1:1e-30\n" * 20 + b"1e39\n"]
    alphabet = b" \t\n:-.e0123456789x"
    for _ in range(30):
        d = bytearray(files[0])
        d[int(rng.integers(len(d)))] = alphabet[rng.integers(len(alphabet))]
        files.append(bytes(d))
    want = [_reader.parse(d, 0, limit) for d in files for limit in (2**31, 3000)]
    calls = []
    numba_pass = libfm_numba._parse
    monkeypatch.setattr(libfm_numba, "_parse", lambda *a: calls.append(1) or numba_pass(*a))
    monkeypatch.setattr(libfm_numba, "_SLOW_BATCH", batch)
    got = [libfm_numba.parse(d, 0, limit) for d in files for limit in (2**31, 3000)]
    assert len(calls) > 4 * len(got)  # the batches did fill up
    for d, g, w in zip([d for d in files for _ in range(2)], got, want):
        assert same_result(g, w), d


@pytest.mark.parametrize("size", [4096, 8192, 4096 * 3 + 1])
@pytest.mark.parametrize("final_newline", [True, False])
def test_buffers_without_a_byte_after_their_end(tmp_path, size, final_newline):
    # A memory map of a file whose size is a multiple of the page size ends exactly at
    # the end of the mapping: the parser must not read past it.
    line = b"1 12:1 345:0.5 6789:1\n"
    body = line * (size // len(line))
    filler = size - len(body) - (1 if final_newline else 0)
    body += b"-1" + b" 7:1" * ((filler - 2) // 4) + b" " * ((filler - 2) % 4)
    if final_newline:
        body += b"\n"
    assert len(body) == size
    path = write(tmp_path, body)
    ds = load_libfm(path)
    want = ref_parse(body)
    for g, w in zip((ds.indptr, ds.indices, ds.values, ds.y), want):
        np.testing.assert_array_equal(g, w)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        got = _reader.parse(mm, 0, 2**31, 2, 1000)
        assert same_result(got, _reader.parse(body, 0, 2**31, 1))
    bad = body[:-3] + b"x" + body[-2:]
    line_no = body.count(b"\n", 0, size - 3) + 1
    with pytest.raises(ValueError, match=rf"line {line_no}:"):
        load_bytes(tmp_path, bad)


def test_parse_accepts_other_buffers():
    data = b"1 3:1\n-1 4:2.5\n0.5"
    want = _reader.parse(data)
    for buf in (bytearray(data), memoryview(data), np.frombuffer(data, np.uint8)):
        assert same_result(want, _reader.parse(buf))


def test_reads_a_pipe(tmp_path):
    fifo = tmp_path / "pipe.libfm"
    os.mkfifo(fifo)
    data = b"1 3:1\n-1 4:2\n" * 5000

    def writer():
        with open(fifo, "wb") as fh:
            fh.write(data)

    t = threading.Thread(target=writer)
    t.start()
    ds = load_libfm(fifo)
    t.join()
    assert len(ds) == 10000 and ds.nnz == 10000


def test_error_message_on_a_huge_token_is_bounded(tmp_path):
    path = write(tmp_path, b"1 3:1\n" + b"1 3:" + b"x" * 10**6 + b"\n")
    with pytest.raises(ValueError, match="line 2: value is not a number") as info:
        load_libfm(path)
    assert len(str(info.value)) < 300


# ---------------------------------------------------------------- the real Frappe file

@pytest.mark.skipif(not FRAPPE.exists(), reason="research data ../shared absent")
def test_frappe_validation_file():
    ds = load_libfm(FRAPPE)
    assert same_result(ds.X, load_libfm(FRAPPE, n_threads=2).X)
    assert len(ds) == 57722
    assert ds.nnz == 577220
    np.testing.assert_array_equal(np.diff(ds.indptr), 10)
    assert set(np.unique(ds.y).tolist()) == {-1.0, 1.0}
    assert np.all(ds.values == 1.0)
    assert ds.n_features == int(ds.indices.max()) + 1
    # first row of the file, as read by hand
    with open(FRAPPE, "rb") as fh:
        first = fh.readline().split()
    assert ds.y[0] == float(first[0])
    assert ds.indices[:10].tolist() == [int(t.split(b":")[0]) for t in first[1:]]


@pytest.mark.parametrize("n", [0, 1, 31, 32, 33, 255 * 32 - 1, 255 * 32 + 45, 100_003])
def test_count_matches_numpy(n):
    # the counting pass (vectorised, 255-step byte counters) against a plain count
    rng = np.random.default_rng(n)
    a = rng.choice(np.frombuffer(b"\n:\0ab1 ", np.uint8), size=n).astype(np.uint8)
    data = a.tobytes()
    want = (int((a == 10).sum()), int((a == 58).sum()), int((a == 0).sum()))
    assert _reader.count(data) == want
    if n > 10:
        sub = a[3:n - 5]
        assert _reader.count(data, 3, n - 5) == (int((sub == 10).sum()),
                                                 int((sub == 58).sum()),
                                                 int((sub == 0).sum()))
