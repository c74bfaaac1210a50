"""The comparison's data sets: frappe-mini's train split (when the research file is
there) and the synthetic ml-tag set, written to .npz files for the workers, and the
counts the tables need (pairs per row, distinct pairs of a batch, bytes)."""
import os
import time

import numpy as np

from bench_common import FRAPPE, frappe_mini_train, log, save_dataset, synthetic_mltag

from comparison.settings import BATCH


def pairs_per_row(data):
    n = np.diff(data.indptr)
    return n * (n - 1) // 2


def distinct_pairs(data, batches):
    """Distinct (feature, feature) pairs (in row order) of each batch: what a kernel that
    runs the attention MLP once per distinct pair computes. None when rows are not all
    of one length with values 1 (the count would need the values too)."""
    nnz = np.diff(data.indptr)
    if not len(nnz) or nnz.min() != nnz.max() or not np.all(data.values == 1):
        return None
    ids = data.indices.astype(np.int64).reshape(-1, int(nnz[0]))
    pp, qq = np.triu_indices(int(nnz[0]), k=1)
    return [len(np.unique((ids[b][:, pp] * data.n_features + ids[b][:, qq]).ravel()))
            for b in batches]


def data_bytes(data):
    return sum(a.nbytes for a in (data.indptr, data.indices, data.values, data.y))


def load_sets(rows, no_frappe):
    """[(name, Dataset)]: frappe-mini train unless skipped or absent (said why), then
    ``rows`` synthetic ml-tag rows."""
    sets = []
    if no_frappe:
        print("frappe-mini: skipped (--no-frappe)")
    elif FRAPPE.exists():
        sets.append(("frappe-mini train", frappe_mini_train()))
    else:
        print(f"frappe-mini: skipped, {FRAPPE} is absent (research data kept beside the "
              "repository in ../shared/data, never copied into it)")
    t0 = time.perf_counter()
    sets.append(("synthetic ml-tag", synthetic_mltag(rows)))
    log(f"synthetic data: {rows} rows in {time.perf_counter() - t0:.1f} s")
    return sets


def save_sets(sets, directory):
    """Each set written to directory as data<i>.npz for the workers: the paths."""
    paths = []
    for i, (_, data) in enumerate(sets):
        paths.append(os.path.join(directory, f"data{i}.npz"))
        save_dataset(data, paths[-1])
    return paths


def timed_batches(data, steps):
    """The batches the steps mode times (the permutation of ``workers.timing_plan``)."""
    order = np.random.default_rng(1).permutation(data.n_rows)
    n_full = max(1, data.n_rows // BATCH)
    return [order[i * BATCH:(i + 1) * BATCH] for i in range(min(steps + 1, n_full))]


def describe(name, data, steps):
    """The set's figures for the JSON document and the tables: shape, pairs, bytes, and
    the share of distinct pairs in the steps mode's batches (None when not countable)."""
    pairs = pairs_per_row(data)
    nnz = np.diff(data.indptr)
    timed = timed_batches(data, steps)
    dist = distinct_pairs(data, timed)
    out = dict(name=name, rows=int(data.n_rows), features=int(data.n_features),
               nnz_min=int(nnz.min()), nnz_max=int(nnz.max()),
               max_row_nnz=int(data.max_row_nnz), pairs_max=int(pairs.max()),
               pairs_total=int(pairs.sum()), pairs_first_batch=int(pairs[:BATCH].sum()),
               data_bytes=int(data_bytes(data)), distinct_share=None,
               distinct_median=None, pairs_timed_batch=int(pairs[timed[0]].sum()))
    if dist is not None:
        out["distinct_share"] = (float(np.mean(dist))
                                 / float(np.mean([pairs[b].sum() for b in timed])))
        out["distinct_median"] = int(np.median(dist))
    return out
