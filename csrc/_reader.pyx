# cython: language_level=3
"""Native parser of libFM text (compiled to ``afmfast._reader``); ``afmfast.data.libfm.load_libfm``
is its only caller and turns its error codes into messages.

Contract of ``parse(buf, start=0, n_features_limit=2^31, n_threads=1, chunk_bytes=256 KiB,
out=None)``:

- ``buf`` is any C-contiguous byte buffer holding a whole file: ``bytes``, or the read-only
  ``mmap`` of the file that ``load_libfm`` passes. Parsing starts at byte ``start`` (past a
  BOM). No sentinel after the last byte is needed: the lines up to the last LF are parsed
  in place, where every scan stops at a line's LF and the 8-byte loads of the fast paths
  run only at least 32 bytes before the end of ``buf``; the bytes after the last LF (an
  unterminated last line) are parsed from a copy followed by NUL bytes. NUL bytes inside
  the file are rejected before parsing, so a NUL always means "end of that copy".
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
- ``out``, when given, is called once the rows and nonzeros are known, as
  ``out(n_rows, nnz)``, and returns the arrays to fill, ``(indptr, indices, values, y)``
  of exactly n_rows + 1, nnz, nnz and n_rows entries (writable, C-contiguous, of the
  dtypes above): a caller can parse straight into memory it reuses (the store's
  conversion buffers). ``indptr[0]`` is read, not written: the row ends are offset
  by it. The result then holds those arrays; after an error their content is
  undefined. ``out`` is not called when the counting pass finds an error (a NUL byte).

Structure: ``[start, last LF]`` is cut at line starts into chunks of about
``chunk_bytes``; the unterminated last line, if any, is one more chunk. A counting pass
per chunk (newlines, colons, NULs; vectorised by the compiler) sizes the arrays exactly
and, prefix-summed, gives each chunk its first row and nonzero slot; then ``parse_range``
makes a single pass over each chunk into its slots. Both passes hand the chunks out to
``n_threads`` threads dynamically (``prange``, ``schedule="dynamic"``), so a thread the
OS deschedules on a loaded machine holds up one small chunk, not a fixed share of the
file. Chunks depend only on the buffer and ``chunk_bytes``; the result, and the first
error reported (that of the lowest failing chunk), do not depend on ``n_threads``.

Fast paths, taken when they apply and otherwise falling back to the general code at the
same token, so they change speed only: an id of 1-7 digits followed by ``:``, the value
``1`` followed by a space or LF (one-hot data), and numbers ``[+-]?d{1,7}(.d{0,7})?``
followed by a delimiter are read with 8-byte SWAR arithmetic (no branch per digit). Such
a number is m / 10^k with m < 10^14 < 2^53 and k <= 7, so one IEEE division of exact
operands gives the correctly rounded double (Clinger's fast path), i.e. float(token).
A whole line of under 64 bytes (ended by a LF, with no control byte but blanks) whose
tokens all take those paths is read from its byte masks (``fast_line``: one 32-byte
AVX2 compare in the avx2 build, 16-byte SSE2 blocks otherwise): token boundaries come
from bit operations instead of a scan from one token to the next; any other line goes
to the token-by-token code from its first byte.
"""
import numpy as np

from libc.stddef cimport ptrdiff_t
from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.math cimport isfinite
from libc.stdlib cimport malloc, free
from libc.string cimport memchr, memcpy, memset

cdef extern from "reader_text.h":
    const double* afm_pow10
    void afm_init_locale() nogil
    double afm_strtod(const char* s, char** end) nogil
    int afm_digits8(const char* p, uint64_t* val) nogil
    int afm_token(const char* p, int* colon) nogil
    int afm_line(const char* p, uint64_t* tok, uint64_t* bad) nogil
    int afm_ctz64 "__builtin_ctzll"(uint64_t x) nogil
    int afm_count_avx2(const unsigned char* p, Py_ssize_t n, Py_ssize_t* nl, Py_ssize_t* co,
                       Py_ssize_t* nu) nogil
    ctypedef void (*afm_chunk_fn)(void* ctx, ptrdiff_t chunk) noexcept nogil
    int afm_parallel(afm_chunk_fn fn, void* ctx, ptrdiff_t n, int n_threads) nogil

