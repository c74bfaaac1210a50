# cython: language_level=3
"""Native parser of libFM text (compiled to ``afmfast._reader``); ``afmfast.dataset.load_libfm``
is its only caller and turns its error codes into messages.

Contract of ``parse(data, start=0, n_features_limit=2^31, n_threads=1, min_chunk=1 MB)``:

- ``data`` is a ``bytes`` object holding a whole file; parsing starts at byte ``start``
  (past a BOM). ``bytes`` is required because CPython keeps a NUL after its last byte, a
  sentinel that lets the number loops run without bounds checks. NUL bytes inside the
  file are rejected before parsing, so a NUL always means "end of buffer".
- Grammar, one row per line: ``label (id:value)*``. Separators are runs of spaces or
  tabs (also before the label and at the end of a line). Lines end with LF or CRLF; the
  last line may lack its terminator; a lone CR is an error. A line with nothing but
  blanks is an error ("empty line"), so a stray blank line never silently drops a row,
  while the single newline that ends the last row is just a terminator.
  Numbers (label, value): ``[+-]?(digits[.digits?] | .digits)([eE][+-]?digits)?``, the
  decimal forms Python's ``float()`` accepts (no inf/nan, hex or underscores); the
  result is the correctly rounded double, i.e. exactly ``float(token)``, then rounded
  to float32. Ids: plain decimal digits, at most 2^31-1, used as they are.
- Returns ``(0, 0, indptr int64, indices int32, values float32, y float32, max_id)``
  (``max_id`` is -1 without nonzeros), or ``(code, offset, None, ...)`` for the first
  error: ``offset`` is the byte where the faulty token (or line, for an empty line)
  starts. Line numbers are counted by the caller from the offset, only on error, so the
  hot loop keeps no line counter.

Structure: the buffer is cut at line starts into up to ``n_threads`` chunks; a counting
pass per chunk (newlines, colons, NULs; vectorised by the compiler) sizes the arrays
exactly and, prefix-summed, gives each chunk its first row and nonzero slot; then
``parse_range`` makes a single pass over each chunk, in parallel (``prange``). The
result, and the first error reported (that of the lowest failing chunk), do not depend
on ``n_threads``.
"""
import numpy as np

from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.math cimport isfinite
from libc.string cimport memchr
from cython.parallel cimport prange

cdef extern from *:
    """
    #include <stdlib.h>
    #include <locale.h>
    /* Exact powers of ten: 10^k is a double without rounding for k <= 22, the
       condition of the Clinger fast path. */
    static const double afm_pow10[23] = {
        1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11,
        1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};
    /* strtod follows LC_NUMERIC, which a program may have changed (a decimal comma
       would break "0.5"); the "C" locale keeps it equal to Python's float(). */
    static locale_t afm_c_locale = (locale_t)0;
    static void afm_init_locale(void) {
        if (!afm_c_locale) afm_c_locale = newlocale(LC_ALL_MASK, "C", (locale_t)0);
    }
    static double afm_strtod(const char *s, char **end) {
        if (afm_c_locale) return strtod_l(s, end, afm_c_locale);
        return strtod(s, end);
    }
    """
    const double* afm_pow10
    void afm_init_locale() nogil
    double afm_strtod(const char* s, char** end) nogil

afm_init_locale()

# Error codes; afmfast.dataset maps them to messages (keep both in sync, a test checks
# that every code has a message).
cdef enum:
    E_OK = 0
    E_EMPTY_LINE = 1
    E_LABEL_NAN = 2        # label is not a number
    E_LABEL_NONFINITE = 3  # label parses to inf/nan or overflows float32
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


cdef inline bint is_delim(char c) noexcept nogil:
    return c == b' ' or c == b'\t' or c == b'\n' or c == b'\r' or c == 0


cdef inline unsigned digit(char c) noexcept nogil:
    # > 9 for anything that is not '0'..'9' (unsigned wrap-around)
    return <unsigned>(<unsigned char>c) - 48u


