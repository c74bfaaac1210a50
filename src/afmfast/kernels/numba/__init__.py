"""The Numba backend: ``fm`` and ``afm`` implement ``afmfast.kernels.api`` as the Cython
extensions do, on the shared pieces in ``common``; ``afm_infer`` is AFM's prediction."""