afm_init_locale()

# Error codes; afmfast.data.dataset maps them to messages (keep both in sync, a test checks
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



# The fast paths load up to 17 bytes past a token's start (sign, 7 digits, '.', 8 bytes):
# they run only where this many bytes of the buffer follow.
cdef enum:
    FAST_PAD = 32


cdef inline int fast_number(const char** pp, double* out) noexcept nogil:
    """``[+-]?d{1,7}(.d{0,7})?`` followed by a delimiter, with FAST_PAD readable bytes at
    *pp. 0 and *pp moved past it on success; 1 (nothing moved) for anything else, which
    parse_number then decides. Values below 10^7 are finite as float32."""
    cdef const char* p = pp[0]
    cdef bint neg = p[0] == b'-'
    cdef uint64_t m = 0, fr = 0
    cdef int L, K
    cdef double v
    if neg or p[0] == b'+':
        p += 1
    L = afm_digits8(p, &m)
    if L == 0 or L == 8:
        return 1
    p += L
    if p[0] == b'.':
        K = afm_digits8(p + 1, &fr)
        if K == 8:
            return 1
        p += 1 + K
        # m * 10^K + fr < 10^14 is exact in a double; one rounding, in the division
        v = (<double>m * afm_pow10[K] + <double>fr) / afm_pow10[K]
    else:
        v = <double>m
    if not is_delim(p[0]):
        return 1
    out[0] = -v if neg else v
    pp[0] = p
    return 0


cdef inline int read_number(const char** pp, const char* fast_end, double* out) noexcept nogil:
    """A number of the grammar at *pp (fast path when it applies and FAST_PAD bytes
    follow, else parse_number); 0 on success, 1 when the token is not a number."""
    if pp[0] < fast_end and fast_number(pp, out) == 0:
        return 0
    return parse_number(pp, out)


cdef enum:
    # bytes readable after a line start for fast_line: its 64-byte window, then a
    # number read by fast_number (FAST_PAD bytes) at a token start inside that window
    LINE_PAD = 64 + FAST_PAD


cdef inline Py_ssize_t fast_line(const char* p, int64_t limit, int32_t* indices,
                                 float* values, float* label, Py_ssize_t* count,
                                 int64_t* max_id) noexcept nogil:
    """The row at line start p when the whole line is simple: shorter than 64 bytes,
    separated by spaces and tabs, ended by a LF, and every token one that a fast path
    reads (a label for fast_number, then ids of 1-7 digits below ``limit`` with a
    value ``1`` or one for fast_number). Its token boundaries then come from the
    line's byte masks, with no scan from one token to the next. Returns the bytes
    consumed (the line and its LF) after writing the label, ``*count`` nonzeros (each
    token written had its colon: the slots counted for it) and ``*max_id``; 0 for any
    other line, which the general path then reads from p (it writes the same slots,
    so a partial row left here is overwritten). LINE_PAD bytes at p must be readable."""
    cdef uint64_t tok, bad, st, en, u
    cdef int length = afm_line(p, &tok, &bad)
    cdef int s, end, vs, nd, neg
    cdef unsigned d
    cdef Py_ssize_t n = 0
    cdef int64_t mx = max_id[0]
    cdef const char* q
    cdef double v
    cdef float f
    if length < 0 or bad or tok == 0:
        return 0
    st = tok & ~(tok << 1)   # first byte of each token
    en = tok & ~(tok >> 1)   # last byte of each token
    s = afm_ctz64(st)
    end = afm_ctz64(en) + 1
    st &= st - 1
    en &= en - 1
    # a label of one digit, maybe negative ("1", "-1", "0"): no branch on its sign,
    # which is random in a shuffled file; -0 * 1 is -0.0, as float("-0")
    neg = p[s] == b'-'
    d = digit(p[s + neg])
    if end == s + 1 + neg and d <= 9:
        label[0] = <float>d * (<float>1.0 - <float>2.0 * neg)
    else:
        q = p + s
        if fast_number(&q, &v) or q != p + end:
            return 0
        label[0] = <float>v
    while st:
        s = afm_ctz64(st)
        end = afm_ctz64(en) + 1
        st &= st - 1
        en &= en - 1
        nd = afm_digits8(p + s, &u)
        if nd == 0 or nd == 8 or p[s + nd] != b':' or <int64_t>u >= limit:
            return 0
        vs = s + nd + 1
        if end == vs + 1 and p[vs] == b'1':  # one-hot data: "id:1"
            f = 1.0
        else:
            q = p + vs
            if fast_number(&q, &v) or q != p + end:
                return 0
            f = <float>v
        indices[n] = <int32_t>u
        values[n] = f
        n += 1
        if <int64_t>u > mx:
            mx = <int64_t>u
    count[0] = n
    max_id[0] = mx
    return length + 1


