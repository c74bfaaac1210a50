"""Model layer: the scikit-learn estimators (``base`` holds what FM and AFM share,
``fm``, ``afm``), the conversion of user inputs (``inputs``) and model files
(``persistence``). It builds on ``afmfast.data`` and ``afmfast.kernels``."""
