"""Raw logs with feature hashing (``afmfast.data.hashing`` through ``convert``): the hash
and the buckets match an independent pure-Python implementation and fixed golden ids;
conversions give the oracle's rows and fields whatever the chunking, thread count or
compression; bad input raises an error naming the file and line and never crashes; a
model fitted on a hashed store explains by field without a field array."""
import gzip
import json
import os
import random

import numpy as np
import pytest

import afmfast
from afmfast.cli import main
from afmfast.data import store
from afmfast.data.hashing import CRITEO_COLUMNS, murmur3_32
from afmfast.data.store import convert, open_store

M32 = 0xFFFFFFFF


def murmur3_py(key: bytes, seed: int) -> int:
    """MurmurHash3_x86_32, written from Appleby's reference, independently of the
    Numba code under test."""
    def rotl(x, r):
        return ((x << r) | (x >> (32 - r))) & M32

    def scramble(k):
        k = (k * 0xCC9E2D51) & M32
        return (rotl(k, 15) * 0x1B873593) & M32

    h, n = seed & M32, len(key)
    body = n - n % 4
    for i in range(0, body, 4):
        h ^= scramble(int.from_bytes(key[i:i + 4], "little"))
        h = (rotl(h, 13) * 5 + 0xE6546B64) & M32
    if n % 4:
        h ^= scramble(int.from_bytes(key[body:], "little"))
    h ^= n
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def bucket_py(v: int) -> int:
    if v <= 2:
        return v
    e = v.bit_length() - 1
    return 4 * e + ((v << 2 >> e) & 3)


def key_of(kind: str, text: bytes) -> bytes:
    if kind == "categorical":
        return text
    if kind == "integer":
        return bucket_py(int(text)).to_bytes(8, "little", signed=True)
    return b""  # a value column


def oracle(lines, kinds, label_col, bits, sep=b"\t", values=False):
    """(indptr, indices, values, y, fields, shared) of ``lines`` (bytes, no line ends):
    ``kinds`` maps each file column to its kind or None (skipped); fields are numbered
    in column order."""
    field_of = {}
    for c, kind in enumerate(kinds):
        if kind is not None:
            field_of[c] = len(field_of)
    indptr, indices, vals, y = [0], [], [], []
    seen = {}
    for line in lines:
        cols = line.split(sep)
        y.append(float(cols[label_col]))
        for c, f in field_of.items():
            if not cols[c]:
                continue
            kind = kinds[c]
            as_value = kind == "numeric" or (kind == "integer" and values)
            key = b"" if as_value else key_of(kind, cols[c])
            i = murmur3_py(key, f) & ((1 << bits) - 1)
            indices.append(i)
            vals.append(float(cols[c]) if as_value else 1.0)
            seen.setdefault(i, set()).add(f)
        indptr.append(len(indices))
    fields = np.full(1 << bits, -1, np.int32)
    for i, fs in seen.items():
        fields[i] = min(fs)
    shared = sum(len(fs) > 1 for fs in seen.values())
    return (np.array(indptr), np.array(indices, np.int32), np.array(vals, np.float32),
            np.array(y, np.float32), fields, shared)


CRITEO_KINDS = [None] + ["integer"] * 13 + ["categorical"] * 26


def criteo_lines(n, seed=0):
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        cols = [str(rng.randint(0, 1))]
        for _ in range(13):
            r = rng.random()
            cols.append("" if r < 0.15 else str(rng.choice([-3, -1, 0, 1, 2, 3]))
                        if r < 0.4 else str(int(rng.paretovariate(0.7))))
        for _ in range(26):
            cols.append("" if rng.random() < 0.1 else "%08x" % rng.randint(0, 40))
        lines.append("\t".join(cols).encode())
    return lines


