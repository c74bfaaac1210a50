"""The libFM text parser in Numba: what ``load_libfm`` uses when the compiled parser
``afmfast._reader`` is missing (afmfast installed without a C compiler).

It implements the contract of ``csrc/_reader.pyx`` (its module docstring has the grammar):
``parse(buf, start, n_features_limit, n_threads, chunk_bytes, out)`` returns the same
arrays, and for bad input the same ``(code, offset)`` of the first error, so
``load_libfm`` gives the same ``Dataset`` and the same message whichever parser runs
(the tests hold the two to each other). ``count`` and ``ERROR_CODES`` are the same too.

How it reads numbers exactly: a number of the grammar is ``m * 10^e`` for an integer
mantissa ``m``. When ``m <= 2^53`` and ``|e| <= 22`` both are exact doubles, and one IEEE
multiplication or division rounds correctly (Clinger's fast path), which is what the
compiled parser does too. The Numba pass records where the other tokens are (a mantissa
above 2^53, as in most of the 17-digit numbers that Python's ``repr`` writes, or an
exponent beyond 22), and Python's ``float``, correctly rounded as well, reads them in
batches: when a batch is full the pass stops, the batch is read, and the pass resumes at
the start of the line it was in, so the scratch memory stays bounded. Such tokens cost
far more than the others: a file of full-precision doubles reads much slower than one of
short decimals. A token whose value overflows float32 is an error only if no other error
comes before it in the file.

A counting pass (newlines, colons, NUL bytes) sizes the arrays, as in the compiled
parser, then the parsing pass runs on one thread (``n_threads`` and ``chunk_bytes`` are
accepted for the contract: the result never depends on them).
"""
import numpy as np
from numba import njit

__all__ = ["ERROR_CODES", "count", "parse", "parse_double"]

# The compiled parser's error codes (csrc/_reader.pyx); Numba reads these module
# constants as compile-time constants.
E_EMPTY_LINE = 1
E_LABEL_NAN = 2
E_LABEL_NONFINITE = 3
E_NO_COLON = 4
E_NEG_ID = 5
E_BAD_ID = 6
E_BIG_ID = 7
E_VALUE_NAN = 8
E_VALUE_NONFINITE = 9
E_ID_RANGE = 10
E_NUL = 11
E_LONE_CR = 12
ERROR_CODES = {
    "EMPTY_LINE": E_EMPTY_LINE, "LABEL_NAN": E_LABEL_NAN,
    "LABEL_NONFINITE": E_LABEL_NONFINITE, "NO_COLON": E_NO_COLON, "NEG_ID": E_NEG_ID,
    "BAD_ID": E_BAD_ID, "BIG_ID": E_BIG_ID, "VALUE_NAN": E_VALUE_NAN,
    "VALUE_NONFINITE": E_VALUE_NONFINITE, "ID_RANGE": E_ID_RANGE, "NUL": E_NUL,
    "LONE_CR": E_LONE_CR,
}
MAX_ID = 2147483647
_POW10 = np.array([10.0 ** i for i in range(23)])  # exact doubles
_RESUME = -1  # not an error: the Numba pass stopped to have its slow tokens read
# Slow tokens read per batch: bounds the scratch memory (40 bytes a token in the Numba
# pass, a bytes object and a float in Python) whatever the file.
_SLOW_BATCH = 1 << 16


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
def _malformed_id(buf, p):
    """The error of an id:value token whose id is broken at p: BAD_ID when the token
    has a ':' (an id that is not a plain number), else NO_COLON."""
    while not _is_delim(_at(buf, p)) and _at(buf, p) != 58:
        p += 1
    return E_BAD_ID if _at(buf, p) == 58 else E_NO_COLON


