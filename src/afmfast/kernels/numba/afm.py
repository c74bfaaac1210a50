"""The Numba AFM backend module: the AFM section of ``afmfast.kernels.api``, put together
from its training half (``afm_train``: workspace and step) and its inference half
(``afm_infer``: predict and explain, which reuse the training half's helpers), so that
neither half imports the other's importer."""
from afmfast.kernels.numba.afm_infer import afm_explain, afm_predict
from afmfast.kernels.numba.afm_train import AFMWorkspace, afm_step, afm_steps, afm_workspace
from afmfast.kernels.numba.common import shuffled_rows  # the backend's epoch order
from afmfast.kernels.numba.common import track_touched

__all__ = ["AFMWorkspace", "afm_workspace", "afm_step", "afm_steps", "afm_predict",
           "afm_explain", "shuffled_rows", "track_touched"]
