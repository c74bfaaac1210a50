"""Binary data stores: a directory of ``.npy`` columns that opens as a memory-mapped
``Dataset``, written by streaming conversion with bounded memory.

A store (format version 1) is a directory holding

- ``header.json``: ``{"format": "afmfast-store", "version": 1, "n_rows", "nnz",
  "n_features", "values": "stored" | "ones", "fields": null | {"names": [...],
  "shared_ids": n}, "hashing": null | {...}}``; ``fields`` names the fields of the
  ids when the store has them (a hashed conversion, or a Dataset with fields), with
  ``shared_ids`` the ids that values of several fields hit; ``hashing`` says how a
  hashed store's ids were made (``afmfast.data.hashing``);
- little-endian ``.npy`` columns: ``indptr.npy`` int64 (n_rows + 1), ``indices.npy``
  int32 (nnz), ``values.npy`` float32 (nnz; absent when ``values`` is "ones", every
  value being 1 as in one-hot data), ``y.npy`` float32 (n_rows), and with fields
  ``fields.npy`` int32 (n_features): each id's field, -1 for an id of no field.

Any NumPy reads the columns (``numpy.load``). A store is written into a temporary
directory beside its destination and renamed into place at the end, so an interrupted
conversion leaves no half store, and an existing store at the destination is replaced
only by a complete new one.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
import threading
from typing import TYPE_CHECKING

import numpy as np

from afmfast.data import hashing
from afmfast.data.dataset import _INT32_MAX, Dataset, _check_n_features, _check_fields
from afmfast.data.libfm import _BOM, _map_file, _parse_error, _parser
from afmfast.kernels.threads import resolve_threads

if TYPE_CHECKING:  # annotations only
    from collections.abc import Iterable, Sequence

__all__ = ["convert", "open_store", "write_store"]

FORMAT_NAME = "afmfast-store"
FORMAT_VERSION = 1
HEADER_FILE = "header.json"
#: (file name, little-endian dtype) of the columns, in the Dataset's order
COLUMNS = (("indptr.npy", "<i8"), ("indices.npy", "<i4"), ("values.npy", "<f4"),
           ("y.npy", "<f4"))
FIELDS_FILE = "fields.npy"
#: the text formats ``convert`` reads
FORMATS = ("libfm", "libsvm", "criteo", "csv")
#: bytes of text parsed per chunk: the conversion's memory is a few times this (the
#: chunks' parsed arrays), whatever the size of the input. Small enough that a libFM
#: chunk's arrays are still in the CPU's last-level cache when the writer thread copies
#: them to the files (a chunk of many MB goes to memory and back: more CPU per byte)
CONVERT_CHUNK_BYTES = 4 << 20
#: every column file starts with a .npy header of exactly this many bytes, written as a
#: placeholder first and rewritten with the final length when the column is complete
_NPY_PREFIX_BYTES = 128


def _npy_prefix(dtype, length):
    """The .npy (version 1.0) prefix of a 1-D little-endian column of ``length``
    entries, padded to ``_NPY_PREFIX_BYTES`` so that it can be rewritten in place."""
    text = f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': ({length},), }}"
    room = _NPY_PREFIX_BYTES - 10  # magic (6), version (2), header length (2)
    text = text.ljust(room - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + room.to_bytes(2, "little") + text.encode("latin1")


class _ColumnFile:
    """A .npy column written by appending; its header is fixed up by ``finish``. With
    ``durable`` it is on the disk when ``finish`` returns (synced as it grows, on the
    thread pool ``syncer``, so that the appending thread never waits for the disk);
    without, in the page cache, for the kernel to write back."""

    #: bytes written between two fdatasync calls: the disk writes the column while the
    #: parser runs, instead of all of it in the final fsync
    SYNC_BYTES = 32 << 20

    def __init__(self, path, dtype, durable, syncer):
        self.path, self.dtype, self.length, self.durable = path, dtype, 0, durable
        self.unsynced = 0
        self.syncer, self.syncing = syncer, None
        self.fh = open(path, "wb")
        self.fh.write(_npy_prefix(dtype, 0))

    def append(self, array):
        data = np.ascontiguousarray(array, dtype=self.dtype)
        self.fh.write(memoryview(data).cast("B"))
        self.length += data.size
        self.unsynced += data.nbytes
        if self.durable and self.unsynced >= self.SYNC_BYTES:
            self.fh.flush()
            if self.syncing is None or self.syncing.done():
                self._synced()  # a sync error shows here, or at finish
                self.syncing = self.syncer.submit(os.fdatasync, self.fh.fileno())
            else:  # the sync in flight still runs: the next one covers these bytes
                return
            self.unsynced = 0

    def _synced(self):
        """Wait for the background sync in flight, if any (re-raises its error)."""
        if self.syncing is not None:
            syncing, self.syncing = self.syncing, None
            syncing.result()

    def append_ones(self, count):
        """Append ``count`` ones, a bounded block at a time."""
        block = np.ones(min(count, 1 << 22), self.dtype)
        while count > 0:
            self.append(block[:count])
            count -= min(count, len(block))

    def finish(self):
        self._synced()
        self.fh.seek(0)
        self.fh.write(_npy_prefix(self.dtype, self.length))
        self.fh.flush()
        if self.durable:
            os.fsync(self.fh.fileno())
        self.fh.close()


class _StoreWriter:
    """Appends row blocks to the columns of a store in a temporary directory; ``commit``
    completes the files and renames the directory to ``path``. Used as a context
    manager: leaving it without ``commit`` (an error, Ctrl-C) deletes the temporary
    directory and leaves ``path`` as it was.

    The columns are written by one background thread, so that the disk works while the
    caller parses the next chunk. ``append`` lets at most one block wait for it;
    ``parse`` has the parser fill one of two sets of buffers, reused from chunk to
    chunk, while the thread writes the other (bounded memory, and no fresh memory to
    fault in per chunk). The values column is created only when a value other than 1
    arrives (then the ones before it are written first): one-hot data never writes it.
    ``durable``: see ``convert``."""

    def __init__(self, path, durable=True):
        from concurrent.futures import ThreadPoolExecutor

        self.path = os.path.abspath(os.fspath(path))
        parent = os.path.dirname(self.path)
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"{path}: the parent directory {parent} does not exist")
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.", dir=parent)
        self.durable = durable
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="afmfast-store")
        # the columns' syncs (durable): the writing thread goes on while the disk works.
        # A worker per column, so that each column may have its sync in flight at once:
        # the disk's queue then holds several columns' writes instead of running dry
        # between one column's sync and the next one's
        self.syncer = ThreadPoolExecutor(max_workers=len(COLUMNS),
                                         thread_name_prefix="afmfast-sync")
        self.columns = {name: self._column(name, dtype)
                        for name, dtype in COLUMNS if name != "values.npy"}
        self.columns["indptr.npy"].append(np.zeros(1, np.int64))  # indptr starts at 0
        self.values = None  # the values column, once a value other than 1 was seen
        self.n_rows = self.nnz = 0
        self.max_id = -1
        self.pending = None  # append's block in flight
        self.parsed = []  # parse's (block, buffer set) in flight, oldest first: at most 2
        self.buffers = [None, None]  # parse's two sets of arrays, used in turn
        self.stored = False  # parse saw a value other than 1 (the values column's due)

    def __enter__(self):
        return self

    def _column(self, name, dtype):
        return _ColumnFile(os.path.join(self.tmp, name), dtype, self.durable, self.syncer)

    def __exit__(self, *exc):
        if self.tmp is not None:  # not committed
            try:
                self._wait()
            except Exception:  # noqa: BLE001 - the error that stopped us is what matters
                pass
            self.pool.shutdown()
            self.syncer.shutdown()  # no sync may outlive its file's descriptor
            for column in self._all_columns():
                column.fh.close()
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False

    def _all_columns(self):
        return [*self.columns.values(), *([self.values] if self.values else [])]

    def _wait(self, keep=0):
        """Wait for the blocks in flight, but for ``keep`` of parse's; re-raises a
        write error here."""
        while len(self.parsed) > keep:
            self.parsed.pop(0)[0].result()
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def append(self, indptr, indices, values, y, max_id):
        """Append rows given as CSR arrays (``indptr`` starting at 0)."""
        self._wait()
        new_values = self.values is None and values.size and not np.all(values == 1.0)
        self.pending = self.pool.submit(self._write, np.asarray(indptr[1:], np.int64) +
                                        self.nnz, indices, values, y, self.nnz, new_values)
        self.n_rows += len(y)
        self.nnz += len(indices)
        self.max_id = max(self.max_id, int(max_id))

    def parse(self, reader, chunk, limit, n_threads):
        """Parse the libFM text ``chunk`` with ``reader`` (``afmfast._reader`` or its
        Numba twin; ids below ``limit``) and append its rows; returns the parser's
        ``(code, offset)``, and appends nothing when code is not 0 (an error)."""
        self._wait(keep=1)  # the block that used this chunk's buffers is written
        turn = 1 - self.parsed[0][1] if self.parsed else 0  # the set not in flight

        def out(n_rows, nnz):
            arrays = self.buffers[turn]
            if arrays is None or arrays[0].size <= n_rows or arrays[1].size < nnz:
                rows, slots = n_rows + 1 + n_rows // 8, nnz + nnz // 8  # room to vary
                arrays = self.buffers[turn] = (
                    np.empty(rows, np.int64), np.empty(slots, np.int32),
                    np.empty(slots, np.float32), np.empty(rows, np.float32))
            indptr = arrays[0][:n_rows + 1]
            indptr[0] = self.nnz  # the parser offsets the row ends by it
            return indptr, arrays[1][:nnz], arrays[2][:nnz], arrays[3][:n_rows]

        code, offset, indptr, indices, values, y, max_id = reader.parse(
            chunk, 0, limit, n_threads, out=out)
        if code:
            return code, offset
        new_values = (not self.stored and values.size > 0
                      and not (values.min() == values.max() == 1.0))
        self.stored = self.stored or new_values
        self.parsed.append((self.pool.submit(self._write, indptr[1:], indices, values, y,
                                             self.nnz, new_values), turn))
        self.n_rows += len(y)
        self.nnz += len(indices)
        self.max_id = max(self.max_id, int(max_id))
        return 0, 0

    def _write(self, indptr, indices, values, y, nnz_before, new_values):
        self.columns["indptr.npy"].append(indptr)
        self.columns["indices.npy"].append(indices)
        self.columns["y.npy"].append(y)
        if new_values:
            self.values = self._column("values.npy", "<f4")
            self.values.append_ones(nnz_before)
        if self.values is not None:
            if values.size or not indices.size:
                self.values.append(values)
            else:  # one-hot rows (a Dataset with values=None) after stored values
                self.values.append_ones(indices.size)

    def commit(self, n_features=None, fields=None, hashed=None):
        """Complete the store; ``fields``: (int32 blocks of the ids' fields, names,
        shared ids) to record, ``hashed``: the header's ``hashing`` entry."""
        self._wait()
        self.pool.shutdown()
        n_features = self.max_id + 1 if n_features is None else n_features
        for column in self._all_columns():
            column.finish()
        fields_entry = None
        if fields is not None:
            blocks, names, shared = fields
            column = self._column(FIELDS_FILE, "<i4")
            for block in blocks:
                column.append(block)
            column.finish()
            fields_entry = {"names": list(names),
                            "shared_ids": None if shared is None else int(shared)}
        self.syncer.shutdown()  # idle: every column waited for its syncs as it finished
        header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "n_rows": self.n_rows,
                  "nnz": self.nnz, "n_features": int(n_features),
                  "values": "ones" if self.values is None else "stored",
                  "fields": fields_entry, "hashing": hashed}
        with open(os.path.join(self.tmp, HEADER_FILE), "w") as fh:
            json.dump(header, fh, indent=1)
            fh.flush()
            if self.durable:
                os.fsync(fh.fileno())
        _replace_directory(self.tmp, self.path)
        self.tmp = None
        return header


