"""Raw click logs with feature hashing: the Criteo layout and CSV, parsed in Numba for
``afmfast.convert(..., format="criteo" | "csv", hash_bits=B)``.

Layouts
-------
- ``criteo``: no header; per line the label, 13 integer columns I1..I13 and 26
  categorical columns C1..C26 (hex strings in the Criteo files), separated by tabs; an
  empty column is missing.
- ``csv``: comma-separated with a header line naming the columns (each input file has
  the same header); ``label`` names the label column, ``columns`` the feature columns
  (default: all others) and ``kinds`` maps a column to "categorical" (the default),
  "integer" or "numeric". Quoted fields are not supported: a ``"`` is an error naming
  the file and line, never mis-parsed. An empty column is missing.

Lines end with LF or CRLF; a blank line is an error, as in libFM text. The label is a
number as ``load_libfm`` reads it. Errors (a wrong column count, a bad label, integer or
number, a NUL byte, a quote in CSV) raise ``ValueError`` naming the file, the line and
the column.

The hash (stable: the same input gives the same ids on every machine and in every
version; ``tests/data/test_hashing.py`` holds ids computed by an independent
implementation)
--------------------------------------------------------------------------------------
The field f of a feature column is its position among the feature columns, from 0
(criteo: I1..I13 are fields 0..12, C1..C26 fields 13..38; csv: the order of
``columns``). A column's value becomes the id::

    id = MurmurHash3_x86_32(key bytes, seed=f) mod 2^B   (the low B bits)

with MurmurHash3_x86_32 as Austin Appleby published it (``mmh3.hash(key, f,
signed=False)``, ``sklearn.utils.murmurhash3_32(key, f, positive=True)``). The key bytes:

- categorical: the column's bytes as they are in the file (no trimming, no decoding);
- integer, bucketed (``integers="bucket"``, the default): the value v (an optional sign
  and at most 18 digits) becomes t = v when v <= 2 (0, 1, 2 and every negative value
  are categories of their own), else t = 4 * floor(log2 v) + the two bits that follow
  the leading one bit of v (four log-spaced buckets per doubling: 3 -> 6, 4 -> 8,
  5 -> 9, 7 -> 11, 8 -> 12, 1000 -> 39), computed in integers, so no platform's
  logarithm can move a value across a bucket edge. The key is t as 8 bytes, a
  little-endian two's-complement int64;
- integer with ``integers="value"`` and numeric columns: one id per column, the key is
  empty (zero bytes), and the nonzero's value is the number (float32);
- a missing (empty) column gives no nonzero.

Categorical and bucketed nonzeros have the value 1, so such a store carries no values.

Fields of the ids
-----------------
Each id's field (the store's ``fields.npy``, ``Dataset.fields``) is the field of the
columns whose values hashed to it; an id that values of several fields hit (a collision
across fields) takes the smallest of them, and the header counts such ids
(``fields.shared_ids``); an id no value hit has field -1. Collisions within a field
cannot be seen in the store; ``bench/out_of_core.py --collisions`` measures both kinds.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from afmfast.data.libfm_numba import _POW10, _count, _number

__all__ = ["CRITEO_COLUMNS", "DEFAULT_HASH_BITS", "KINDS", "buckets",
           "hash_keys", "murmur3_32"]

#: hash_bits when a hashed format is converted without it: 4,194,304 ids
DEFAULT_HASH_BITS = 22
#: the kinds of feature columns (csv)
KINDS = ("categorical", "integer", "numeric")
#: the criteo layout's feature columns, in the order of the file
CRITEO_COLUMNS = tuple(f"I{i}" for i in range(1, 14)) + tuple(f"C{i}" for i in range(1, 27))
#: the largest field count: fields are int16 (int8 up to 127 fields, as criteo's) while
#: the conversion tracks them
MAX_FIELDS = 32767


def _field_dtype(n_fields):
    """The smallest signed integer type that holds the fields and -1."""
    return np.int8 if n_fields <= 127 else np.int16

# column codes of the parser
SKIP, LABEL, CATEGORICAL, BUCKET, INT_VALUE, NUMERIC = 0, 1, 2, 3, 4, 5
# error codes of the parser (a number's "not finite" code follows its "not a number")
(E_EMPTY_LINE, E_LABEL, E_LABEL_NONFINITE, E_FEW, E_MANY, E_INTEGER, E_NUMBER,
 E_NONFINITE, E_NUL, E_LONE_CR, E_QUOTE) = range(1, 12)
_MESSAGES = {
    E_EMPTY_LINE: "empty line (blank lines are not allowed)",
    E_LABEL: "label is not a number",
    E_LABEL_NONFINITE: "label is NaN, infinite or beyond the float32 range",
    E_FEW: "too few columns",
    E_MANY: "too many columns",
    E_INTEGER: "not an integer (an optional sign and at most 18 digits)",
    E_NUMBER: "not a number",
    E_NONFINITE: "number is NaN, infinite or beyond the float32 range",
    E_NUL: "NUL byte (is this a binary file?)",
    E_LONE_CR: "carriage return not followed by a line feed",
    E_QUOTE: "quote character: quoted CSV fields are not supported",
}
_MAX_INT_DIGITS = 18  # below 2^62: 4 * v cannot overflow int64 in the bucket formula


# ----- MurmurHash3_x86_32 ---------------------------------------------------------------
_M32 = 0xFFFFFFFF


@njit(cache=True, nogil=True, inline="always")
def _rotl(x, r):
    return ((x << r) | (x >> (32 - r))) & _M32


@njit(cache=True, nogil=True, inline="always")
def _mix_block(h, k):
    k = (k * 0xCC9E2D51) & _M32
    k = _rotl(k, 15)
    k = (k * 0x1B873593) & _M32
    h ^= k
    h = _rotl(h, 13)
    return (h * 5 + 0xE6546B64) & _M32


@njit(cache=True, nogil=True, inline="always")
def _finish(h, k, n):
    """The tail block ``k`` (0 when the length is a multiple of 4) and the avalanche."""
    if n & 3:
        k = (k * 0xCC9E2D51) & _M32
        k = _rotl(k, 15)
        k = (k * 0x1B873593) & _M32
        h ^= k
    h ^= n
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


@njit(cache=True, nogil=True)
def _murmur_bytes(buf, start, end, seed):
    """MurmurHash3_x86_32 of buf[start:end] (uint8) with ``seed``, as an int64."""
    h = np.int64(seed) & _M32
    n = end - start
    p = start
    for _ in range(n >> 2):
        k = (np.int64(buf[p]) | (np.int64(buf[p + 1]) << 8) | (np.int64(buf[p + 2]) << 16)
             | (np.int64(buf[p + 3]) << 24))
        h = _mix_block(h, k)
        p += 4
    k = np.int64(0)
    rest = n & 3
    if rest == 3:
        k ^= np.int64(buf[p + 2]) << 16
    if rest >= 2:
        k ^= np.int64(buf[p + 1]) << 8
    if rest >= 1:
        k ^= np.int64(buf[p])
    return _finish(h, k, np.int64(n))


@njit(cache=True, nogil=True)
def _murmur_int64(t, seed):
    """MurmurHash3_x86_32 of the 8 little-endian bytes of the int64 ``t``."""
    h = np.int64(seed) & _M32
    h = _mix_block(h, t & _M32)
    h = _mix_block(h, (t >> 32) & _M32)
    return _finish(h, np.int64(0), np.int64(8))


def murmur3_32(key: bytes, seed: int = 0) -> int:
    """MurmurHash3_x86_32 of ``key`` with ``seed`` (0 <= result < 2^32): the hash of the
    feature ids (see the module docstring).

    Examples
    --------
    >>> murmur3_32(b"hello", 0)
    613153351
    >>> murmur3_32(b"68fd1e64", 13) % 2**22  # criteo's C1 (field 13) value 68fd1e64
    511978
    """
    data = np.frombuffer(bytes(key), np.uint8) if key else np.zeros(0, np.uint8)
    return int(_murmur_bytes(data, 0, data.size, int(seed) & _M32))


@njit(cache=True, nogil=True)
def _hash_rows(keys, seed):
    out = np.empty(keys.shape[0], np.int64)
    for i in range(keys.shape[0]):
        out[i] = _murmur_bytes(keys[i], 0, keys.shape[1], seed)
    return out


def hash_keys(keys: np.ndarray, seed: int) -> np.ndarray:
    """MurmurHash3_x86_32 (int64 results) of each row of ``keys``, a 2-D uint8 array of
    equal-length keys, with ``seed``: the ids of many values of one field at once.

    Examples
    --------
    >>> keys = np.frombuffer(b"68fd1e6480e26c9b", np.uint8).reshape(2, 8)
    >>> (hash_keys(keys, 13) % 2**22).tolist()[0] == murmur3_32(b"68fd1e64", 13) % 2**22
    True
    """
    keys = np.ascontiguousarray(keys, np.uint8)
    if keys.ndim != 2:
        raise ValueError(f"keys must be a 2-D uint8 array, got shape {keys.shape}")
    return _hash_rows(keys, int(seed) & _M32)


# ----- the parser -----------------------------------------------------------------------
@njit(cache=True, nogil=True, inline="always")
def _bucket(v):
    """The integer t hashed for the value v (module docstring)."""
    if v <= 2:
        return v
    e = 0  # floor(log2 v), by halving the bit range
    x = v
    for step in (32, 16, 8, 4, 2, 1):
        if x >> step:
            x >>= step
            e += step
    return 4 * e + (((v << 2) >> e) & 3)


@njit(cache=True, nogil=True)
def _buckets(values):
    out = np.empty_like(values)
    for i in range(values.shape[0]):
        out[i] = _bucket(values[i])
    return out


def buckets(values: np.ndarray) -> np.ndarray:
    """The bucket t (int64) of each integer value, whose 8 little-endian bytes are the
    hashed key of a bucketed integer column (see the module docstring).

    Examples
    --------
    >>> buckets(np.array([-5, 0, 2, 3, 4, 5, 1000])).tolist()
    [-5, 0, 2, 6, 8, 9, 39]
    """
    return _buckets(np.ascontiguousarray(values, np.int64))


@njit(cache=True, nogil=True)
def _integer(buf, p, q):
    """(ok, value) of the integer in buf[p:q]: an optional sign, 1 to 18 digits."""
    neg = False
    if buf[p] == 45 or buf[p] == 43:  # '-', '+'
        neg = buf[p] == 45
        p += 1
    if p == q or q - p > _MAX_INT_DIGITS:
        return False, np.int64(0)
    v = np.int64(0)
    for i in range(p, q):
        d = np.int64(buf[i]) - 48
        if d < 0 or d > 9:
            return False, np.int64(0)
        v = v * 10 + d
    return True, -v if neg else v


@njit(cache=True, nogil=True)
def _real(buf, p, q):
    """(status, value) of the number in buf[p:q] (the libFM grammar): status 0 with the
    value, 1 when it is no number. Numbers of more than 19 significant digits or an
    exponent beyond 22 are summed digit by digit in float64 (within a few ulps of the
    correctly rounded value, which float32 rounding hides but for ties)."""
    token = buf[p:q]
    status, end, value = _number(token, 0, _POW10)
    if status == 1 or end != q - p:
        return 1, 0.0
    if status == 0:
        return 0, value
    i, neg, m, scale = 0, False, 0.0, 0
    if token[0] == 45 or token[0] == 43:
        neg = token[0] == 45
        i = 1
    while i < token.size and 48 <= token[i] <= 57:
        m = m * 10.0 + (token[i] - 48)
        i += 1
    if i < token.size and token[i] == 46:
        i += 1
        while i < token.size and 48 <= token[i] <= 57:
            m = m * 10.0 + (token[i] - 48)
            scale -= 1
            i += 1
    if i < token.size:  # the exponent ('e' or 'E' and an integer: _number checked it)
        i += 1
        eneg = token[i] == 45
        if token[i] == 45 or token[i] == 43:
            i += 1
        ex = 0
        while i < token.size:
            if ex < 1000000:
                ex = ex * 10 + (token[i] - 48)
            i += 1
        scale += -ex if eneg else ex
    value = m * 10.0 ** scale if m != 0.0 else 0.0
    return 0, -value if neg else value


@njit(cache=True, nogil=True)
def _float32(buf, p, q):
    """(status, float32) of the number in buf[p:q]: status 0, or 1 when it is no
    number, 2 when it is not finite in float32 (the error codes after E_LABEL and
    E_NUMBER)."""
    if q == p + 1 and 48 <= buf[p] <= 57:  # a one-digit number: the usual 0/1 label
        return 0, np.float32(buf[p] - 48)
    if q == p:
        return 1, np.float32(0.0)
    status, v = _real(buf, p, q)
    value = np.float32(v)
    if status:
        return 1, value
    return (0 if np.isfinite(value) else 2), value


@njit(cache=True, nogil=True)
def _parse_rows(buf, start, end, sep, stops, codes, fields, empty_ids, mask, indptr,
                indices, values, nz_fields, y):
    """Rows of buf[start:end] (``start`` a line start) into the arrays; returns (error
    code or 0, error offset, column of the error, rows, nonzeros). ``stops[c]`` is 1
    for the bytes that end a column (the separator, line ends, NUL, a CSV quote);
    ``codes`` and ``fields`` give each column's kind code and field, ``empty_ids`` a
    value column's id; ``values`` is filled only when it is not empty."""
    n_cols = codes.shape[0]
    keep_values = values.shape[0] > 0
    row = 0
    k = 0
    p = start
    indptr[0] = 0
    while p < end:
        line = p
        c = np.int64(buf[p])
        if c == 10 or c == 13:
            return E_EMPTY_LINE, line, -1, row, k
        col = 0
        while True:
            q = p
            c = np.int64(-1)
            while q < end:
                c = np.int64(buf[q])
                if stops[c]:
                    break
                q += 1
            if q == end:
                c = np.int64(-1)
            if c == 0:
                return E_NUL, q, -1, row, k
            if c == 34:
                return E_QUOTE, q, col, row, k
            if col >= n_cols:
                return E_MANY, p, -1, row, k
            code = codes[col]
            if code == LABEL:
                status, label = _float32(buf, p, q)
                if status:
                    return E_LABEL + status - 1, p, col, row, k
                y[row] = label
            elif code != SKIP and q > p:
                f = fields[col]
                value = np.float32(1.0)
                if code == CATEGORICAL:
                    h = _murmur_bytes(buf, p, q, f)
                elif code == NUMERIC:
                    status, value = _float32(buf, p, q)
                    if status:
                        return E_NUMBER + status - 1, p, col, row, k
                    h = empty_ids[col]
                else:
                    ok, iv = _integer(buf, p, q)
                    if not ok:
                        return E_INTEGER, p, col, row, k
                    if code == BUCKET:
                        h = _murmur_int64(_bucket(iv), f)
                    else:
                        value = np.float32(iv)
                        h = empty_ids[col]
                indices[k] = np.int32(h & mask)
                nz_fields[k] = f
                if keep_values:
                    values[k] = value
                k += 1
            col += 1
            if c == sep:
                p = q + 1
                continue
            if c == 13:
                if q + 1 < end and buf[q + 1] == 10:
                    p = q + 2
                elif q + 1 == end:  # CR as the very last byte
                    p = q + 1
                else:
                    return E_LONE_CR, q, -1, row, k
            elif c == 10:
                p = q + 1
            else:
                p = end
            break
        if col < n_cols:
            return E_FEW, line, -1, row, k
        row += 1
        indptr[row] = k
    return 0, 0, -1, row, k


