"""The libFM text parser in Numba: what ``load_libfm`` uses when the compiled parser
``afmfast._reader`` is missing (afmfast installed without a C compiler).

It implements the contract of ``csrc/_reader.pyx`` (its module docstring has the grammar):
``parse(buf, start, n_features_limit, n_threads, chunk_bytes)`` returns the same arrays,
and for bad input the same ``(code, offset)`` of the first error, so ``load_libfm`` gives
the same ``Dataset`` and the same message whichever parser runs (the tests hold the two
to each other). ``count`` and ``ERROR_CODES`` are the same too.

How it reads numbers exactly: a number of the grammar is ``m * 10^e`` for an integer
mantissa ``m``. When ``m <= 2^53`` and ``|e| <= 22`` both are exact doubles, and one IEEE
multiplication or division rounds correctly (Clinger's fast path), which is what the
compiled parser does too. The other tokens (19 or more significant digits, or a large
exponent) are rare; the Numba pass records where they are, and Python's ``float`` reads
them afterwards, which is correctly rounded as well. A token whose value then overflows
float32 is an error only if no other error comes before it in the file.

One pass, on one thread (``n_threads`` and ``chunk_bytes`` are accepted for the contract:
the result never depends on them); arrays are sized from the counts of newlines and
colons, as the compiled parser sizes them.
"""
import numpy as np
from numba import njit

__all__ = ["ERROR_CODES", "count", "parse", "parse_double"]

E_OK = 0
ERROR_CODES = {
    "EMPTY_LINE": 1, "LABEL_NAN": 2, "LABEL_NONFINITE": 3, "NO_COLON": 4, "NEG_ID": 5,
    "BAD_ID": 6, "BIG_ID": 7, "VALUE_NAN": 8, "VALUE_NONFINITE": 9, "ID_RANGE": 10,
    "NUL": 11, "LONE_CR": 12,
}
_E = ERROR_CODES
MAX_ID = 2147483647
_POW10 = np.array([10.0 ** i for i in range(23)])  # exact doubles


@njit(cache=True, nogil=True)
def _at(buf, i):
    """The byte at i, or 0 past the end: the end of the buffer reads like the NUL padding
    after the compiled parser's copy of an unterminated last line."""
    return np.int64(buf[i]) if i < buf.shape[0] else np.int64(0)


@njit(cache=True, nogil=True)
def _is_delim(c):
    return c == 32 or c == 9 or c == 10 or c == 13 or c == 0


@njit(cache=True, nogil=True)
def _number(buf, p, pow10):
    """A number of the grammar at p that ends at a delimiter: (status, end, value), status
    0 with the correctly rounded double, 2 when only ``float`` can round it (the value is
    then 0 and the caller records the token), 1 when the token is not a number."""
    neg = False
    c = _at(buf, p)
    if c == 45:  # '-'
        neg = True
        p += 1
    elif c == 43:  # '+'
        p += 1
    m = np.uint64(0)
    nsig = 0
    ndig = 0
    exp10 = 0
    slow = False
    d = _at(buf, p) - 48
    while 0 <= d <= 9:
        ndig += 1
        if nsig < 19:
            m = m * np.uint64(10) + np.uint64(d)
            if m != 0:
                nsig += 1
        else:
            slow = True
        p += 1
        d = _at(buf, p) - 48
    if _at(buf, p) == 46:  # '.'
        p += 1
        d = _at(buf, p) - 48
        while 0 <= d <= 9:
            ndig += 1
            if nsig < 19:
                m = m * np.uint64(10) + np.uint64(d)
                if m != 0:
                    nsig += 1
                exp10 -= 1
            else:
                slow = True
            p += 1
            d = _at(buf, p) - 48
    if ndig == 0:
        return 1, p, 0.0
    c = _at(buf, p)
    if c == 101 or c == 69:  # 'e', 'E'
        p += 1
        eneg = False
        c = _at(buf, p)
        if c == 45:
            eneg = True
            p += 1
        elif c == 43:
            p += 1
        d = _at(buf, p) - 48
        if not (0 <= d <= 9):
            return 1, p, 0.0
        ex = 0
        while 0 <= d <= 9:
            if ex < 1000000:  # saturate: beyond this the value is 0 or inf anyway
                ex = ex * 10 + d
            p += 1
            d = _at(buf, p) - 48
        exp10 += -ex if eneg else ex
    if not _is_delim(_at(buf, p)):
        return 1, p, 0.0
    if slow or m > np.uint64(1) << np.uint64(53) or exp10 < -22 or exp10 > 22:
        return 2, p, 0.0
    v = float(m)
    if exp10 < 0:
        v = v / pow10[-exp10]
    else:
        v = v * pow10[exp10]
    return 0, p, -v if neg else v


@njit(cache=True, nogil=True)
def _record(slow, s, begin, end, token, is_value, slot):
    slow[s, 0] = begin
    slow[s, 1] = end
    slow[s, 2] = token
    slow[s, 3] = is_value
    slow[s, 4] = slot


