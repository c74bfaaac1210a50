"""Data bigger than memory: convert a generated text file to a store, then train from it.

    python bench/out_of_core.py --gb 1            # ml-tag-shaped one-hot text, 1 GB
    python bench/out_of_core.py --gb 4 --keep     # keep the text and store in --dir
    python bench/out_of_core.py --gb 1 --repeat 30 --reps 1   # a 30 GB store
    python bench/out_of_core.py --shape criteo --gb 1   # raw Criteo-shaped TSV, hashed
    python bench/out_of_core.py --collisions --rows 45000000  # hash collision table

``--shape criteo`` generates Criteo-shaped tab-separated logs (a 0/1 label, 13 integer
columns and 26 categorical columns of 8 hex digits, empty where missing) whose
categorical values follow a Zipf law (P(rank r) ~ 1/r) over Criteo-like cardinalities
(``CRITEO_CARDINALITIES``: four columns with millions of values, many small ones) and
converts them with ``format="criteo"`` (``--hash-bits``, default 22). ``--collisions``
draws ``--rows`` such rows (no text) and prints, for hash_bits 18, 20, 22 and 24, the
fraction of the distinct (column, value) pairs that share their id with another pair,
the fraction of the nonzeros whose pair does, the fraction of the nonzeros whose pair is
not the most frequent one of its id, and the ids that several fields share.

By default it generates ml-tag-shaped one-hot libFM text (label, user, item, tag: 3
nonzeros a row, 90,445 features) of about ``--gb`` GB in ``--dir`` (default: a temporary
directory on the same disk as /tmp), converts it with ``afmfast.convert`` and prints the conversion's
MB/s and the peak anonymous memory (``RssAnon``, sampled every 5 ms: the page cache
and the memory-mapped input and columns are file pages, not counted). Then it trains
one FM k=16 epoch (``--model afm``: AFM k=t=16) from the store (``open_store``, fit's
windowed order) and, when the data fit comfortably in memory (``--in-memory-gb``,
default 2), one from the same rows loaded in memory (the full shuffle), alternating
twice, and prints the median seconds per row of each and their ratio, with the peak
anonymous memory of the store epochs.
"""
import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import afmfast
from afmfast.kernels.threads import default_threads
from afmfast.models.training import Trainer
from comparison.memory import proc_status_bytes  # bench/ is this script's folder

N_USERS, N_ITEMS, N_TAGS = 17_045, 23_743, 49_657
ROWS_PER_BLOCK = 1 << 20
#: distinct values of C1..C26 (of the order of those of the Criteo Kaggle set)
CRITEO_CARDINALITIES = (1460, 583, 10_131_227, 2_202_608, 305, 24, 12_517, 633, 3,
                        93_145, 5_683, 8_351_593, 3_194, 27, 14_992, 5_461_306, 10, 5_652,
                        2_173, 4, 7_046_547, 18, 15, 286_181, 105, 142_572)
#: fraction of missing values of I1..I13 and of C1..C26
INT_MISSING = (0.45, 0.0, 0.21, 0.22, 0.03, 0.22, 0.04, 0.0, 0.04, 0.45, 0.04, 0.77, 0.22)
CAT_MISSING = (0.0, 0.0, 0.03, 0.03, 0.0, 0.12, 0.0, 0.0, 0.0, 0.0, 0.0, 0.03, 0.0, 0.0,
               0.0, 0.03, 0.0, 0.0, 0.44, 0.44, 0.03, 0.76, 0.0, 0.03, 0.44, 0.44)
CRITEO_ROWS_PER_BLOCK = 1 << 17
HEX = np.frombuffer(b"0123456789abcdef", np.uint8)


def rss_anon_bytes():
    return proc_status_bytes("RssAnon") or 0


class PeakAnon:
    """Peak RssAnon of this process while the ``with`` block runs (a sampling thread)."""

    def __enter__(self):
        self.peak, self.start = 0, rss_anon_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_anon_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_bytes())
        return False

    @property
    def above_start(self):
        return self.peak - self.start