cdef struct Out:
    int64_t* indptr   # indptr[0] of the range already written by the caller
    int32_t* indices
    float* values
    float* y


cdef int parse_range(const char* p, const char* e, const char* fast_end, int64_t nnz_base,
                     int64_t limit, Out* o, Py_ssize_t* n_rows, Py_ssize_t* nnz,
                     int64_t* max_id, const char** err_tok) noexcept nogil:
    """Parse the rows in [p, e) (p at a line start; e just after a LF, or at a NUL that
    ends the buffer) into ``o``. The fast paths run only for tokens before ``fast_end``.
    Returns an error code, E_OK on success; ``err_tok`` receives the faulty token."""
    cdef const char* line
    cdef const char* tok = p
    cdef const char* q
    cdef Py_ssize_t row = 0
    cdef Py_ssize_t k = 0
    cdef int64_t mx = -1
    cdef int64_t fid
    cdef uint64_t u
    cdef int tl, cl
    cdef bint done
    cdef double v
    cdef float f
    cdef unsigned d
    cdef char c
    cdef int code = E_OK
    cdef Py_ssize_t adv, cnt
    while p < e:
        if fast_end - p >= LINE_PAD - FAST_PAD:
            adv = fast_line(p, limit, o.indices + k, o.values + k, &f, &cnt, &mx)
            if adv:
                o.y[row] = f
                k += cnt
                p += adv
                row += 1
                o.indptr[row] = nnz_base + k
                continue
        line = p
        while p[0] == b' ' or p[0] == b'\t':
            p += 1
        c = p[0]
        if c == b'\n' or c == b'\r' or c == 0:
            tok = line
            code = E_EMPTY_LINE
            break
        tok = p
        if read_number(&p, fast_end, &v):
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
            # Fast path: a token "id:value" with an id of 1-7 digits and a short value,
            # delimited within 16 bytes; its end is found by afm_token, so the next
            # token's start does not wait for the digits to be converted. Anything else
            # (and every error) goes to the general path below, from the same byte.
            done = False
            if p < fast_end:
                tl = afm_token(p, &cl)
                if 0 < cl < 8 and cl + 1 < tl and is_delim(p[tl]) and afm_digits8(p, &u) == cl:
                    fid = <int64_t>u
                    if tl == cl + 2 and p[cl + 1] == b'1':  # one-hot data: "id:1"
                        f = 1.0
                        done = True
                    else:
                        q = p + cl + 1
                        if fast_number(&q, &v) == 0 and q == p + tl:
                            f = <float>v
                            done = True
                    if done:
                        if fid >= limit:
                            code = E_ID_RANGE
                            break
                        p += tl
            if not done:
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
                if read_number(&p, fast_end, &v):
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
    err_tok[0] = tok
    return code


cdef void count_range(const unsigned char* p, Py_ssize_t n, Py_ssize_t* newlines,
                      Py_ssize_t* colons, Py_ssize_t* nuls) noexcept nogil:
    # Blocks of 255 bytes with byte-wide counters let the compiler keep the compares in
    # wide vector registers (a 64-bit counter per byte would not vectorise as well).
    cdef Py_ssize_t i, j, blk
    cdef Py_ssize_t a = 0, b = 0, z = 0
    cdef unsigned char ca, cb, cz
    cdef unsigned char ch
    if afm_count_avx2(p, n, newlines, colons, nuls):
        return
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