@njit(cache=True, nogil=True)
def _parse(buf, start, limit, pow10, indptr, indices, values, y, slow):
    """The rows of buf[start:] into the arrays; returns (code, error offset, rows,
    nonzeros, max id, slow tokens). Row ``slow[s]`` = (number start, number end, error
    token start, 0 for a label or 1 for a value, its slot in y or values)."""
    n = buf.shape[0]
    p = start
    row = 0
    k = 0
    mx = -1
    ns = 0
    indptr[0] = 0
    while p < n:
        line = p
        while _at(buf, p) == 32 or _at(buf, p) == 9:
            p += 1
        c = _at(buf, p)
        if c == 10 or c == 13 or c == 0:
            return 1, line, row, k, mx, ns  # EMPTY_LINE
        tok = p
        status, p, v = _number(buf, p, pow10)
        if status == 1:
            return 2, tok, row, k, mx, ns  # LABEL_NAN
        if status == 2:
            _record(slow, ns, tok, p, tok, 0, row)
            ns += 1
        elif not np.isfinite(np.float32(v)):
            return 3, tok, row, k, mx, ns  # LABEL_NONFINITE
        y[row] = np.float32(v)
        while True:
            while _at(buf, p) == 32 or _at(buf, p) == 9:
                p += 1
            c = _at(buf, p)
            if c == 10:
                p += 1
                break
            if c == 13:
                c1 = _at(buf, p + 1)
                if c1 == 10:
                    p += 2
                    break
                if c1 == 0:  # CR as the very last byte
                    p += 1
                    break
                return 12, p, row, k, mx, ns  # LONE_CR
            if c == 0:
                p = n
                break
            tok = p
            d = c - 48
            if not (0 <= d <= 9):
                if c == 45 and 0 <= _at(buf, p + 1) - 48 <= 9:
                    return 5, tok, row, k, mx, ns  # NEG_ID
                q = p
                while not _is_delim(_at(buf, q)) and _at(buf, q) != 58:
                    q += 1
                return (6 if _at(buf, q) == 58 else 4), tok, row, k, mx, ns  # BAD_ID/NO_COLON
            fid = 0
            while 0 <= d <= 9:
                fid = fid * 10 + d
                if fid > MAX_ID:
                    return 7, tok, row, k, mx, ns  # BIG_ID
                p += 1
                d = _at(buf, p) - 48
            if _at(buf, p) != 58:  # ':'
                q = p
                while not _is_delim(_at(buf, q)) and _at(buf, q) != 58:
                    q += 1
                return (6 if _at(buf, q) == 58 else 4), tok, row, k, mx, ns
            p += 1
            if fid >= limit:
                return 10, tok, row, k, mx, ns  # ID_RANGE
            num = p
            status, p, v = _number(buf, p, pow10)
            if status == 1:
                return 8, tok, row, k, mx, ns  # VALUE_NAN
            if status == 2:
                _record(slow, ns, num, p, tok, 1, k)
                ns += 1
            elif not np.isfinite(np.float32(v)):
                return 9, tok, row, k, mx, ns  # VALUE_NONFINITE
            indices[k] = fid
            values[k] = np.float32(v)
            k += 1
            if fid > mx:
                mx = fid
        row += 1
        indptr[row] = k
    return 0, 0, row, k, mx, ns


def _bytes(buf):
    """A uint8 view of any C-contiguous byte buffer (bytes, mmap, memoryview)."""
    return np.frombuffer(buf, dtype=np.uint8) if len(buf) else np.empty(0, np.uint8)


def count(buf, start=0, end=-1):
    """(newlines, colons, NUL bytes) in buf[start:end] (end -1: to the end of buf)."""
    data = _bytes(buf)
    n = data.shape[0]
    end = n if end < 0 or end > n else end
    start = max(start, 0)
    if start >= end:
        return 0, 0, 0
    part = data[start:end]
    return (int(np.count_nonzero(part == 10)), int(np.count_nonzero(part == 58)),
            int(np.count_nonzero(part == 0)))


def parse(buf, start=0, n_features_limit=2147483648, n_threads=1, chunk_bytes=1 << 18):
    """Parse libFM text in buf[start:]; the contract of ``afmfast._reader.parse``."""
    data = _bytes(buf)
    n = data.shape[0]
    if start < 0 or start > n:
        raise ValueError(f"start must be in [0, {n}], got {start}")
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1, got {n_threads}")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    body = data[start:]
    nul = np.flatnonzero(body == 0)
    if nul.size:
        return (_E["NUL"], start + int(nul[0]), None, None, None, None, -1)
    newlines, colons, _ = count(buf, start)
    rows_cap = newlines + 1
    indptr = np.empty(rows_cap + 1, dtype=np.int64)
    indices = np.empty(max(colons, 1), dtype=np.int32)
    values = np.empty(max(colons, 1), dtype=np.float32)
    y = np.empty(rows_cap, dtype=np.float32)
    # at most one slow token per label and per value
    slow = np.empty((rows_cap + colons, 5), dtype=np.int64)
    code, offset, rows, nnz, max_id, n_slow = _parse(
        data, start, n_features_limit, _POW10, indptr, indices, values, y,
        slow)
    for s in range(n_slow):  # in file order: the first that overflows float32 counts
        begin, end, token, is_value, slot = (int(x) for x in slow[s])
        if code and token >= offset:
            break
        with np.errstate(over="ignore"):  # an overflow is the error reported below
            value = np.float32(float(bytes(data[begin:end])))
        if not np.isfinite(value):
            code = _E["VALUE_NONFINITE"] if is_value else _E["LABEL_NONFINITE"]
            offset = token
            break
        (values if is_value else y)[slot] = value
    if code:
        return (int(code), int(offset), None, None, None, None, -1)
    return (0, 0, indptr[:rows + 1], indices[:nnz], values[:nnz], y[:rows], int(max_id))


def parse_double(token, fast=True):
    """The double the parser reads for one number token (None if the grammar rejects
    it), before the float32 rounding; ``fast`` is accepted for the compiled parser's
    signature (this parser has one path)."""
    data = _bytes(token)
    if not data.size:
        return None
    status, end, value = _number(data, 0, _POW10)
    if status == 1 or end != data.size:
        return None
    return float(bytes(token)) if status == 2 else value
