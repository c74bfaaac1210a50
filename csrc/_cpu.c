/* afmfast._cpu: which instruction-set extensions this CPU has and the OS lets programs
   use, for afmfast.dispatch to choose among the builds of the kernels.

   Compiled for the x86-64 baseline (never with -march flags) and without OpenMP, so it
   runs on any CPU the package installs on. GCC's __builtin_cpu_supports reads CPUID and,
   for the AVX and AVX-512 families, XGETBV: a feature whose registers the OS does not
   save on a context switch counts as absent.

   features() -> tuple of str: the names of FEATURES present (empty off x86 or with a
   compiler without __builtin_cpu_supports).
   compiler: the compiler and its version ("GCC " __VERSION__, or clang's __VERSION__),
   "" when unknown. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define AFMFAST_CPU_X86 1
#endif

static PyObject *features(PyObject *self, PyObject *unused) {
    PyObject *out = PyList_New(0), *tuple;
    (void)self;
    (void)unused;
    if (out == NULL) return NULL;
#ifdef AFMFAST_CPU_X86
    __builtin_cpu_init();
    /* __builtin_cpu_supports takes a string literal, hence one line per feature. The
       x86-64-v2 features come first, then those -march=x86-64-v3 adds, then v4's. */
#define AFMFAST_FEATURE(name)                                                          \
    if (__builtin_cpu_supports(name)) {                                                \
        PyObject *s = PyUnicode_FromString(name);                                      \
        if (s == NULL || PyList_Append(out, s) < 0) {                                  \
            Py_XDECREF(s);                                                             \
            Py_DECREF(out);                                                            \
            return NULL;                                                               \
        }                                                                              \
        Py_DECREF(s);                                                                  \
    }
    AFMFAST_FEATURE("cmpxchg16b")
    AFMFAST_FEATURE("lahf_lm")
    AFMFAST_FEATURE("popcnt")
    AFMFAST_FEATURE("sse3")
    AFMFAST_FEATURE("ssse3")
    AFMFAST_FEATURE("sse4.1")
    AFMFAST_FEATURE("sse4.2")
    AFMFAST_FEATURE("avx")
    AFMFAST_FEATURE("avx2")
    AFMFAST_FEATURE("bmi")
    AFMFAST_FEATURE("bmi2")
    AFMFAST_FEATURE("f16c")
    AFMFAST_FEATURE("fma")
    AFMFAST_FEATURE("lzcnt")
    AFMFAST_FEATURE("movbe")
    AFMFAST_FEATURE("avx512f")
    AFMFAST_FEATURE("avx512bw")
    AFMFAST_FEATURE("avx512cd")
    AFMFAST_FEATURE("avx512dq")
    AFMFAST_FEATURE("avx512vl")
#undef AFMFAST_FEATURE
#endif
    tuple = PyList_AsTuple(out);
    Py_DECREF(out);
    return tuple;
}

static PyMethodDef methods[] = {
    {"features", features, METH_NOARGS,
     "features() -> tuple of str: the instruction-set extensions this CPU has and the "
     "OS enables (GCC's __builtin_cpu_supports names)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "afmfast._cpu",
    "The CPU's instruction-set features, for afmfast.dispatch.", -1, methods,
};

PyMODINIT_FUNC PyInit__cpu(void) {
    PyObject *m = PyModule_Create(&module);
#if defined(__clang__) || !defined(__GNUC__)
#ifdef __VERSION__
    const char *compiler = __VERSION__;  /* clang's names the compiler */
#else
    const char *compiler = "";
#endif
#else
    const char *compiler = "GCC " __VERSION__;
#endif
    if (m != NULL && PyModule_AddStringConstant(m, "compiler", compiler) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