cdef inline int parse_number(const char** pp, double* out) noexcept nogil:
    """Parse a number at *pp that must end at a delimiter. 0 and *pp moved past it on
    success, 1 when the token is not a number of the grammar."""
    cdef const char* p = pp[0]
    cdef const char* s = p
    cdef char* endp
    cdef bint neg = False
    cdef bint slow = False
    cdef bint eneg = False
    cdef uint64_t m = 0
    cdef int nsig = 0
    cdef int ndig = 0
    cdef int ex = 0
    cdef long exp10 = 0
    cdef unsigned d
    cdef double v
    if p[0] == b'-':
        neg = True
        p += 1
    elif p[0] == b'+':
        p += 1
    d = digit(p[0])
    while d <= 9:
        ndig += 1
        if nsig < 19:  # 19 digits always fit in uint64
            m = m * 10 + d
            if m != 0:
                nsig += 1
        else:
            slow = True
        p += 1
        d = digit(p[0])
    if p[0] == b'.':
        p += 1
        d = digit(p[0])
        while d <= 9:
            ndig += 1
            if nsig < 19:
                m = m * 10 + d
                if m != 0:
                    nsig += 1
                exp10 -= 1
            else:
                slow = True
            p += 1
            d = digit(p[0])
    if ndig == 0:
        return 1
    if p[0] == b'e' or p[0] == b'E':
        p += 1
        if p[0] == b'-':
            eneg = True
            p += 1
        elif p[0] == b'+':
            p += 1
        d = digit(p[0])
        if d > 9:
            return 1
        while d <= 9:
            if ex < 1000000:  # saturate: beyond this the result is 0 or inf anyway
                ex = ex * 10 + <int>d
            p += 1
            d = digit(p[0])
        exp10 += -ex if eneg else ex
    if not is_delim(p[0]):
        return 1
    if not slow and m <= (<uint64_t>1 << 53) and -22 <= exp10 <= 22:
        # Clinger's fast path: exact m and exact 10^k, so one IEEE operation rounds
        # correctly, the same double as a full decimal conversion.
        v = <double>m
        if exp10 < 0:
            v = v / afm_pow10[-exp10]
        else:
            v = v * afm_pow10[exp10]
        if neg:
            v = -v
    else:
        # Long mantissas and big exponents. The token was checked against the grammar
        # and is followed by a delimiter, so strtod reads exactly [s, p) in place.
        v = afm_strtod(s, &endp)
        if endp != p:
            return 1
    out[0] = v
    pp[0] = p
    return 0


cdef struct Out:
    int64_t* indptr   # indptr[0] of the range already written by the caller
    int32_t* indices
    float* values
    float* y


cdef int parse_range(const char* base, Py_ssize_t start, Py_ssize_t end, int64_t nnz_base,
                     int64_t limit, Out* o, Py_ssize_t* n_rows, Py_ssize_t* nnz,
                     int64_t* max_id, Py_ssize_t* err_off) noexcept nogil:
    """Parse the rows in [start, end) (start at a line start, end after a LF or at the
    end of the buffer) into ``o``. Returns an error code, E_OK on success."""
    cdef const char* p = base + start
    cdef const char* e = base + end
    cdef const char* line
    cdef const char* tok
    cdef const char* q
    cdef Py_ssize_t row = 0
    cdef Py_ssize_t k = 0
    cdef int64_t mx = -1
    cdef int64_t fid
    cdef double v
    cdef float f
    cdef unsigned d
    cdef char c
    cdef int code = E_OK
    while p < e:
        line = p
        while p[0] == b' ' or p[0] == b'\t':
            p += 1
        c = p[0]
        if c == b'\n' or c == b'\r' or c == 0:
            tok = line
            code = E_EMPTY_LINE
            break
        tok = p
        if parse_number(&p, &v):
            code = E_LABEL_NAN
            break
        f = <float>v
        if not isfinite(f):
            code = E_LABEL_NONFINITE
            break
        o.y[row] = f
        while True:
            while p[0] == b' ' or p[0] == b'\t':
                p += 1
            c = p[0]
            if c == b'\n':
                p += 1
                break
            if c == b'\r':
                if p[1] == b'\n':
                    p += 2
                    break
                if p[1] == 0:  # CR as the very last byte
                    p += 1
                    break
                tok = p
                code = E_LONE_CR
                break
            if c == 0:
                break
            tok = p
            d = digit(c)
            if d > 9:
                if c == b'-' and digit(p[1]) <= 9:
                    code = E_NEG_ID
                    break
                q = p
                while not is_delim(q[0]) and q[0] != b':':
                    q += 1
                code = E_BAD_ID if q[0] == b':' else E_NO_COLON
                break
            fid = 0
            while d <= 9:
                fid = fid * 10 + d
                if fid > 2147483647:
                    break
                p += 1
                d = digit(p[0])
            if fid > 2147483647:
                code = E_BIG_ID
                break
            if p[0] != b':':
                q = p
                while not is_delim(q[0]) and q[0] != b':':
                    q += 1
                code = E_BAD_ID if q[0] == b':' else E_NO_COLON
                break
            p += 1
            if fid >= limit:
                code = E_ID_RANGE
                break
            if parse_number(&p, &v):
                code = E_VALUE_NAN
                break
            f = <float>v
            if not isfinite(f):
                code = E_VALUE_NONFINITE
                break
            o.indices[k] = <int32_t>fid
            o.values[k] = f
            k += 1
            if fid > mx:
                mx = fid
        if code != E_OK:
            break
        row += 1
        o.indptr[row] = nnz_base + k
    n_rows[0] = row
    nnz[0] = k
    max_id[0] = mx
    if code != E_OK:
        err_off[0] = tok - base
    return code


