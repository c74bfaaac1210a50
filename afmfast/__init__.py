"""afmfast: Factorization Machines and Attentional Factorization Machines trained fast on
multicore CPUs, with Cython and Numba kernels and no deep-learning framework.

>>> import afmfast
>>> sorted(n for n in afmfast.__all__)[:3]
['Dataset', 'FM', 'TrainingDivergedError']
"""
from .dataset import Dataset, load_libfm
from .estimator import FM, TrainingDivergedError
from .persistence import load

__version__ = "0.1.0"
__all__ = ["Dataset", "FM", "TrainingDivergedError", "load", "load_libfm", "__version__"]