@njit(cache=True, nogil=True)
def _parse(buf, p, row, k, mx, limit, pow10, indptr, indices, values, y, slow):
    """The rows of buf from byte p, a line start, into the arrays, ``row`` rows with
    ``k`` nonzeros and the largest id ``mx`` being read already; returns (code, error
    offset, p, rows, nonzeros, max id, slow tokens). Row ``slow[s]`` = (number start,
    number end, error token start, 0 for a label or 1 for a value, its slot in y or
    values). Code _RESUME: ``slow`` is full; p, rows and nonzeros are then those at the
    start of the line being read, whose tokens are not in ``slow`` (the max id may count
    some of its ids: they are read again)."""
    n = buf.shape[0]
    ns = 0
    indptr[0] = 0
    while p < n:
        line = p
        k_line = k
        ns_line = ns
        while _at(buf, p) == 32 or _at(buf, p) == 9:
            p += 1
        c = _at(buf, p)
        if c == 10 or c == 13 or c == 0:
            return E_EMPTY_LINE, line, p, row, k, mx, ns
        tok = p
        status, p, v = _number(buf, p, pow10)
        if status == 1:
            return E_LABEL_NAN, tok, p, row, k, mx, ns
        if status == 2:
            if ns == slow.shape[0]:
                return _RESUME, 0, line, row, k_line, mx, ns_line
            _record(slow, ns, tok, p, tok, 0, row)
            ns += 1
        elif not np.isfinite(np.float32(v)):
            return E_LABEL_NONFINITE, tok, p, row, k, mx, ns
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
                return E_LONE_CR, p, p, row, k, mx, ns
            if c == 0:
                p = n
                break
            tok = p
            d = c - 48
            if not (0 <= d <= 9):
                if c == 45 and 0 <= _at(buf, p + 1) - 48 <= 9:
                    return E_NEG_ID, tok, p, row, k, mx, ns
                return _malformed_id(buf, p), tok, p, row, k, mx, ns
            fid = 0
            while 0 <= d <= 9:
                fid = fid * 10 + d
                if fid > MAX_ID:
                    return E_BIG_ID, tok, p, row, k, mx, ns
                p += 1
                d = _at(buf, p) - 48
            if _at(buf, p) != 58:  # ':'
                return _malformed_id(buf, p), tok, p, row, k, mx, ns
            p += 1
            if fid >= limit:
                return E_ID_RANGE, tok, p, row, k, mx, ns
            num = p
            status, p, v = _number(buf, p, pow10)
            if status == 1:
                return E_VALUE_NAN, tok, p, row, k, mx, ns
            if status == 2:
                if ns == slow.shape[0]:
                    return _RESUME, 0, line, row, k_line, mx, ns_line
                _record(slow, ns, num, p, tok, 1, k)
                ns += 1
            elif not np.isfinite(np.float32(v)):
                return E_VALUE_NONFINITE, tok, p, row, k, mx, ns
            indices[k] = fid
            values[k] = np.float32(v)
            k += 1
            if fid > mx:
                mx = fid
        row += 1
        indptr[row] = k
    return 0, 0, p, row, k, mx, ns


@njit(cache=True, nogil=True)
def _count(buf, start, end):
    """(newlines, colons, NUL bytes, index of the first NUL or -1) in buf[start:end],
    in one pass with branch-free sums that LLVM vectorises (NumPy would take one pass
    and one temporary the size of the file per byte value)."""
    nl = 0
    co = 0
    nu = 0
    for i in range(start, end):
        c = buf[i]
        nl += c == 10
        co += c == 58
        nu += c == 0
    first = -1
    if nu:
        first = start
        while buf[first] != 0:
            first += 1
    return nl, co, nu, first


@njit(cache=True, nogil=True)
def _gather(buf, slow):
    """The tokens of the rows of ``slow``, each followed by a space, in one array."""
    size = 0
    for s in range(slow.shape[0]):
        size += slow[s, 1] - slow[s, 0] + 1
    out = np.empty(size, dtype=np.uint8)
    q = 0
    for s in range(slow.shape[0]):
        for i in range(slow[s, 0], slow[s, 1]):
            out[q] = buf[i]
            q += 1
        out[q] = 32
        q += 1
    return out