cdef void count_range(const unsigned char* p, Py_ssize_t n, Py_ssize_t* newlines,
                      Py_ssize_t* colons, Py_ssize_t* nuls) noexcept nogil:
    # Blocks of 255 bytes with byte-wide counters let the compiler keep the compares in
    # wide vector registers (a 64-bit counter per byte would not vectorise as well).
    cdef Py_ssize_t i, j, blk
    cdef Py_ssize_t a = 0, b = 0, z = 0
    cdef unsigned char ca, cb, cz
    cdef unsigned char ch
    i = 0
    while i < n:
        blk = n - i
        if blk > 255:
            blk = 255
        ca = 0
        cb = 0
        cz = 0
        for j in range(blk):
            ch = p[i + j]
            ca += ch == 10
            cb += ch == 58
            cz += ch == 0
        a += ca
        b += cb
        z += cz
        i += blk
    newlines[0] = a
    colons[0] = b
    nuls[0] = z


def count(bytes data, Py_ssize_t start=0):
    """(newlines, colons, NUL bytes) in data[start:]; exposed for tests and benchmarks."""
    cdef const unsigned char* base = <const unsigned char*><const char*>data
    cdef Py_ssize_t n = len(data) - start
    cdef Py_ssize_t a, b, z
    with nogil:
        count_range(base + start, n, &a, &b, &z)
    return a, b, z


cdef void parse_chunk(const char* base, Py_ssize_t start, Py_ssize_t end, Py_ssize_t row0,
                      Py_ssize_t nnz0, int64_t limit, int64_t* indptr, int32_t* indices,
                      float* values, float* y, int64_t* res) noexcept nogil:
    """parse_range of one chunk into its slots (rows from row0, nonzeros from nnz0);
    res receives code, error offset, rows, nonzeros, max id. Only locals, so it can run
    as a prange body."""
    cdef Out o
    cdef Py_ssize_t rows = 0, nnz = 0, off = 0
    cdef int64_t mx = -1
    o.indptr = indptr + row0
    o.indices = indices + nnz0
    o.values = values + nnz0
    o.y = y + row0
    res[0] = parse_range(base, start, end, nnz0, limit, &o, &rows, &nnz, &mx, &off)
    res[1] = off
    res[2] = rows
    res[3] = nnz
    res[4] = mx


# Below this many bytes per thread, starting threads costs more than it saves.
MIN_CHUNK_BYTES = 1 << 20