def count(const unsigned char[::1] buf, Py_ssize_t start=0, Py_ssize_t end=-1):
    """(newlines, colons, NUL bytes) in buf[start:end] (end -1: to the end of buf);
    load_libfm counts error lines with it, tests and benchmarks use it too."""
    cdef Py_ssize_t n = buf.shape[0]
    cdef Py_ssize_t a = 0, b = 0, z = 0
    if end < 0 or end > n:
        end = n
    if start < 0:
        start = 0
    if start >= end:
        return 0, 0, 0
    cdef const unsigned char* base = &buf[0]
    with nogil:
        count_range(base + start, end - start, &a, &b, &z)
    return a, b, z


cdef void parse_chunk(const char* p, const char* e, const char* fast_end, Py_ssize_t file_off,
                      Py_ssize_t row0, Py_ssize_t nnz0, int64_t indptr_base, int64_t limit,
                      int64_t* indptr, int32_t* indices, float* values, float* y,
                      int64_t* res) noexcept nogil:
    """parse_range of one chunk [p, e), which starts at byte file_off of the file, into
    its slots (rows from row0, nonzeros from nnz0; row ends offset by indptr_base); res
    receives code, error offset in the file, rows, nonzeros, max id. Only locals, so it
    can run as a prange body."""
    cdef Out o
    cdef Py_ssize_t rows = 0, nnz = 0
    cdef int64_t mx = -1
    cdef const char* tok = p
    o.indptr = indptr + row0
    o.indices = indices + nnz0
    o.values = values + nnz0
    o.y = y + row0
    res[0] = parse_range(p, e, fast_end, indptr_base + nnz0, limit, &o, &rows, &nnz, &mx,
                         &tok)
    res[1] = file_off + (tok - p)
    res[2] = rows
    res[3] = nnz
    res[4] = mx


cdef struct Job:
    # what the chunk callbacks of one parse() call share (read-only but for their slots)
    const char* base
    const char* tail       # NUL-padded copy of the unterminated last line, if any
    bint has_tail          # then chunk nc - 1 is that line
    Py_ssize_t nc
    const Py_ssize_t* bounds
    const char* fast_end
    Py_ssize_t* stats      # nc x 3: newlines, colons, NULs
    const Py_ssize_t* row0
    const Py_ssize_t* nnz0
    int64_t indptr_base    # added to every row end (out's indptr[0]; 0 otherwise)
    int64_t limit
    int64_t* indptr
    int32_t* indices
    float* values
    float* y
    int64_t* res           # nc x 5: code, error offset, rows, nonzeros, max id


cdef void count_job(void* ctx, ptrdiff_t c) noexcept nogil:
    cdef Job* j = <Job*>ctx
    count_range(<const unsigned char*>j.base + j.bounds[c], j.bounds[c + 1] - j.bounds[c],
                &j.stats[3 * c], &j.stats[3 * c + 1], &j.stats[3 * c + 2])


cdef void parse_job(void* ctx, ptrdiff_t c) noexcept nogil:
    cdef Job* j = <Job*>ctx
    cdef Py_ssize_t length = j.bounds[c + 1] - j.bounds[c]
    if j.has_tail and c == j.nc - 1:
        # the padded copy: scans stop at its NULs, the fast paths may run to its end
        parse_chunk(j.tail, j.tail + length, j.tail + length + 1, j.bounds[c], j.row0[c],
                    j.nnz0[c], j.indptr_base, j.limit, j.indptr, j.indices, j.values, j.y,
                    &j.res[5 * c])
    else:
        parse_chunk(j.base + j.bounds[c], j.base + j.bounds[c + 1], j.fast_end, j.bounds[c],
                    j.row0[c], j.nnz0[c], j.indptr_base, j.limit, j.indptr, j.indices,
                    j.values, j.y, &j.res[5 * c])