def check_store(path, expected, values=False):
    indptr, indices, vals, y, fields, shared = expected
    data = open_store(path)
    np.testing.assert_array_equal(data.indptr, indptr)
    np.testing.assert_array_equal(data.indices, indices)
    np.testing.assert_array_equal(data.y, y)
    np.testing.assert_array_equal(data.fields, fields)
    if values:
        np.testing.assert_array_equal(data.values, vals)
    else:
        assert not os.path.exists(os.path.join(path, "values.npy"))
    header = json.loads(open(os.path.join(path, "header.json")).read())
    assert header["fields"]["shared_ids"] == shared
    assert data.n_features == fields.size
    return data


def test_the_hash_is_murmur3_and_the_ids_are_frozen():
    for key in (b"", b"a", b"ab", b"abc", b"abcd", b"68fd1e64", bytes(range(37))):
        for seed in (0, 1, 38, M32):
            assert murmur3_32(key, seed) == murmur3_py(key, seed)
    # golden ids: a change of the hash, the seeds or the key bytes must fail here
    assert [murmur3_py(b"", 0), murmur3_py(b"hello", 0), murmur3_py(b"68fd1e64", 13)] == \
        [0, 613153351, 3863465962]


def test_golden_ids_of_a_criteo_line(tmp_path):
    src = tmp_path / "day.tsv"
    cols = ["1", "5", "", "-1", "1000"] + [""] * 9 + ["68fd1e64", "80e26c9b"] + [""] * 24
    src.write_bytes("\t".join(cols).encode() + b"\n")
    convert(src, tmp_path / "s", format="criteo", hash_bits=20)
    data = open_store(tmp_path / "s")
    # computed once with murmur3_py: I1 = 5 (bucket 9), I3 = -1, I4 = 1000 (bucket 39),
    # C1 = 68fd1e64, C2 = 80e26c9b
    assert data.indices.tolist() == GOLDEN_CRITEO_IDS
    assert data.fields[data.indices].tolist() == [0, 2, 3, 13, 14]


GOLDEN_CRITEO_IDS = [776695, 555470, 166547, 511978, 5981]


def test_buckets():
    assert [bucket_py(v) for v in (-7, 0, 1, 2, 3, 4, 5, 7, 8, 1000)] == \
        [-7, 0, 1, 2, 6, 8, 9, 11, 12, 39]
    edges = [bucket_py(v) for v in range(3, 5000)]
    assert edges == sorted(edges)  # monotone


@pytest.mark.parametrize("chunk_bytes", [50, 1 << 20])
@pytest.mark.parametrize("threads", [1, 2])
def test_criteo_gives_the_oracles_rows_and_fields(tmp_path, monkeypatch, chunk_bytes,
                                                  threads):
    monkeypatch.setattr(store, "CONVERT_CHUNK_BYTES", chunk_bytes)
    lines = criteo_lines(300)
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv.gz"
    a.write_bytes(b"\n".join(lines[:200]) + b"\n")
    b.write_bytes(gzip.compress(b"\r\n".join(lines[200:])))  # CRLF, no final newline
    header = convert([a, b], tmp_path / "s", format="criteo", hash_bits=8,
                     n_threads=threads)
    expected = oracle(lines, CRITEO_KINDS, 0, 8)
    data = check_store(tmp_path / "s", expected)
    assert expected[5] > 0  # 256 ids: fields collide
    assert data.field_names == list(CRITEO_COLUMNS)
    assert header["hashing"]["function"] == "murmur3_x86_32"


def test_integers_as_values(tmp_path):
    lines = criteo_lines(50, seed=1)
    (tmp_path / "d.tsv").write_bytes(b"\n".join(lines))
    convert(tmp_path / "d.tsv", tmp_path / "s", format="criteo", hash_bits=16,
            integers="value")
    check_store(tmp_path / "s", oracle(lines, CRITEO_KINDS, 0, 16, values=True),
                values=True)