#: the threads deleting replaced stores (see ``_replace_directory``), not yet joined
_deleting: list[threading.Thread] = []
_deleting_lock = threading.Lock()


def _delete_in_background(folder):
    """Delete ``folder`` on a thread of its own. Freeing a big store's pages takes the
    kernel a noticeable time per GB, which is no part of a conversion: the caller goes
    on while it runs. The thread is not a daemon, so the interpreter waits for it at
    exit and no replaced store is left behind."""
    thread = threading.Thread(target=shutil.rmtree, args=(folder,),
                              kwargs={"ignore_errors": True},
                              name="afmfast-store-delete")
    with _deleting_lock:
        _deleting[:] = [t for t in _deleting if t.is_alive()]
        _deleting.append(thread)
    thread.start()


def _wait_for_deletions():
    """Wait until every replaced store has been deleted (tests, and callers that need
    the disk space back)."""
    with _deleting_lock:
        threads, _deleting[:] = list(_deleting), []
    for thread in threads:
        thread.join()


def _replace_directory(new, path):
    """Rename the complete directory ``new`` to ``path``; an existing store at ``path``
    is moved aside first and deleted, in the background, only once ``new`` is in
    place."""
    old = None
    if os.path.lexists(path):
        if not os.path.isfile(os.path.join(path, HEADER_FILE)):
            raise FileExistsError(f"{path} exists and is not an afmfast store (no "
                                  f"{HEADER_FILE}); refusing to replace it")
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old.",
                               dir=os.path.dirname(path))
        os.rename(path, os.path.join(old, "store"))
    try:
        os.rename(new, path)
    except BaseException:
        if old is not None:
            os.rename(os.path.join(old, "store"), path)
            os.rmdir(old)
        raise
    if old is not None:
        _delete_in_background(old)


