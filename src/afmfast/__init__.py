"""afmfast: Factorization Machines and Attentional Factorization Machines trained fast on
multicore CPUs, with Cython and Numba kernels and no deep-learning framework.

>>> import afmfast
>>> sorted(afmfast.__all__)[:4]
['AFM', 'AFMClassifier', 'Attention', 'Dataset']
"""
from .dispatch import build_info  # first: it decides which compiled kernels load
from .afm import AFM, AFMClassifier, Attention
from .dataset import Dataset, load_libfm
from .encoding import FeatureMap, encode
from .estimator import NotFittedError, TrainingDivergedError
from .fm import FM, FMClassifier
from .persistence import load
from .plotting import plot_field_attention

__version__ = "0.1.0"
__all__ = ["AFM", "AFMClassifier", "Attention", "Dataset", "FM", "FMClassifier",
           "FeatureMap", "NotFittedError", "TrainingDivergedError", "build_info", "encode",
           "load", "load_libfm", "plot_field_attention", "__version__"]