def _out_arrays(out, Py_ssize_t n_rows, Py_ssize_t nnz):
    """The arrays ``out(n_rows, nnz)`` gives to parse into, their lengths checked."""
    arrays = tuple(out(n_rows, nnz))
    for name, array, size in zip(("indptr", "indices", "values", "y"), arrays,
                                 (n_rows + 1, nnz, nnz, n_rows)):
        if len(array) != size:
            raise ValueError(f"out: {name} has {len(array)} entries, {size} expected")
    return arrays


# Chunk size of both passes: small enough that 2-4 threads share even a few-MB file
# dynamically, large enough that handing out a chunk costs nothing measurable.
CHUNK_BYTES = 1 << 18


def parse(const unsigned char[::1] buf, Py_ssize_t start=0,
          int64_t n_features_limit=2147483648, int n_threads=1,
          Py_ssize_t chunk_bytes=CHUNK_BYTES, out=None):
    """Parse libFM text in buf[start:]; see the module docstring for the result and
    ``out`` (the arrays to fill, from a callable).

    ``n_threads`` threads share chunks of about ``chunk_bytes`` bytes cut at line
    starts (tests make them tiny). The result, and the first error reported, do not
    depend on n_threads or chunk_bytes."""
    cdef Py_ssize_t n = buf.shape[0]
    cdef Py_ssize_t c, nc, pos, nxt, body_end, tail_len, max_chunks
    cdef const char* base
    cdef const char* q
    cdef const char* fast_end
    cdef char* tail = NULL
    cdef bint has_tail
    if start < 0 or start > n:
        raise ValueError(f"start must be in [0, {n}], got {start}")
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1, got {n_threads}")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    if start == n:
        if out is not None:
            return (0, 0, *_out_arrays(out, 0, 0), -1)
        return (0, 0, np.zeros(1, dtype=np.int64), np.empty(0, dtype=np.int32),
                np.empty(0, dtype=np.float32), np.empty(0, dtype=np.float32), -1)
    base = <const char*>&buf[0]
    fast_end = base + n - FAST_PAD if n > FAST_PAD else base
    # body [start, body_end) ends just after the last LF; the tail [body_end, n) is an
    # unterminated last line
    body_end = n
    while body_end > start and base[body_end - 1] != b'\n':
        body_end -= 1
    has_tail = body_end < n
    max_chunks = (body_end - start) // chunk_bytes + 2
    bounds_a = np.empty(max_chunks + 1, dtype=np.intp)
    cdef Py_ssize_t[::1] bounds = bounds_a
    bounds[0] = start
    nc = 0
    pos = start
    while pos < body_end:
        nxt = pos + chunk_bytes
        if nxt >= body_end:
            nxt = body_end
        else:  # just after the next LF at or after nxt - 1 (the body ends with one)
            q = <const char*>memchr(base + nxt - 1, b'\n', body_end - (nxt - 1))
            nxt = (q - base) + 1
        nc += 1
        bounds[nc] = nxt
        pos = nxt
    if has_tail:
        nc += 1
        bounds[nc] = n
    stats_a = np.zeros((nc, 3), dtype=np.intp)   # newlines, colons, NULs
    cdef Py_ssize_t[:, ::1] stats = stats_a
    cdef Job job
    cdef int rc
    job.base = base
    job.tail = NULL
    job.has_tail = has_tail
    job.nc = nc
    job.bounds = &bounds[0]
    job.fast_end = fast_end
    job.stats = &stats[0, 0]
    with nogil:
        rc = afm_parallel(count_job, &job, nc, n_threads)
    if rc:
        raise MemoryError()
    if stats_a[:, 2].any():
        q = <const char*>memchr(base + start, 0, n - start)
        return (E_NUL, q - base, None, None, None, None, -1)
    # Rows of a chunk: one per LF, and one for the tail; nonzeros: one per colon. Blank
    # lines are errors, so on success these are exact.
    rows_a = stats_a[:, 0].copy()
    if has_tail:
        rows_a[nc - 1] += 1
    row0_a = np.zeros(nc + 1, dtype=np.intp)
    np.cumsum(rows_a, out=row0_a[1:])
    nnz0_a = np.zeros(nc + 1, dtype=np.intp)
    np.cumsum(stats_a[:, 1], out=nnz0_a[1:])
    cdef Py_ssize_t[::1] row0 = row0_a
    cdef Py_ssize_t[::1] nnz0 = nnz0_a
    cdef Py_ssize_t n_rows = row0[nc]
    cdef Py_ssize_t colons = nnz0[nc]
    cdef int64_t[::1] indptr_v
    cdef int32_t[::1] indices_v
    cdef float[::1] values_v
    cdef float[::1] y_v
    cdef int64_t indptr_base = 0
    if out is None:
        indptr = np.empty(n_rows + 1, dtype=np.int64)
        indptr[0] = 0
        indices = np.empty(colons, dtype=np.int32)
        values = np.empty(colons, dtype=np.float32)
        y = np.empty(n_rows, dtype=np.float32)
    else:
        indptr, indices, values, y = _out_arrays(out, n_rows, colons)
    indptr_v = indptr
    indptr_base = indptr_v[0]
    # an empty array has no first element to point at: a dummy stands in (never written)
    dummy_a = np.empty(1, dtype=np.float64)
    indices_v = indices if colons else dummy_a.view(np.int32)
    values_v = values if colons else dummy_a.view(np.float32)
    y_v = y if n_rows else dummy_a.view(np.float32)
    res_a = np.zeros((nc, 5), dtype=np.int64)  # code, err_off, rows, nnz, max_id
    cdef int64_t[:, ::1] res = res_a
    tail_len = n - body_end
    if has_tail:
        # the unterminated last line, NUL-padded for its scans and the fast paths
        tail = <char*>malloc(tail_len + 2 * FAST_PAD)
        if tail == NULL:
            raise MemoryError()
        memcpy(tail, base + body_end, tail_len)
        memset(tail + tail_len, 0, 2 * FAST_PAD)
    job.tail = tail
    job.row0 = &row0[0]
    job.nnz0 = &nnz0[0]
    job.indptr_base = indptr_base
    job.limit = n_features_limit
    job.indptr = &indptr_v[0]
    job.indices = &indices_v[0]
    job.values = &values_v[0]
    job.y = &y_v[0]
    job.res = &res[0, 0]
    try:
        with nogil:
            rc = afm_parallel(parse_job, &job, nc, n_threads)
        if rc:
            raise MemoryError()
    finally:
        free(tail)
    for c in range(nc):
        if res[c, 0] != E_OK:
            # chunks before c parsed cleanly, so this is the first error of the file
            return (int(res[c, 0]), int(res[c, 1]), None, None, None, None, -1)
        # a chunk that parsed cleanly filled exactly its slots (see above)
        if res[c, 3] != nnz0[c + 1] - nnz0[c] or res[c, 2] != row0[c + 1] - row0[c]:
            raise AssertionError(f"libFM reader: chunk {c} filled {res[c, 2]} rows and "
                                 f"{res[c, 3]} nonzeros, counted otherwise")
    max_id = int(res_a[:, 4].max())
    return (0, 0, indptr, indices, values, y, max_id)


def parse_double(bytes token, bint fast=True):
    """The double the parser reads for one number token (None if the grammar rejects
    it), before the float32 rounding; lets tests compare with Python's float(). With
    ``fast`` (the parser's way) the SWAR fast path is tried first, otherwise only the
    general path runs."""
    cdef Py_ssize_t n = len(token)
    cdef char* buf
    cdef const char* p
    cdef double v
    cdef int bad
    if n == 0:
        return None
    buf = <char*>malloc(n + 2 * FAST_PAD)
    if buf == NULL:
        raise MemoryError()
    memcpy(buf, <const char*>token, n)
    memset(buf + n, 0, 2 * FAST_PAD)
    p = buf
    if fast:
        bad = read_number(&p, buf + n + 1, &v)
    else:
        bad = parse_number(&p, &v)
    free(buf)
    if bad or p != buf + n:
        return None
    return v