def write_mltag_text(path, target_bytes, seed=0):
    """One-hot rows ``label user:1 item:1 tag:1`` until the file holds target_bytes."""
    rng = np.random.default_rng(seed)
    written = 0
    with open(path, "wb") as fh:
        while written < target_bytes:
            n = ROWS_PER_BLOCK
            user = rng.integers(0, N_USERS, n)
            item = N_USERS + rng.integers(0, N_ITEMS, n)
            tag = N_USERS + N_ITEMS + rng.integers(0, N_TAGS, n)
            label = np.where(rng.random(n) < 0.33, "1", "-1")
            lines = np.char.add(np.char.add(np.char.add(label, " "), user.astype(str)), ":1 ")
            lines = np.char.add(np.char.add(np.char.add(lines, item.astype(str)), ":1 "),
                                np.char.add(tag.astype(str), ":1"))
            block = ("\n".join(lines.tolist()) + "\n").encode()
            fh.write(block)
            written += len(block)
    return written


def criteo_columns(rng, n):
    """(label (n,), integers (n, 13) int64, categorical ranks (n, 26) int64), missing
    values as -1 ranks and a mask ``int_missing`` (n, 13)."""
    label = (rng.random(n) < 0.26).astype(np.int64)
    ints = np.floor(np.exp(rng.normal(1.5, 1.6, (n, 13)))).astype(np.int64)
    ints[:, 1] -= 3  # I2 has small negative values
    int_missing = rng.random((n, 13)) < np.array(INT_MISSING)
    cards = np.array(CRITEO_CARDINALITIES, np.float64)
    ranks = (np.floor(np.exp(rng.random((n, 26)) * np.log(cards + 1))) - 1).astype(np.int64)
    ranks[rng.random((n, 26)) < np.array(CAT_MISSING)] = -1
    return label, ints, int_missing, ranks


def hex_values(ranks, column):
    """The 32-bit value (as 8 hex digits in the text) of a column's ranks."""
    return (ranks * 2_654_435_761 + column * 40_503) & 0xFFFFFFFF


def criteo_block(rng, n):
    """n Criteo-shaped lines as bytes, assembled by scattering each column's bytes into
    one buffer (vectorised: no Python loop over rows)."""
    label, ints, int_missing, ranks = criteo_columns(rng, n)
    neg = ints < 0
    mag = np.abs(ints)
    digits = np.ones_like(mag)
    for power in range(1, 19):
        digits += mag >= 10 ** power
    lengths = np.empty((n, 40), np.int64)
    lengths[:, 0] = 1
    lengths[:, 1:14] = np.where(int_missing, 0, digits + neg)
    lengths[:, 14:] = np.where(ranks < 0, 0, 8)
    starts = np.cumsum(lengths + 1, axis=1) - (lengths + 1)  # each token and its tab
    line_length = starts[:, -1] + lengths[:, -1] + 1
    row_start = np.concatenate([[0], np.cumsum(line_length)[:-1]])
    starts += row_start[:, None]
    out = np.full(int(line_length.sum()), ord("\t"), np.uint8)
    out[row_start + line_length - 1] = ord("\n")
    out[starts[:, 0]] = ord("0") + label
    for c in range(13):
        keep = ~int_missing[:, c]
        at, m, d = starts[keep, c + 1], mag[keep, c], digits[keep, c]
        sign = neg[keep, c]
        out[at[sign]] = ord("-")
        at = at + sign
        for j in range(int(d.max(initial=0))):
            inside = j < d
            m_in, d_in = m[inside], d[inside]
            out[at[inside] + j] = ord("0") + m_in // 10 ** (d_in - 1 - j) % 10
    for c in range(26):
        keep = ranks[:, c] >= 0
        at, v = starts[keep, c + 14], hex_values(ranks[keep, c], c)
        for j in range(8):
            out[at + j] = HEX[(v >> (28 - 4 * j)) & 15]
    return out.tobytes()


def write_criteo_text(path, target_bytes, seed=0):
    """Criteo-shaped lines until the file holds target_bytes."""
    rng = np.random.default_rng(seed)
    written = 0
    with open(path, "wb") as fh:
        while written < target_bytes:
            block = criteo_block(rng, CRITEO_ROWS_PER_BLOCK)
            fh.write(block)
            written += len(block)
    return written