def _read_slow(data, slow, values, y):
    """Reads the tokens of the rows of ``slow`` (in file order) with Python's float,
    rounds them to float32 and puts them in their slots of values and y; returns the
    (code, offset) of the first that overflows float32, None if none does."""
    if not slow.shape[0]:
        return None
    tokens = _gather(data, slow).tobytes().split()
    with np.errstate(over="ignore"):  # an overflow is the error reported below
        numbers = np.fromiter(map(float, tokens), np.float64, len(tokens))
        numbers = numbers.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(numbers))
    if bad.size:
        _, _, token, is_value, _ = slow[bad[0]]
        return E_VALUE_NONFINITE if is_value else E_LABEL_NONFINITE, int(token)
    is_value = slow[:, 3] == 1
    values[slow[is_value, 4]] = numbers[is_value]
    y[slow[~is_value, 4]] = numbers[~is_value]
    return None


def _bytes(buf):
    """A uint8 view of any C-contiguous byte buffer (bytes, mmap, memoryview)."""
    return np.frombuffer(buf, dtype=np.uint8) if len(buf) else np.empty(0, np.uint8)


def count(buf, start=0, end=-1):
    """(newlines, colons, NUL bytes) in buf[start:end] (end -1: to the end of buf)."""
    data = _bytes(buf)
    n = data.shape[0]
    end = n if end < 0 or end > n else end
    return _count(data, max(start, 0), end)[:3]


def parse(buf, start=0, n_features_limit=2147483648, n_threads=1, chunk_bytes=1 << 18,
          out=None):
    """Parse libFM text in buf[start:]; the contract of ``afmfast._reader.parse`` (with
    ``out``, the rows are parsed into arrays of their own and copied into out's)."""
    data = _bytes(buf)
    n = data.shape[0]
    if start < 0 or start > n:
        raise ValueError(f"start must be in [0, {n}], got {start}")
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1, got {n_threads}")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    newlines, colons, _, first_nul = _count(data, start, n)
    if first_nul >= 0:
        return (E_NUL, first_nul, None, None, None, None, -1)
    rows_cap = newlines + 1
    indptr = np.empty(rows_cap + 1, dtype=np.int64)
    indices = np.empty(max(colons, 1), dtype=np.int32)
    values = np.empty(max(colons, 1), dtype=np.float32)
    y = np.empty(rows_cap, dtype=np.float32)
    slow = np.empty((_SLOW_BATCH, 5), dtype=np.int64)
    code, p, rows, nnz, max_id = _RESUME, start, 0, 0, -1
    while code == _RESUME:
        code, offset, p, rows, nnz, max_id, n_slow = _parse(
            data, p, rows, nnz, max_id, n_features_limit, _POW10, indptr, indices,
            values, y, slow)
        found = slow[:n_slow]
        if code > 0:  # only the tokens before the error the Numba pass found count
            found = found[found[:, 2] < offset]
        error = _read_slow(data, found, values, y)
        if error is not None:
            code, offset = error
        elif code == _RESUME and n_slow == 0:  # one line has more slow tokens than fit
            slow = np.empty((2 * slow.shape[0], 5), dtype=np.int64)
    if code:
        return (int(code), int(offset), None, None, None, None, -1)
    parsed = (indptr[:rows + 1], indices[:nnz], values[:nnz], y[:rows])
    if out is None:
        return (0, 0, *parsed, int(max_id))
    given = out(rows, nnz)
    for name, array, source in zip(("indptr", "indices", "values", "y"), given, parsed):
        if len(array) != len(source):
            raise ValueError(f"out: {name} has {len(array)} entries, {len(source)} "
                             f"expected")
    given[1][:], given[2][:], given[3][:] = parsed[1:]
    given[0][1:] = parsed[0][1:] + given[0][0]
    return (0, 0, *given, int(max_id))


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
