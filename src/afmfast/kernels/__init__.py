"""Kernel layer: the contract every backend implements (``api``), the float64 NumPy
reference that defines what they compute (``reference``), the choice of backend
(``backends``) and of thread count (``threads``), the choice of compiled instruction-set
level (``dispatch``), and the Numba backend (``numba``). The Cython backend is the
compiled ``afmfast._fm_cython`` / ``afmfast._afm_cython`` (sources in ``csrc/``)."""
