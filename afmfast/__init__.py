"""afmfast: Factorization Machines and Attentional Factorization Machines trained fast on
multicore CPUs, with Cython and Numba kernels and no deep-learning framework.

>>> import afmfast
>>> sorted(afmfast.__all__)[:4]
['AFM', 'Attention', 'Dataset', 'FM']
"""
from .afm import AFM, Attention
from .dataset import Dataset, load_libfm
from .encoding import FeatureMap, encode
from .estimator import TrainingDivergedError
from .fm import FM
from .persistence import load
from .plotting import plot_field_attention

__version__ = "0.1.0"
__all__ = ["AFM", "Attention", "Dataset", "FM", "FeatureMap", "TrainingDivergedError",
           "encode", "load", "load_libfm", "plot_field_attention", "__version__"]
