"""Choosing a kernel backend (the thread count: ``afmfast.kernels.threads``).

A backend is a module implementing the contract of ``afmfast.kernels.api`` for one model
("fm" or "afm"; "mcmc": the Gibbs sweep of ``afmfast.kernels.mcmc``): the Cython extensions
``afmfast._<model>_cython`` (compiled by ``pip install``, the SGD kernels for several
instruction-set levels; ``afmfast.kernels.dispatch`` decides which level that name loads) or
the Numba modules ``afmfast.kernels.numba.<model>`` (compiled at first use, cached on disk). ``"auto"`` takes Cython when its extension imports and warns loudly when
it falls back to Numba.
"""
import importlib
import warnings

BACKEND_MODULES = {"cython": "afmfast._{model}_cython", "numba": "afmfast.kernels.numba.{model}"}
BACKEND_NAMES = ("auto",) + tuple(BACKEND_MODULES)
MODELS = ("fm", "afm", "mcmc")

_loaded = {}
_fallback_warned = False


def _import(name, model):
    key = (name, model)
    if key not in _loaded:
        try:
            _loaded[key] = importlib.import_module(BACKEND_MODULES[name].format(model=model))
        except ImportError as exc:  # kept so that the error can be reported when asked for
            _loaded[key] = exc
    return _loaded[key]


def available_backends(model="fm"):
    """Names of the backends of ``model`` that import on this machine, Cython first.

    Examples
    --------
    >>> "numba" in available_backends("afm")
    True
    """
    return [name for name in BACKEND_MODULES
            if not isinstance(_import(name, model), Exception)]


def backend_name(module):
    """The name ("cython" or "numba") of a backend module that ``get_backend`` returned.

    Examples
    --------
    >>> backend_name(get_backend("numba", "afm"))
    'numba'
    """
    for name, pattern in BACKEND_MODULES.items():
        if module.__name__ in {pattern.format(model=model) for model in MODELS}:
            return name
    raise ValueError(f"{module.__name__} is not an afmfast kernel backend")


def get_backend(name="auto", model="fm"):
    """The backend module called ``name`` ("auto", "cython" or "numba") for ``model``.

    Examples
    --------
    >>> get_backend("numba", "fm").__name__
    'afmfast.kernels.numba.fm'
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    if name == "auto":
        module = _import("cython", model)
        if not isinstance(module, Exception):
            return module
        global _fallback_warned
        if not _fallback_warned:  # once a process: every fit would repeat it otherwise
            _fallback_warned = True
            warnings.warn(
                "afmfast: the compiled Cython kernels are missing "
                f"({module}); training runs on the Numba backend (same results, slower). "
                "afmfast was probably installed without a C compiler with OpenMP: install "
                "gcc and reinstall afmfast to get them.",
                RuntimeWarning,
                stacklevel=2,
            )
        name = "numba"
    module = _import(name, model)
    if isinstance(module, Exception):
        raise ImportError(f"afmfast backend {name!r} is not available: {module}") from module
    return module