def collision_table(n_rows, seed=0, bits_list=(18, 20, 22, 24)):
    """Rows of (hash_bits, pairs sharing an id, nonzeros affected, ids shared by
    fields) for n_rows Criteo-shaped rows."""
    from afmfast.data.hashing import buckets, hash_keys

    rng = np.random.default_rng(seed)
    int_counts = [dict() for _ in range(13)]
    cat_counts = [np.zeros(c, np.int64) for c in CRITEO_CARDINALITIES]
    for lo in range(0, n_rows, ROWS_PER_BLOCK):
        _, ints, int_missing, ranks = criteo_columns(rng, min(ROWS_PER_BLOCK, n_rows - lo))
        for c in range(13):
            keys, counts = np.unique(buckets(ints[~int_missing[:, c], c]),
                                     return_counts=True)
            for k, m in zip(keys.tolist(), counts.tolist()):
                int_counts[c][k] = int_counts[c].get(k, 0) + m
        for c in range(26):
            r = ranks[:, c]
            cat_counts[c] += np.bincount(r[r >= 0], minlength=len(cat_counts[c]))
    hashes, occurrences, fields = [], [], []
    for c in range(13):
        keys = np.array(sorted(int_counts[c]), np.int64)
        hashes.append(hash_keys(keys.view(np.uint8).reshape(-1, 8), c))
        occurrences.append(np.array([int_counts[c][k] for k in keys.tolist()], np.int64))
        fields.append(np.full(keys.size, c, np.int16))
    for c in range(26):
        present = np.flatnonzero(cat_counts[c])
        v = hex_values(present, c)
        text = HEX[(v[:, None] >> (28 - 4 * np.arange(8))) & 15].astype(np.uint8)
        hashes.append(hash_keys(np.ascontiguousarray(text), 13 + c))
        occurrences.append(cat_counts[c][present])
        fields.append(np.full(present.size, 13 + c, np.int16))
    hashes, occurrences = np.concatenate(hashes), np.concatenate(occurrences)
    fields = np.concatenate(fields)
    table = []
    for bits in bits_list:
        ids = hashes & ((1 << bits) - 1)
        shared = np.bincount(ids, minlength=1 << bits)[ids] > 1
        lowest = np.full(1 << bits, 99, np.int16)
        highest = np.full(1 << bits, -1, np.int16)
        np.minimum.at(lowest, ids, fields)
        np.maximum.at(highest, ids, fields)
        # a pair that is not the most frequent of its id: its nonzeros mostly train
        # another value's parameters
        order = np.lexsort((-occurrences, ids))
        sorted_ids = ids[order]
        minor = np.concatenate([[False], sorted_ids[1:] == sorted_ids[:-1]])
        table.append((bits, shared.mean(), occurrences[shared].sum() / occurrences.sum(),
                      occurrences[order][minor].sum() / occurrences.sum(),
                      int(np.count_nonzero((highest >= 0) & (highest != lowest)))))
    return hashes.size, int(occurrences.sum()), table


