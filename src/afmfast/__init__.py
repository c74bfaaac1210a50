"""afmfast: Factorization Machines and Attentional Factorization Machines trained fast on
multicore CPUs, with Cython and Numba kernels and no deep-learning framework.

>>> import afmfast
>>> sorted(afmfast.__all__)[:4]
['AFM', 'AFMClassifier', 'Attention', 'Dataset']
"""
from afmfast._version import __version__
from afmfast.kernels.dispatch import build_info  # first: it decides which compiled kernels load
from afmfast.models.afm import AFM, AFMClassifier, Attention
from afmfast.data.dataset import Dataset
from afmfast.data.libfm import load_libfm
from afmfast.data.store import convert, open_store, write_store
from afmfast.data.encoding import FeatureMap, encode
from afmfast.models.base import NotFittedError
from afmfast.models.training import TrainingDivergedError
from afmfast.models.fm import FM, FMClassifier
from afmfast.models.persistence import load
from afmfast.plotting import plot_field_attention

__all__ = ["AFM", "AFMClassifier", "Attention", "Dataset", "FM", "FMClassifier",
           "FeatureMap", "NotFittedError", "TrainingDivergedError", "build_info", "convert",
           "encode", "load", "load_libfm", "open_store", "plot_field_attention",
           "write_store", "__version__"]
