"""The AFM kernels' GEMM on the training step's own shapes, against NumPy's float32 matmul.

    python bench/gemm_rate.py                    # k = t = 16, 64, 256
    python bench/gemm_rate.py --sizes 256 --reps 31

One thread (NumPy's OpenBLAS limited to one), float32, through the kernel module's test
hook ``_gemm_for_test``, which runs the same routine as the step. Two shapes per k:
- forward, U = E W^T for one block of DBLOCK distinct pairs ((DBLOCK x k) @ (k x t));
  the backward product W^T du has the same shape;
- the W gradient, DU^T E over a batch of 12,288 distinct pairs (ml-tag's batch of 4,096
  rows), in the step's blocks of pairs, DU read transposed.
Each is timed with B read in place ("plain") and through the panel layout the step uses
("packed", the copy included in every call: the step packs W once a step and E once per
block of pairs, the latter only for rows ``DW_PACK_MIN_BYTES`` or more apart). The
variants and NumPy alternate repetition by repetition; the script prints medians in
GFLOP/s and each against NumPy's rate for the same product. Memory layout decides much
of the rate at large k: rows a power of two apart crowd a few sets of L1.
"""
import argparse
import os
import time

os.environ["OPENBLAS_NUM_THREADS"] = "1"
import numpy as np  # noqa: E402

from afmfast import _afm_cython as kernels  # noqa: E402

DW_PAIRS_TOTAL = 12288


def _time(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def shapes(k, rng):
    """{name: (flops, {variant: callable})} for one k = t."""
    t = k
    dblock = kernels._constants()["DBLOCK"]
    E = rng.standard_normal((dblock, k), dtype=np.float32)
    WT = rng.standard_normal((k, t), dtype=np.float32)
    U = np.zeros((dblock, t), np.float32)
    forward = {
        "plain": lambda: kernels._gemm_for_test(E, WT, U),
        "packed": lambda: kernels._gemm_for_test(E, WT, U, packed=True),
        "numpy": lambda: E @ WT,
    }
    pb = kernels._dw_block_pairs(k, t, 4)
    n = DW_PAIRS_TOTAL // pb * pb
    DU = rng.standard_normal((n, t), dtype=np.float32)
    EB = rng.standard_normal((n, k), dtype=np.float32)
    G = np.zeros((t, k), np.float32)
    blocks = [(DU[p:p + pb], EB[p:p + pb]) for p in range(0, n, pb)]

    def dw(packed):
        for du, e in blocks:
            kernels._gemm_for_test(du, e, G, transpose_a=True, packed=packed)

    dw_variants = {"plain": lambda: dw(False), "packed": lambda: dw(True),
                   "numpy": lambda: DU.T @ EB}
    return {f"forward ({dblock} x {k}) @ ({k} x {t})": (2 * dblock * k * t, forward),
            f"W gradient, {n} pairs in blocks of {pb}": (2 * n * k * t, dw_variants)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--reps", type=int, default=21)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    pack_min = kernels._constants()["DW_PACK_MIN_BYTES"]
    print(f"float32, 1 thread; kernel vector bytes {kernels._constants()['VECTOR_BYTES']}; "
          f"the step packs E's blocks when k x 4 >= {pack_min} bytes")
    print(f"{'k=t':>5}  {'product':<44} {'plain':>7} {'packed':>7} {'numpy':>7}  "
          f"{'plain/np':>8} {'packed/np':>9}")
    for k in args.sizes:
        for name, (flops, variants) in shapes(k, rng).items():
            times = {v: [] for v in variants}
            for fn in variants.values():
                fn()                                   # warm-up
            for _ in range(args.reps):
                for v, fn in variants.items():
                    times[v].append(_time(fn))
            rate = {v: flops / np.median(ts) / 1e9 for v, ts in times.items()}
            print(f"{k:>5}  {name:<44} {rate['plain']:7.1f} {rate['packed']:7.1f} "
                  f"{rate['numpy']:7.1f}  {rate['plain'] / rate['numpy']:8.2f} "
                  f"{rate['packed'] / rate['numpy']:9.2f}")
    print("GFLOP/s, medians of --reps alternating repetitions")


if __name__ == "__main__":
    main()