def test_csv_columns_kinds_and_header(tmp_path):
    text = (b"id,click,site,hour,price\n"
            b"1,1,a1,14,0.5\n2,0,b2,,1e3\n3,1,,3,\n4,0,a1,1000000,-2.25\n")
    (tmp_path / "d.csv").write_bytes(text)
    convert(tmp_path / "d.csv", tmp_path / "s", format="csv", hash_bits=12, label="click",
            columns=["site", "hour", "price"], kinds={"hour": "integer",
                                                      "price": "numeric"})
    lines = text.splitlines()[1:]
    expected = oracle(lines, [None, None, "categorical", "integer", "numeric"], 1, 12,
                      sep=b",")
    data = check_store(tmp_path / "s", expected, values=True)
    assert data.field_names == ["site", "hour", "price"]
    # two files: the same header required
    (tmp_path / "e.csv").write_bytes(b"id,site,click,hour,price\n5,z,1,2,3\n")
    with pytest.raises(ValueError, match=r"e\.csv: line 1: the header differs"):
        convert([tmp_path / "d.csv", tmp_path / "e.csv"], tmp_path / "t", format="csv",
                label="click")


@pytest.mark.parametrize("text, line, what", [
    (b"1\t2\n", 3, "too few columns"),
    (None, 4, "too many columns"),
    (b"x" + b"\t" * 39, 3, "column label: label is not a number"),
    (b"nan" + b"\t" * 39, 3, "label is NaN"),
    (b"1\t1.5" + b"\t" * 38, 3, "column I1: not an integer"),
    (b"1\t" + b"9" * 19 + b"\t" * 38, 3, "not an integer"),
    (b"1\t\x00" + b"\t" * 38, 3, "NUL byte"),
    (b"1\r2" + b"\t" * 39, 3, "carriage return"),
    (b"", 3, "empty line"),
])
def test_criteo_errors_name_the_file_and_line_across_chunks(tmp_path, monkeypatch, text,
                                                            line, what):
    monkeypatch.setattr(store, "CONVERT_CHUNK_BYTES", 64)
    good = criteo_lines(3, seed=2)
    if text is None:  # the extra column is on the fourth line
        body = b"\n".join(good) + b"\n" + good[0] + b"\tff\n"
    else:
        body = b"\n".join(good[:2]) + b"\n" + text + b"\n" + good[2] + b"\n"
    src = tmp_path / "bad.tsv"
    src.write_bytes(body)
    with pytest.raises(ValueError, match=f"bad.tsv: line {line}: .*{what}"):
        convert(src, tmp_path / "s", format="criteo", n_threads=2)
    assert not (tmp_path / "s").exists()


def test_csv_errors(tmp_path):
    def fails(text, match, **kw):
        src = tmp_path / "bad.csv"
        src.write_bytes(text)
        with pytest.raises(ValueError, match=match):
            convert(src, tmp_path / "s", format="csv", **{"label": "y", **kw})

    fails(b'y,a\n1,"x"\n', r'bad.csv: line 2: column a: quote character')
    fails(b'y,"a"\n1,x\n', r"bad.csv: line 1: quote")
    fails(b"y,a\n1,x\n0,y\n1,2,3\n", r"bad.csv: line 4: too many columns")
    fails(b"", r"bad.csv: empty")
    fails(b"a,b\n1,2\n", r"label: column 'y' is not in the header of .*bad.csv")
    fails(b"y,a\n1,x\n", r"columns: \['b'\] are not in the header", columns=["b"])
    fails(b"y,a\n1,x\n", r"kinds: \['A'\] are not feature columns", kinds={"A": "integer"})
    fails(b"y,a\n1,x\n", r"bad.csv: line 2: column a: not a number: 'x'",
          kinds={"a": "numeric"})
    fails(b"y,a,a\n1,x,z\n", r"line 1 \(the header\): columns named twice")
    fails(b"y,a\n1,2\n0,1e39\n", r"line 3: column a: number is NaN, infinite or beyond "
          r"the float32 range: '1e39'", kinds={"a": "numeric"})
    fails(b"y,a\n1e39,2\n", r"line 2: column y: label is NaN, infinite or beyond")