def parse(bytes data, Py_ssize_t start=0, int64_t n_features_limit=2147483648,
          int n_threads=1, Py_ssize_t min_chunk=MIN_CHUNK_BYTES):
    """Parse libFM text in data[start:]; see the module docstring for the result.

    With ``n_threads`` > 1 the buffer is cut at line starts into up to that many chunks
    of at least ``min_chunk`` bytes (tests make it tiny); each is counted and parsed by its own thread into its
    slots. The result (and the first error reported) does not depend on n_threads."""
    cdef const char* base = data
    cdef Py_ssize_t n = len(data)
    cdef Py_ssize_t i, c, n_chunks
    cdef const char* q
    cdef int code = E_OK
    cdef Py_ssize_t err_off = 0
    if start < 0 or start > n:
        raise ValueError(f"start must be in [0, {n}], got {start}")
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1, got {n_threads}")
    n_chunks = min(<Py_ssize_t>n_threads, max(1, (n - start) // max(min_chunk, 1)))
    # chunk c covers [bounds[c], bounds[c + 1]); every inner bound follows a LF
    bounds_a = np.empty(n_chunks + 1, dtype=np.intp)
    cdef Py_ssize_t[::1] bounds = bounds_a
    bounds[0] = start
    for c in range(1, n_chunks):
        i = start + (n - start) * c // n_chunks
        if i < bounds[c - 1]:
            i = bounds[c - 1]
        q = <const char*>memchr(base + i, b'\n', n - i)
        bounds[c] = n if q == NULL else (q - base) + 1
    bounds[n_chunks] = n
    stats_a = np.zeros((n_chunks, 3), dtype=np.intp)   # newlines, colons, NULs
    cdef Py_ssize_t[:, ::1] stats = stats_a
    with nogil:
        for c in prange(n_chunks, num_threads=n_chunks, schedule="static"):
            count_range(<const unsigned char*>base + bounds[c], bounds[c + 1] - bounds[c],
                        &stats[c, 0], &stats[c, 1], &stats[c, 2])
    if stats_a[:, 2].any():
        return (E_NUL, data.index(b"\0", start), None, None, None, None, -1)
    # Rows of a chunk: one per LF, plus an unterminated last line in the last chunk;
    # blank lines are errors, so on success these are exact for all but that last slot,
    # and a valid file has exactly one colon per nonzero.
    row0_a = np.zeros(n_chunks + 1, dtype=np.intp)
    np.cumsum(stats_a[:, 0], out=row0_a[1:])
    row0_a[n_chunks] += 1
    nnz0_a = np.zeros(n_chunks + 1, dtype=np.intp)
    np.cumsum(stats_a[:, 1], out=nnz0_a[1:])
    cdef Py_ssize_t[::1] row0 = row0_a
    cdef Py_ssize_t[::1] nnz0 = nnz0_a
    cdef Py_ssize_t rows_cap = row0[n_chunks]
    cdef Py_ssize_t colons = nnz0[n_chunks]
    indptr = np.empty(rows_cap + 1, dtype=np.int64)
    indices = np.empty(max(colons, 1), dtype=np.int32)
    values = np.empty(max(colons, 1), dtype=np.float32)
    y = np.empty(rows_cap, dtype=np.float32)
    cdef int64_t[::1] indptr_v = indptr
    cdef int32_t[::1] indices_v = indices
    cdef float[::1] values_v = values
    cdef float[::1] y_v = y
    indptr_v[0] = 0
    res_a = np.zeros((n_chunks, 5), dtype=np.int64)  # code, err_off, rows, nnz, max_id
    cdef int64_t[:, ::1] res = res_a
    with nogil:
        for c in prange(n_chunks, num_threads=n_chunks, schedule="static"):
            parse_chunk(base, bounds[c], bounds[c + 1], row0[c], nnz0[c], n_features_limit,
                        &indptr_v[0], &indices_v[0], &values_v[0], &y_v[0], &res[c, 0])
    for c in range(n_chunks):
        if res[c, 0] != E_OK:
            # chunks before c parsed cleanly, so this is the first error of the file
            return (int(res[c, 0]), int(res[c, 1]), None, None, None, None, -1)
        # a chunk that parsed cleanly filled exactly its slots (see above)
        last = c == n_chunks - 1
        if res[c, 3] != nnz0[c + 1] - nnz0[c] or (
                not last and res[c, 2] != row0[c + 1] - row0[c]):
            raise AssertionError(f"libFM reader: chunk {c} filled {res[c, 2]} rows and "
                                 f"{res[c, 3]} nonzeros, counted otherwise")
    n_rows = row0[n_chunks - 1] + res[n_chunks - 1, 2]
    nnz = colons
    max_id = int(res_a[:, 4].max())
    return (0, 0, indptr[: n_rows + 1], indices[:nnz], values[:nnz], y[:n_rows], max_id)


def parse_double(bytes token):
    """The double the parser reads for one number token (None if the grammar rejects
    it), before the float32 rounding; lets tests compare with Python's float()."""
    cdef const char* p = token
    cdef const char* s = p
    cdef double v
    if len(token) == 0 or parse_number(&p, &v) or p != s + len(token):
        return None
    return v
