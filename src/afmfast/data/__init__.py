"""Data layer: the in-memory ``Dataset`` (``dataset``), the libFM text reader
(``libfm``) and the encoding of DataFrames and categorical columns (``encoding``).
It depends on nothing above it; the kernels read its arrays, the models build it."""