def test_bad_arguments(tmp_path):
    src = tmp_path / "d.tsv"
    src.write_bytes(b"\n".join(criteo_lines(2)))
    for kw, match in (({"hash_bits": 0}, "hash_bits must be an int in"),
                      ({"hash_bits": 32}, "hash_bits"),
                      ({"n_features": 10}, "n_features: a hashed store"),
                      ({"integers": "log"}, "integers must be"),
                      ({"label": "x"}, "only for format 'csv'")):
        with pytest.raises(ValueError, match=match):
            convert(src, tmp_path / "s", format="criteo", **kw)
    with pytest.raises(ValueError, match="hash_bits: only for the hashed"):
        convert(src, tmp_path / "s", format="libfm", hash_bits=10)
    with pytest.raises(ValueError, match="label: format 'csv' needs"):
        convert(src, tmp_path / "s", format="csv")


def test_random_bytes_and_truncated_lines_never_crash(tmp_path):
    rng = random.Random(3)
    good = b"\n".join(criteo_lines(20, seed=4)) + b"\n"
    for trial in range(60):
        if trial % 2:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(200)))
        else:
            cut = rng.randrange(len(good))
            data = good[:cut] + bytes(rng.choice(b"\t\n\r\x00-+e9a\"")
                                      for _ in range(rng.randrange(5))) + good[cut:]
        src = tmp_path / f"f{trial}.tsv"
        src.write_bytes(data)
        for fmt, kw in (("criteo", {}), ("csv", {"label": "y"})):
            try:
                convert(src, tmp_path / "s", format=fmt, hash_bits=8, **kw)
            except ValueError as exc:
                assert str(src) in str(exc)


def test_open_store_refuses_corrupt_fields(tmp_path):
    src = tmp_path / "d.tsv"
    src.write_bytes(b"\n".join(criteo_lines(5)))
    convert(src, tmp_path / "s", format="criteo", hash_bits=6)
    fields = np.load(tmp_path / "s" / "fields.npy")
    fields[3] = 39
    np.save(tmp_path / "s" / "fields.npy", fields)
    with pytest.raises(ValueError, match=r"fields\.npy: corrupt store: fields\[3\] = 39"):
        open_store(tmp_path / "s")
    np.save(tmp_path / "s" / "fields.npy", fields[:10])
    with pytest.raises(ValueError, match=r"fields\.npy: expected 64 entries"):
        open_store(tmp_path / "s")


def test_afm_explains_a_hashed_store_by_field_and_keeps_the_fields(tmp_path):
    rng = np.random.default_rng(0)
    n = 400
    rows = zip(rng.integers(0, 2, n), rng.integers(0, 20, n), rng.integers(0, 9, n),
               rng.integers(0, 500, n))
    (tmp_path / "d.csv").write_bytes(b"y,user,item,count\n" + b"".join(
        b"%d,u%d,i%d,%d\n" % r for r in rows))
    convert(tmp_path / "d.csv", tmp_path / "s", format="csv", label="y", hash_bits=10,
            kinds={"count": "integer"})
    data = open_store(tmp_path / "s")
    afm = afmfast.AFM(n_factors=4, attention_size=4, n_epochs=1, n_threads=1,
                      verbose=0).fit(data)
    matrix = afm.field_attention(data[:50])
    assert matrix.shape == (3, 3) and np.isfinite(matrix[0, 1])
    np.testing.assert_array_equal(matrix, afm.field_attention(data[:50], data.fields))
    afm.save(tmp_path / "afm.npz")
    loaded = afmfast.load(tmp_path / "afm.npz")
    assert loaded.field_names_ == ["user", "item", "count"]
    np.testing.assert_array_equal(loaded.field_attention(data[:50]), matrix)
    fm = afmfast.FM(n_factors=2, n_epochs=1, verbose=0).fit(
        afmfast.Dataset(data.indptr, data.indices, None, data.y, n_features=1024))
    assert not hasattr(fm, "fields_")