@njit(cache=True, nogil=True)
def _track_fields(indices, nz_fields, seen):
    """Per id the lowest and highest field that hit it, ``seen[id]`` (min and max are
    order-free: the result does not depend on how the rows were cut into pieces). The
    pair shares a cache line."""
    for j in range(indices.shape[0]):
        i = indices[j]
        f = nz_fields[j]
        if f < seen[i, 0]:
            seen[i, 0] = f
        if f > seen[i, 1]:
            seen[i, 1] = f


@njit(cache=True, nogil=True)
def _piece_ends(buf, n_pieces):
    """Offsets just past a line end that cut buf into about ``n_pieces`` pieces."""
    n = buf.shape[0]
    ends = np.empty(n_pieces, np.int64)
    last = 0
    for i in range(n_pieces - 1):
        p = max(last, n * (i + 1) // n_pieces)
        while p < n and buf[p] != 10:
            p += 1
        last = min(n, p + 1)
        ends[i] = last
    ends[n_pieces - 1] = n
    return ends


@njit(cache=True, nogil=True)
def _first_line_end(buf):
    """The offset just past the first line end of buf (its length if none)."""
    for i in range(buf.shape[0]):
        if buf[i] == 10:
            return i + 1
    return buf.shape[0]


# ----- the layouts ------------------------------------------------------------------------
class _Layout:
    """How a hashed format's lines become rows: the column codes and fields, the field
    names, the separator. ``parse`` turns one chunk of lines into CSR arrays.

    Examples
    --------
    >>> layout = _Layout.criteo(hash_bits=20)
    >>> layout.n_fields, layout.names[:2], layout.names[-1], layout.has_values
    (39, ['I1', 'I2'], 'C26', False)
    """

    def __init__(self, codes, fields, names, sep, csv, hash_bits, integers, header=None):
        self.codes = np.asarray(codes, np.int8)
        self.fields = np.asarray(fields, _field_dtype(len(names)))
        self.names = list(names)
        self.n_fields = len(self.names)
        self.sep, self.csv, self.header = sep, csv, header
        self.stops = np.zeros(256, np.uint8)
        self.stops[[sep, 10, 13, 0] + ([ord('"')] if csv else [])] = 1
        self.hash_bits, self.integers = hash_bits, integers
        self.mask = (1 << hash_bits) - 1
        self.empty_ids = np.array([_murmur_bytes(np.zeros(0, np.uint8), 0, 0, max(f, 0))
                                   for f in self.fields], np.int64)
        self.has_values = bool(np.isin(self.codes, (INT_VALUE, NUMERIC)).any())

    @classmethod
    def criteo(cls, hash_bits, integers="bucket"):
        """The criteo layout (label, I1..I13, C1..C26, tab-separated)."""
        integer = BUCKET if integers == "bucket" else INT_VALUE
        codes = [LABEL] + [integer] * 13 + [CATEGORICAL] * 26
        return cls(codes, [-1, *range(39)], CRITEO_COLUMNS, ord("\t"), False, hash_bits,
                   integers, ["label", *CRITEO_COLUMNS])

    @classmethod
    def csv(cls, header, path, label, columns, kinds, hash_bits, integers):
        """The layout of a CSV file whose header line names the columns ``header``."""
        where = f"{path}: line 1 (the header)"
        if len(set(header)) != len(header):
            twice = sorted({c for c in header if header.count(c) > 1})
            raise ValueError(f"{where}: columns named twice: {twice}")
        if label not in header:
            raise ValueError(f"label: column {label!r} is not in the header of {path} "
                             f"({_names(header)})")
        if columns is None:
            columns = [c for c in header if c != label]
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"columns: {missing} are not in the header of {path} "
                             f"({_names(header)})")
        strays = sorted(set(kinds) - set(columns))
        if strays:
            raise ValueError(f"kinds: {strays} are not feature columns of {path} "
                             f"({_names(columns)})")
        codes = [SKIP] * len(header)
        fields = [-1] * len(header)
        codes[header.index(label)] = LABEL
        integer = BUCKET if integers == "bucket" else INT_VALUE
        by_kind = {"categorical": CATEGORICAL, "integer": integer, "numeric": NUMERIC}
        for f, name in enumerate(columns):
            codes[header.index(name)] = by_kind[kinds.get(name, "categorical")]
            fields[header.index(name)] = f
        return cls(codes, fields, columns, ord(","), True, hash_bits, integers, header)

    def parse(self, buf, pool, n_pieces):
        """A list of CSR blocks (indptr, indices, values, nz_fields, y) of the lines in
        ``buf`` (uint8), in order, parsed in ``n_pieces`` pieces on ``pool``; or
        (code, offset, column) of the first error."""
        ends = _piece_ends(buf, n_pieces) if n_pieces > 1 else np.array([buf.size])
        starts = np.concatenate([[0], ends[:-1]])
        jobs = [(int(s), int(e)) for s, e in zip(starts, ends) if e > s]
        if len(jobs) > 1:
            results = list(pool.map(lambda job: self._parse_piece(buf, *job), jobs))
        else:
            results = [self._parse_piece(buf, *job) for job in jobs]
        for result in results:
            if len(result) == 3:
                return result
        return results

    def _parse_piece(self, buf, start, end):
        # every valid line holds at least a label byte and a separator per column, and
        # every nonzero a byte and its separator: bounds that need no counting pass
        # (the pages of the arrays that stay unused are never touched, so take no memory)
        rows = (end - start) // len(self.codes) + 1
        nnz = min(rows * self.n_fields, (end - start) // 2 + 1)
        indptr = np.empty(rows + 1, np.int64)
        indices = np.empty(nnz, np.int32)
        values = np.empty(nnz if self.has_values else 0, np.float32)
        nz_fields = np.empty(nnz, self.fields.dtype)
        y = np.empty(rows, np.float32)
        code, offset, col, rows, nnz = _parse_rows(
            buf, start, end, self.sep, self.stops, self.codes, self.fields, self.empty_ids,
            self.mask, indptr, indices, values, nz_fields, y)
        if code:
            return code, offset, col
        return (indptr[:rows + 1], indices[:nnz], values[:nnz if self.has_values else 0],
                nz_fields[:nnz], y[:rows])

    def error(self, path, buf, code, offset, col, lines_before):
        """The ValueError of a parse error at ``offset`` of the chunk ``buf``."""
        line = lines_before + int(_count(buf, 0, offset)[0]) + 1
        what = _MESSAGES[code]
        if code in (E_FEW, E_MANY):
            what += f" (expected {len(self.codes)}, separated by {chr(self.sep)!r})"
        head = bytes(buf[offset:offset + 80])
        cut = min([head.find(s) for s in (bytes([self.sep]), b"\n", b"\r") if s in head],
                  default=len(head))
        token = head[:cut].decode("utf-8", "replace")
        if code == E_LABEL and token.strip("+-").lower() in ("nan", "inf", "infinity"):
            what = "label is NaN or infinite"
        if col >= 0:
            what = f"column {self.header[col]}: {what}"
        if code in (E_LABEL, E_LABEL_NONFINITE, E_INTEGER, E_NUMBER, E_NONFINITE, E_MANY):
            what += f": {token!r}"
        return ValueError(f"{path}: line {line}: {what}")


def _names(header):
    return ", ".join(header[:20]) + (", ..." if len(header) > 20 else "")


def _read_csv_header(path, line):
    """The column names of the header line ``line`` (bytes) of ``path``."""
    raw = line.rstrip(b"\r\n")
    if not raw:
        raise ValueError(f"{path}: line 1: empty; a CSV input starts with a header line "
                         f"naming its columns")
    if b'"' in raw:
        raise ValueError(f"{path}: line 1: {_MESSAGES[E_QUOTE]}")
    try:
        return raw.decode("utf-8").split(",")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: line 1: the header is not UTF-8 ({exc})") from None


class _FieldTracker:
    """The lowest and highest field that hit each id, over every chunk converted; gives
    the store's field column (an int32 block at a time) and the shared-id count."""

    BLOCK = 1 << 20

    def __init__(self, hash_bits, n_fields):
        dtype = _field_dtype(n_fields)
        self.seen = np.empty((1 << hash_bits, 2), dtype)
        self.seen[:, 0] = np.iinfo(dtype).max
        self.seen[:, 1] = -1
        self.lowest, self.highest = self.seen[:, 0], self.seen[:, 1]
        self.pending = None

    def add(self, pieces, background):
        """Record the (indices, nz_fields) of each piece on ``background`` (an executor
        of one thread), while the parser threads read the next chunk; at most one chunk
        waits. One thread does the random updates as fast as several would, whose
        shares of the ids would cost a mispredicted branch per nonzero."""
        self.wait()
        self.pending = background.submit(
            lambda: [_track_fields(i, f, self.seen) for i, f in pieces])

    def wait(self):
        """Wait for the chunk being tracked."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def blocks(self):
        """The field of every id, -1 where none hit it, in int32 blocks."""
        self.wait()
        for lo in range(0, self.lowest.size, self.BLOCK):
            hit = self.highest[lo:lo + self.BLOCK] >= 0
            yield np.where(hit, self.lowest[lo:lo + self.BLOCK], -1).astype(np.int32)

    def shared_ids(self):
        """Ids hit by more than one field."""
        self.wait()
        return int(sum(np.count_nonzero((self.highest[lo:lo + self.BLOCK] >= 0) & (
            self.highest[lo:lo + self.BLOCK] != self.lowest[lo:lo + self.BLOCK]))
            for lo in range(0, self.lowest.size, self.BLOCK)))


def _check_options(format, hash_bits, n_features, label, columns, kinds, integers):
    """The hash_bits of a conversion (None for libfm/libsvm) after checking the hashing
    arguments of ``convert``; ``kinds`` is returned as a dict."""
    hashed = format in ("criteo", "csv")
    if not hashed:
        given = [n for n, v in (("hash_bits", hash_bits), ("label", label),
                                ("columns", columns), ("kinds", kinds)) if v is not None]
        if given or integers != "bucket":
            raise ValueError(f"{', '.join(given) or 'integers'}: only for the hashed "
                             f"formats 'criteo' and 'csv', not {format!r}")
        return None, {}
    if hash_bits is None:
        hash_bits = DEFAULT_HASH_BITS
    if isinstance(hash_bits, bool) or not isinstance(hash_bits, (int, np.integer)) or \
            not 1 <= hash_bits <= 31:
        raise ValueError(f"hash_bits must be an int in [1, 31], got {hash_bits!r}")
    if n_features is not None:
        raise ValueError(f"n_features: a hashed store has 2^hash_bits features; give "
                         f"hash_bits instead (got n_features={n_features!r})")
    if integers not in ("bucket", "value"):
        raise ValueError(f"integers must be 'bucket' or 'value', got {integers!r}")
    kinds = dict(kinds or {})
    if format == "criteo":
        if label is not None or columns is not None or kinds:
            raise ValueError("label, columns and kinds: only for format 'csv' (the criteo "
                             "layout is fixed)")
        return int(hash_bits), kinds
    if not isinstance(label, str):
        raise ValueError(f"label: format 'csv' needs the name of the label column, got "
                         f"{label!r}")
    if columns is not None:
        columns = [columns] if isinstance(columns, str) else list(columns)
        if not columns or not all(isinstance(c, str) for c in columns) or \
                len(set(columns)) != len(columns) or label in columns:
            raise ValueError(f"columns must be distinct column names other than the "
                             f"label, got {columns!r}")
        if len(columns) > MAX_FIELDS:
            raise ValueError(f"columns: at most {MAX_FIELDS} feature columns")
    bad = {k: v for k, v in kinds.items() if v not in KINDS or not isinstance(k, str)}
    if bad:
        raise ValueError(f"kinds maps column names to one of {KINDS}, got {bad!r}")
    return int(hash_bits), kinds


def _hashing_header(layout):
    """What a store's header records about the hashing that made its ids."""
    return {"function": "murmur3_x86_32", "hash_bits": layout.hash_bits,
            "integers": layout.integers,
            "kinds": {name: _KIND_NAMES[int(code)]
                      for name, code, f in zip(layout.header, layout.codes, layout.fields)
                      if f >= 0}}


_KIND_NAMES = {CATEGORICAL: "categorical", BUCKET: "integer", INT_VALUE: "integer",
               NUMERIC: "numeric"}