def epoch_seconds(data, threads, epoch, kind="fm"):
    model = (afmfast.FM(n_factors=16, n_threads=threads, verbose=0) if kind == "fm" else
             afmfast.AFM(n_factors=16, attention_size=16, n_threads=threads, verbose=0))
    model._validate()
    trainer = Trainer(model, data, adaptive=False)
    t0 = time.perf_counter()
    # fit's order: windowed for a store, the full shuffle in memory (counted in the time)
    trainer.train_epoch(data.X, data.y, trainer.epoch_segments(data, epoch, reuse=True), 0)
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="size of the text (GB)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the text and the store")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-sync", action="store_true",
                        help="convert with durable=False (no fsync: the page cache's speed)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="convert the text this many times into one store (a store "
                        "larger than memory from a text that is not)")
    parser.add_argument("--reps", type=int, default=2,
                        help="timed epochs of each kind (0: convert only)")
    parser.add_argument("--model", choices=("fm", "afm"), default="fm",
                        help="the model of the timed epochs (k = t = 16)")
    parser.add_argument("--in-memory-gb", type=float, default=2.0,
                        help="also train in memory up to this text size (GB)")
    parser.add_argument("--shape", choices=("mltag", "criteo"), default="mltag",
                        help="ml-tag-shaped libFM text, or Criteo-shaped raw logs hashed")
    parser.add_argument("--hash-bits", type=int, default=22,
                        help="--shape criteo: hash into 2^B ids")
    parser.add_argument("--collisions", action="store_true",
                        help="print the hash collision table of --rows Criteo-shaped rows")
    parser.add_argument("--rows", type=int, default=45_000_000,
                        help="--collisions: rows drawn (the Criteo Kaggle set: 45M)")
    args = parser.parse_args()
    if args.collisions:
        pairs, nnz, table = collision_table(args.rows)
        print(f"{args.rows:,} Criteo-shaped rows: {pairs:,} distinct (column, value) "
              f"pairs, {nnz:,} nonzeros")
        print("| hash_bits | pairs sharing an id | nonzeros affected | nonzeros of a "
              "pair not the most frequent of its id | ids shared by fields |\n"
              "|---|---|---|---|---|")
        for bits, pair_share, nnz_share, minor_share, by_fields in table:
            print(f"| {bits} | {pair_share:.1%} | {nnz_share:.1%} | {minor_share:.2%} | "
                  f"{by_fields:,} |")
        return 0
    folder = Path(args.dir or tempfile.mkdtemp(prefix="afmfast-ooc-"))
    folder.mkdir(parents=True, exist_ok=True)
    criteo = args.shape == "criteo"
    text = folder / ("criteo.tsv" if criteo else "mltag.libfm")
    store = folder / ("criteo.store" if criteo else "mltag.store")
    try:
        if not text.exists():
            t = time.perf_counter()
            size = (write_criteo_text if criteo else write_mltag_text)(text,
                                                                       int(args.gb * 1e9))
            print(f"generated {size / 1e6:,.0f} MB of text in {time.perf_counter() - t:.0f} s")
        size = text.stat().st_size * args.repeat
        options = {"format": "criteo", "hash_bits": args.hash_bits} if criteo else {}
        with PeakAnon() as mem:
            t = time.perf_counter()
            header = afmfast.convert([text] * args.repeat, store, n_threads=args.threads,
                                     durable=not args.no_sync, **options)
            seconds = time.perf_counter() - t
        print(f"convert: {size / 1e6:,.0f} MB in {seconds:.1f} s = {size / 1e6 / seconds:,.0f} "
              f"MB/s; peak RssAnon {mem.above_start / 2**20:,.0f} MiB above the start "
              f"({header['n_rows']:,} rows)")
        if args.reps == 0:  # the conversion only
            return 0
        threads = args.threads or default_threads()
        from_store, in_memory, peaks = [], [], []
        loaded = None
        if size <= args.in_memory_gb * 1e9:
            mapped = afmfast.open_store(store)
            loaded = (afmfast.Dataset(np.array(mapped.indptr), np.array(mapped.indices), None,
                                      np.array(mapped.y), n_features=mapped.n_features)
                      if criteo else afmfast.load_libfm(text))
        for rep in range(args.reps):
            with PeakAnon() as mem:
                from_store.append(epoch_seconds(afmfast.open_store(store), threads, 1 + rep,
                                                args.model))
            peaks.append(mem.above_start)
            if loaded is not None:
                in_memory.append(epoch_seconds(loaded, threads, 1 + rep, args.model))
        n = afmfast.open_store(store).n_rows
        line = (f"{args.model.upper()} k=16 epoch, {threads} thread(s): store {np.median(from_store) / n * 1e9:.0f} "
                f"ns/row, peak RssAnon {max(peaks) / 2**20:,.0f} MiB above the start")
        if in_memory:
            ratio = np.median(from_store) / np.median(in_memory)
            line += (f"; in memory {np.median(in_memory) / n * 1e9:.0f} ns/row; store / "
                     f"memory {ratio:.2f}x")
        print(line)
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
