"""Data-parallel training on a Dask cluster (the optional ``dask`` extra:
``pip install "afmfast[dask]"``).

``DaskFM``, ``DaskAFM``, ``DaskFMClassifier`` and ``DaskAFMClassifier`` take the local
estimators' parameters plus ``client`` and ``sync_every``; ``fit`` reads binary stores
that the workers open themselves, trains with periodic parameter averaging (local SGD)
and leaves an ordinary local estimator behind (``to_local()``). ``import afmfast`` never
imports Dask; this module is the entry point.

>>> from afmfast.dask import DaskFM
>>> DaskFM(sync_every=4).to_local.__name__
'to_local'
"""
try:
    import dask  # noqa: F401
    import distributed  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("afmfast.dask needs dask and distributed: pip install "
                      "\"afmfast[dask]\" (or \"dask[distributed]\")") from exc

from afmfast.dask.estimators import (
    DaskAFM,
    DaskAFMClassifier,
    DaskFM,
    DaskFMClassifier,
    DaskModel,
    WorkerLostError,
)
from afmfast.dask.worker import ShardError

__all__ = ["DaskAFM", "DaskAFMClassifier", "DaskFM", "DaskFMClassifier", "DaskModel",
           "ShardError", "WorkerLostError"]
