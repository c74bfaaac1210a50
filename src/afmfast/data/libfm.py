"""The libFM text reader: ``load_libfm``, the front of the native parser.

``load_libfm(path, n_features=None, *, n_threads=None)`` reads libFM text with the
native parser ``afmfast._reader`` (its docstring has the exact grammar; without it the
Numba parser ``afmfast.data.libfm_numba``, which gives the same results), on all CPUs
by default, from a memory map of the file; the result does not depend on n_threads.
Rows are ``label id:value ...`` with any number of nonzeros (zero included), ids used
as they are, LF or CRLF, spaces or tabs. A blank line is an error ("empty line") rather than
a skipped row; the newline ending the last row, or its absence, is fine; an empty
file is an empty Dataset; a UTF-8 BOM at the start is skipped. Every problem raises
``ValueError`` with the path, ``line N`` (1-based) and what is wrong; a missing file
raises ``FileNotFoundError`` naming the path.
"""
from __future__ import annotations

import os
import stat

from afmfast.data.dataset import _INT32_MAX, Dataset, _check_n_features
from afmfast.kernels.threads import resolve_threads

__all__ = ["load_libfm"]

_BOM = b"\xef\xbb\xbf"

# Reader error code name -> what is wrong; the token is appended to the message.
_MESSAGES = {
    "EMPTY_LINE": "empty line (blank lines are not allowed; a row needs at least a label)",
    "LABEL_NAN": "label is not a number",
    "LABEL_NONFINITE": "label is NaN, infinite or beyond the float32 range",
    "NO_COLON": "token without ':' (expected id:value)",
    "NEG_ID": "negative feature id",
    "BAD_ID": "feature id is not a non-negative integer",
    "BIG_ID": f"feature id above 2^31-1 = {_INT32_MAX}",
    "VALUE_NAN": "value is not a number",
    "VALUE_NONFINITE": "value is NaN, infinite or beyond the float32 range",
    "ID_RANGE": "feature id >= n_features",
    "NUL": "NUL byte (is this a binary file?)",
    "LONE_CR": "carriage return not followed by a line feed",
}


def _describe_error(name, data, offset, n_features):
    what = _MESSAGES[name]
    # the token: up to its first blank or line end, at most 80 bytes (data may be a
    # memory map of a huge file, so only a bounded slice is looked at)
    head = bytes(data[offset:offset + 80])
    end = next((i for i, b in enumerate(head) if b in b" \t\r\n"), len(head))
    token = head[:end].decode("utf-8", "replace")
    if name in ("LABEL_NAN", "VALUE_NAN"):
        text = token if name == "LABEL_NAN" else token.partition(":")[2]
        if text.strip("+-").lower() in ("nan", "inf", "infinity"):
            what = ("label" if name == "LABEL_NAN" else "value") + " is NaN or infinite"
    if name == "ID_RANGE":
        what += f" = {n_features}"
    if name in ("EMPTY_LINE", "NUL", "LONE_CR"):
        return what
    return f"{what}: {token!r}"


def _parse_error(reader, path, data, code, offset, n_features, lines_before=0):
    """The ValueError of the parser's error ``code`` at byte ``offset`` of ``data``, a
    piece of the file ``path`` that starts after ``lines_before`` lines."""
    name = {v: k for k, v in reader.ERROR_CODES.items()}[code]
    line = lines_before + reader.count(data, 0, offset)[0] + 1
    return ValueError(f"{path}: line {line}: {_describe_error(name, data, offset, n_features)}")


def _map_file(fh):
    """A read-only memory map of the whole open file ``fh``, or None when it cannot be
    mapped (empty file, pipe or other special file, a file system without mmap): the
    caller then reads it. MAP_POPULATE (Linux) maps all pages of the page cache at once
    instead of one page fault per 4 KiB."""
    import mmap
    try:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            return None
        if hasattr(mmap, "MAP_SHARED") and hasattr(mmap, "PROT_READ"):
            return mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ,
                             flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError, OverflowError):
        return None


def _parser():
    """The compiled parser ``afmfast._reader``, or its Numba twin when afmfast was
    installed without a C compiler (same Dataset, same errors, slower)."""
    try:
        from afmfast import _reader
    except ImportError:
        from afmfast.data import libfm_numba as _reader
    return _reader


def load_libfm(path: str | os.PathLike, n_features: int | None = None, *,
               n_threads: int | None = None) -> Dataset:
    """Read a libFM text file into a :class:`Dataset`.

    Each line is one row, ``label id:value id:value ...`` (see the module docstring for
    the accepted layout). Ids are used as they are; ``n_features`` defaults to the
    largest id + 1, and when given every id must be below it. Raises
    ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file, the
    line and the problem for any malformed content (nothing is skipped silently).
    A file whose every value is 1 (one-hot rows) keeps no values array: ``values`` makes
    the ones when asked, and the kernels read none (4 bytes a nonzero less to hold and
    to read, with the same results).

    ``n_threads`` (default None: ``afmfast.threads.default_threads()``, the CPUs this
    process may use within its cgroup quota and thread-count variables) threads parse chunks of about 256 KiB, handed out one at
    a time, so a thread held up by a busy machine delays little; the result and the
    error reported do not depend on ``n_threads``. A regular file is memory-mapped
    rather than copied into memory, so it must not be truncated while it is being read
    (like any memory-mapped reader, the process would then get SIGBUS); other files
    (pipes, ``/proc``) are read.

    Examples
    --------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "tiny.libfm")
    >>> _ = open(path, "w").write("1 0:1 3:0.5\\n-1 2:1\\n")
    >>> data = load_libfm(path)
    >>> len(data), data.n_features, data.indices.tolist(), data.values.tolist()
    (2, 4, [0, 3, 2], [1.0, 0.5, 1.0])
    """
    reader = _parser()

    if n_features is not None:
        n_features = _check_n_features(n_features, -1, "indices")
    n_threads = resolve_threads(n_threads)
    path = os.fspath(path)
    with open(path, "rb") as fh:
        data = _map_file(fh)
        if data is None:
            data = fh.read()
    try:
        start = len(_BOM) if data[:len(_BOM)] == _BOM else 0
        limit = n_features if n_features is not None else _INT32_MAX + 1
        code, offset, indptr, indices, values, y, max_id = reader.parse(
            data, start, limit, n_threads)
        if code:
            raise _parse_error(reader, path, data, code, offset, n_features)
    finally:
        if not isinstance(data, bytes):
            data.close()
    if values.size and values.min() == 1.0 == values.max():
        # one-hot rows (every value 1; a NaN fails both tests): keep no values, so the
        # kernels read none, with the same results (Dataset.values makes the ones). Two
        # reductions rather than a comparison: no temporary array the size of the data
        values = None
    return Dataset._trusted(indptr, indices, values, y,
                            max_id + 1 if n_features is None else n_features, max_id,
                            n_features is not None)