def write_store(data: Dataset, path: str | os.PathLike) -> None:
    """Write a ``Dataset`` as a store at ``path`` (a directory; an existing store there
    is replaced once the new one is complete).

    Examples
    --------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "tiny.store")
    >>> write_store(Dataset([0, 2, 3], [0, 3, 2], [1.0, 1.0, 1.0], [1.0, -1.0]), path)
    >>> sorted(os.listdir(path))  # every value is 1: no values column
    ['header.json', 'indices.npy', 'indptr.npy', 'y.npy']
    >>> open_store(path)
    Dataset(n_rows=2, n_features=4, nnz=3, max_row_nnz=2)
    """
    with _StoreWriter(path) as writer:
        writer.append(data.indptr, data.indices, data.X[2], data.y, data._max_id)
        fields = None
        if data.fields is not None:
            ids = data.fields
            fields = ((ids[lo:lo + (1 << 20)] for lo in range(0, ids.size, 1 << 20)),
                      data.field_names, None)  # which ids several fields share is unknown
        writer.commit(data.n_features, fields)


def _text_chunks(path, chunk_bytes):
    """Buffers of text cut at line ends, about ``chunk_bytes`` each, from a regular file
    (memory-mapped, nothing copied) or a ``.gz`` file or a pipe (read block by block).
    The first buffer starts after a UTF-8 BOM. The callers count the lines of a buffer
    by the rows they parse from it (no extra pass over the text)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        mapped = None if opener is gzip.open else _map_file(fh)
        if mapped is not None:
            # the views are released before the map closes (a map with live views
            # cannot), also when the consumer stops early on a parse error
            with mapped, memoryview(mapped) as view:
                start = len(_BOM) if bytes(view[:len(_BOM)]) == _BOM else 0
                while start < len(view):
                    end = min(len(view), start + chunk_bytes)
                    if end < len(view):
                        cut = mapped.rfind(b"\n", start, end)
                        end = cut + 1 if cut >= start else _next_line_end(mapped, end)
                    with view[start:end] as chunk:
                        yield chunk
                    start = end
            return
        carry, first = b"", True
        while True:
            block = fh.read(chunk_bytes)
            data = carry + block
            if first and data[:len(_BOM)] == _BOM:
                data = data[len(_BOM):]
            first = False
            if not block:
                if data:
                    yield data
                return
            cut = data.rfind(b"\n")
            if cut < 0:
                carry = data
                continue
            chunk, carry = data[:cut + 1], data[cut + 1:]
            yield chunk


def _next_line_end(mapped, pos):
    """The offset just past the line end at or after ``pos`` (the file's end if none)."""
    cut = mapped.find(b"\n", pos)
    return len(mapped) if cut < 0 else cut + 1


def convert(inputs: str | os.PathLike | Iterable[str | os.PathLike],
            output: str | os.PathLike, *, format: str = "libfm",
            hash_bits: int | None = None, n_features: int | None = None,
            n_threads: int | None = None, label: str | None = None,
            columns: Sequence[str] | None = None, kinds: dict | None = None,
            integers: str = "bucket", durable: bool = True) -> dict:
    """Convert text data files into one store at ``output``; returns its header (a dict:
    ``n_rows``, ``nnz``, ``n_features``, ...). ``open_store(output)`` opens it.

    The inputs are read in chunks of about ``CONVERT_CHUNK_BYTES`` and parsed on
    ``n_threads`` threads, so memory stays bounded whatever their size; ``.gz`` files are
    decompressed as they are read. Rows are concatenated in the order of ``inputs``.
    Errors name the input file and line, as ``load_libfm``'s do; nothing is written at
    ``output`` then. The result does not depend on ``n_threads``.

    ``format``:

    - "libfm" (also "libsvm", the same ``label id:value`` layout): ids are used as they
      are. ``n_features`` defaults to the largest id + 1; when given every id must be
      below it.
    - "criteo" (label, 13 integer and 26 categorical columns, tab-separated) and "csv"
      (a header line; ``label`` names the label column, ``columns`` the feature columns,
      default all others, and ``kinds`` maps columns to "categorical" (default),
      "integer" or "numeric"): raw logs whose values are hashed into ``2^hash_bits``
      ids (default ``hashing.DEFAULT_HASH_BITS``), the store's ``n_features``.
      Integer columns are bucketed by their logarithm (``integers="bucket"``) or kept
      as values (``integers="value"``). The store records each id's field
      (``Dataset.fields``), so ``AFM.field_attention`` needs no field array.
      ``afmfast.data.hashing`` specifies the hash, the buckets and the layouts.

    ``durable`` (default True): the store is on the disk when ``convert`` returns (its
    columns are synced as they grow, which bounds the conversion by the disk's write
    rate). False leaves the writing back to the operating system, so a conversion runs
    at the parser's speed while the page cache holds it; an interrupted conversion
    still leaves no half store (the rename is atomic either way), but after a power
    failure the new store may be incomplete.

    A store that ``output`` held before is replaced once the new one is complete and
    deleted on a background thread (the interpreter waits for it at exit), so that
    freeing its disk space does not hold up the caller.

    Examples
    --------
    >>> import os, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> for name, text in (("a.libfm", "1 0:1 3:1\\n"), ("b.libfm", "-1 2:1\\n")):
    ...     _ = open(os.path.join(folder, name), "w").write(text)
    >>> inputs = [os.path.join(folder, n) for n in ("a.libfm", "b.libfm")]
    >>> convert(inputs, os.path.join(folder, "ab.store"))["n_rows"]
    2
    >>> data = open_store(os.path.join(folder, "ab.store"))
    >>> data.n_features, data.y.tolist()
    (4, [1.0, -1.0])
    >>> csv = os.path.join(folder, "clicks.csv")
    >>> _ = open(csv, "w").write("click,site,hour\\n1,a1b2,14\\n0,c3d4,\\n")
    >>> header = convert(csv, os.path.join(folder, "clicks.store"), format="csv",
    ...                  hash_bits=10, label="click", kinds={"hour": "integer"})
    >>> header["n_features"], header["nnz"], header["fields"]["names"]
    (1024, 3, ['site', 'hour'])
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if not isinstance(durable, bool):
        raise ValueError(f"durable must be True or False, got {durable!r}")
    hash_bits, kinds = hashing._check_options(format, hash_bits, n_features, label,
                                             columns, kinds, integers)
    paths = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not paths:
        raise ValueError("inputs: no input files given")
    paths = [os.fspath(p) for p in paths]
    n_threads = resolve_threads(n_threads)
    if hash_bits is not None:
        return _convert_hashed(paths, output, format, hash_bits, label, columns, kinds,
                               integers, n_threads, durable)
    if n_features is not None:
        n_features = _check_n_features(n_features, -1, "indices")
    reader = _parser()
    limit = n_features if n_features is not None else _INT32_MAX + 1
    with _StoreWriter(output, durable) as writer:
        for path in paths:
            lines_before = 0
            # every line is a row (a blank line is an error), so the rows count the lines
            for chunk in _text_chunks(path, CONVERT_CHUNK_BYTES):
                rows_before = writer.n_rows
                code, offset = writer.parse(reader, chunk, limit, n_threads)
                if code:
                    raise _parse_error(reader, path, chunk, code, offset, n_features,
                                       lines_before)
                lines_before += writer.n_rows - rows_before
        return writer.commit(n_features)


def _convert_hashed(paths, output, format, hash_bits, label, columns, kinds, integers,
                    n_threads, durable):
    """``convert`` of the hashed formats (see ``afmfast.data.hashing``)."""
    from concurrent.futures import ThreadPoolExecutor

    layout = hashing._Layout.criteo(hash_bits, integers) if format == "criteo" \
        else None
    tracker = None
    with _StoreWriter(output, durable) as writer, ThreadPoolExecutor(
            n_threads, thread_name_prefix="afmfast-hash") as pool, ThreadPoolExecutor(
            1, thread_name_prefix="afmfast-fields") as background:
        for path in paths:
            header, lines_before = None, 0
            # every line is a row, so the rows parsed count the lines
            for chunk in _text_chunks(path, CONVERT_CHUNK_BYTES):
                buf = np.frombuffer(chunk, np.uint8) if len(chunk) else np.empty(0, np.uint8)
                if format == "csv" and header is None:
                    skip = hashing._first_line_end(buf)
                    line = buf[:skip].tobytes()
                    buf, lines_before = buf[skip:], lines_before + 1
                    try:
                        header = hashing._read_csv_header(path, line)
                        layout = _csv_layout(layout, header, path, label, columns, kinds,
                                             hash_bits, integers)
                    except ValueError:
                        del buf  # the chunk's memory map page may be released
                        raise
                blocks = layout.parse(buf, pool, n_threads)
                error = layout.error(path, buf, *blocks, lines_before) \
                    if isinstance(blocks, tuple) else None
                del buf  # no view of the chunk may outlive it (a memory map's page)
                if error is not None:
                    raise error
                if tracker is None:
                    tracker = hashing._FieldTracker(hash_bits, layout.n_fields)
                tracker.add([(b[1], b[3]) for b in blocks], background)
                for indptr, indices, values, _, y in blocks:
                    writer.append(indptr, indices, values, y, -1)
                    lines_before += len(y)
            if format == "csv" and header is None:
                raise ValueError(f"{path}: empty; a CSV input starts with a header line "
                                 f"naming its columns")
        if tracker is None:  # inputs without rows
            tracker = hashing._FieldTracker(hash_bits, layout.n_fields)
        return writer.commit(1 << hash_bits,
                             (tracker.blocks(), layout.names, tracker.shared_ids()),
                             hashing._hashing_header(layout))


def _csv_layout(layout, header, path, label, columns, kinds, hash_bits, integers):
    """The layout of the CSV input ``path`` of header ``header``; every input after the
    first must have the first one's header."""
    if layout is None:
        return hashing._Layout.csv(header, path, label, columns, kinds, hash_bits,
                                        integers)
    if header != layout.header:
        raise ValueError(f"{path}: line 1: the header differs from the first input's "
                         f"({hashing._names(layout.header)})")
    return layout


def _read_header(path):
    file = os.path.join(path, HEADER_FILE)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such store directory")
    try:
        with open(file, "rb") as fh:
            header = json.loads(fh.read(1 << 20).decode("utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{file}: missing: {path} is not an afmfast store") from None
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, or nesting too deep
        raise ValueError(f"{file}: not a valid store header ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise ValueError(f"{file}: not an afmfast store header (format is not "
                         f"{FORMAT_NAME!r})")
    if header.get("version") != FORMAT_VERSION:
        raise ValueError(f"{file}: store format version {header.get('version')!r}; this "
                         f"afmfast reads version {FORMAT_VERSION}")
    for key in ("n_rows", "nnz", "n_features"):
        value = header.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{file}: {key} must be a non-negative integer, got {value!r}")
    if header["n_features"] > _INT32_MAX + 1:
        raise ValueError(f"{file}: n_features {header['n_features']} is above 2^31")
    if header.get("values") not in ("stored", "ones"):
        raise ValueError(f"{file}: values must be 'stored' or 'ones', got "
                         f"{header.get('values')!r}")
    return header


def _open_column(path, name, dtype, length):
    file = os.path.join(path, name)
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"{file}: missing column of the store") from None
    except Exception as exc:  # noqa: BLE001 - a corrupt .npy header fails in many ways
        # (ValueError, OSError, EOFError, SyntaxError, tokenize.TokenError, ...)
        raise ValueError(f"{file}: not a readable .npy column "
                         f"({type(exc).__name__}: {exc})") from None
    if array.dtype != np.dtype(dtype) or array.shape != (length,):
        raise ValueError(f"{file}: expected {length} entries of {np.dtype(dtype)} (from "
                         f"{HEADER_FILE}), got shape {array.shape} of {array.dtype}")
    return array


def open_store(path: str | os.PathLike) -> Dataset:
    """Open a store as a ``Dataset`` whose arrays are read-only memory maps of its
    columns: the data stay on disk (in the page cache) rather than in this process's
    own memory, and ``fit``, ``predict`` and ``evaluate`` take the Dataset like any
    other. A corrupt store (a missing or truncated column, a header that does not match
    the columns, a wrong dtype, rows that point outside the arrays) raises
    ``ValueError`` naming the file.

    Examples
    --------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "tiny.store")
    >>> write_store(Dataset([0, 2, 3], [0, 3, 2], [1.0, 0.5, 1.0], [1.0, -1.0]), path)
    >>> data = open_store(path)
    >>> data.values.tolist(), data.n_features_explicit, data.fields
    ([1.0, 0.5, 1.0], True, None)
    """
    path = os.fspath(path)
    header = _read_header(path)
    n_rows, nnz = header["n_rows"], header["nnz"]
    lengths = (n_rows + 1, nnz, nnz, n_rows)
    arrays = []
    for (name, dtype), length in zip(COLUMNS, lengths):
        if name == "values.npy" and header["values"] == "ones":
            arrays.append(None)  # one-hot rows: no values anywhere, the kernels imply 1
        else:
            arrays.append(_open_column(path, name, dtype, length))
    try:
        data = Dataset(*arrays, n_features=header["n_features"])
    except ValueError as exc:
        raise ValueError(f"{path}: corrupt store: {exc}") from None
    if header.get("fields") is None:
        return data
    names = header["fields"].get("names") if isinstance(header["fields"], dict) else None
    file = os.path.join(path, FIELDS_FILE)
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise ValueError(f"{os.path.join(path, HEADER_FILE)}: fields must be null or "
                         f"hold names, a list of strings; got {header['fields']!r:.200}")
    ids = _open_column(path, FIELDS_FILE, "<i4", header["n_features"])
    try:
        _check_fields(ids, names, header["n_features"])
    except ValueError as exc:
        raise ValueError(f"{file}: corrupt store: {exc}") from None
    return data._with_checked_fields(ids, names)