def test_dataset_fields_follow_selections_and_stores(tmp_path):
    ds = afmfast.Dataset([0, 2, 3], [0, 3, 2], None, [1.0, 0.0])
    with pytest.raises(ValueError, match=r"fields\[1\] = 5 is not a field"):
        ds.with_fields([0, 5, 1, 1], ["a", "b"])
    with pytest.raises(ValueError, match="one field per feature id"):
        ds.with_fields([0, 1])
    named = ds.with_fields([0, -1, 1, 1], ["a", "b"])
    assert named[[1]].field_names == ["a", "b"] and named[:1].fields.tolist() == [0, -1, 1, 1]
    assert named.with_n_features(6).fields.tolist() == [0, -1, 1, 1, -1, -1]
    afmfast.write_store(named, tmp_path / "s")
    assert open_store(tmp_path / "s").fields.tolist() == [0, -1, 1, 1]


def test_cli_converts_criteo_and_csv(tmp_path, capsys):
    src = tmp_path / "d.tsv"
    src.write_bytes(b"\n".join(criteo_lines(10)))
    assert main(["convert", str(src), "-o", str(tmp_path / "s"), "--format", "criteo",
                 "--hash-bits", "12"]) == 0
    assert open_store(tmp_path / "s").n_features == 4096
    (tmp_path / "d.csv").write_bytes(b"y,a,b,c\n1,x,3,0.5\n")
    assert main(["convert", str(tmp_path / "d.csv"), "-o", str(tmp_path / "t"),
                 "--format", "csv", "--label", "y", "--columns", "a,b", "--integer",
                 "b"]) == 0
    assert open_store(tmp_path / "t").field_names == ["a", "b"]
    assert main(["convert", str(tmp_path / "d.csv"), "-o", str(tmp_path / "u"),
                 "--format", "csv"]) == 1
    assert "label: format 'csv' needs" in capsys.readouterr().err


def test_a_dataframe_hashes_as_its_csv_converts(tmp_path):
    """hash_frame gives a DataFrame the ids, values, labels and fields that convert gives
    the same table written as CSV, missing cells and non-ASCII text included."""
    pd = pytest.importorskip("pandas")
    from afmfast.data.hashed_frames import hash_frame

    rng = np.random.default_rng(3)
    n = 400
    frame = pd.DataFrame({
        "user": rng.choice(["ann", "bob", "zoë", "", "x" * 40], n),
        "hour": pd.array(np.where(rng.random(n) < 0.1, None, rng.integers(-3, 5000, n)),
                         dtype="Int64"),
        "price": np.where(rng.random(n) < 0.1, np.nan, rng.integers(0, 64, n) / 4.0),
        "item": rng.integers(0, 50, n),
        "click": rng.integers(0, 2, n).astype(float),
    })
    frame.loc[frame["user"] == "", "user"] = None  # a missing string cell
    kinds = {"hour": "integer", "price": "numeric", "item": "categorical"}
    path = tmp_path / "table.csv"
    frame.to_csv(path, index=False)
    convert(path, tmp_path / "store", format="csv", hash_bits=12, label="click",
            kinds=kinds)
    stored = open_store(tmp_path / "store")
    hashed = hash_frame(frame, "click", hash_bits=12, kinds=kinds)
    for name in ("indptr", "indices", "values", "y", "fields"):
        np.testing.assert_array_equal(getattr(hashed, name), getattr(stored, name),
                                      err_msg=name)
    assert hashed.field_names == stored.field_names == ["user", "hour", "price", "item"]
    assert hashed.n_features == stored.n_features == 4096
    with pytest.raises(ValueError, match="kinds: 'item' has kind 'date'"):
        hash_frame(frame, "click", kinds={"item": "date"})
    with pytest.raises(ValueError, match="label: column 'clicks'"):
        hash_frame(frame, "clicks")
