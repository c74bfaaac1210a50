"""Data bigger than memory: convert a generated libFM file to a store, then train from it.

    python bench/out_of_core.py --gb 1            # ml-tag-shaped one-hot text, 1 GB
    python bench/out_of_core.py --gb 4 --keep     # keep the text and store in --dir
    python bench/out_of_core.py --gb 1 --repeat 30 --reps 1   # a 30 GB store

Generates ml-tag-shaped one-hot libFM text (label, user, item, tag: 3 nonzeros a row,
90,445 features) of about ``--gb`` GB in ``--dir`` (default: a temporary directory on the
same disk as /tmp), converts it with ``afmfast.convert`` and prints the conversion's
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


def epoch_seconds(data, threads, epoch, kind="fm"):
    model = (afmfast.FM(n_factors=16, n_threads=threads, verbose=0) if kind == "fm" else
             afmfast.AFM(n_factors=16, attention_size=16, n_threads=threads, verbose=0))
    model._validate()
    trainer = Trainer(model, data, adaptive=False)
    t0 = time.perf_counter()
    # fit's order: windowed for a store, the full shuffle in memory (counted in the time)
    trainer.train_epoch(data.X, data.y, trainer.epoch_segments(data, epoch), 0)
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="size of the text (GB)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the text and the store")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=1,
                        help="convert the text this many times into one store (a store "
                        "larger than memory from a text that is not)")
    parser.add_argument("--reps", type=int, default=2, help="timed epochs of each kind")
    parser.add_argument("--model", choices=("fm", "afm"), default="fm",
                        help="the model of the timed epochs (k = t = 16)")
    parser.add_argument("--in-memory-gb", type=float, default=2.0,
                        help="also train in memory up to this text size (GB)")
    args = parser.parse_args()
    folder = Path(args.dir or tempfile.mkdtemp(prefix="afmfast-ooc-"))
    folder.mkdir(parents=True, exist_ok=True)
    text, store = folder / "mltag.libfm", folder / "mltag.store"
    try:
        if not text.exists():
            t = time.perf_counter()
            size = write_mltag_text(text, int(args.gb * 1e9))
            print(f"generated {size / 1e6:,.0f} MB of text in {time.perf_counter() - t:.0f} s")
        size = text.stat().st_size * args.repeat
        with PeakAnon() as mem:
            t = time.perf_counter()
            header = afmfast.convert([text] * args.repeat, store, n_threads=args.threads)
            seconds = time.perf_counter() - t
        print(f"convert: {size / 1e6:,.0f} MB in {seconds:.1f} s = {size / 1e6 / seconds:,.0f} "
              f"MB/s; peak RssAnon {mem.above_start / 2**20:,.0f} MiB above the start "
              f"({header['n_rows']:,} rows)")
        threads = args.threads or default_threads()
        from_store, in_memory, peaks = [], [], []
        loaded = afmfast.load_libfm(text) if size <= args.in_memory_gb * 1e9 else None
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
