"""How the comparison measures: batch, configurations, thread counts, repetitions and
the environment of the workers. The targets the figures are judged against are in
``targets``."""
BATCH = 4096
WARMUP_ROWS = 1024  # one warm-up batch per thread count before the timed repetitions
CONFIGS = [("fm", 16), ("fm", 256), ("afm", 16), ("afm", 64), ("afm", 256)]
THREADS = [1, 2]
MIN_TIMED_SECONDS = 3.0  # per thread count and configuration (--quick: 1)
MAX_REPS = 200
STEPS_PER_SWITCH = 4  # steps mode: batches in a row at one thread count, the first untimed
PROBE_EVERY = 2.0  # seconds between CPU 0/1 probes while a row runs (each takes ~0.3 s)
EPOCHS_MODE_MAX_K = 64  # k up to this: whole epochs are timed; above: single batches
# afmfast's workers return every freed block of 64 KB or more to the system (glibc's
# mmap threshold, otherwise raised to 32 MB after the first large free), so that memory
# freed before the baseline (data loading, warm-up) is not reused unseen by training
# and the peak counts what training holds. Not for PyTorch's workers: its allocator
# frees and takes large blocks every batch, which the setting would slow down.
AFMFAST_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
ATTENTION_K = 256  # the configuration whose attention product is set against NumPy


def config_label(model, k):
    """"FM k=16" / "AFM k=16 t=16", as the console tables name a configuration."""
    return f"{model.upper()} k={k}" + (f" t={k}" if model == "afm" else "")


def timing_mode(k):
    """"epochs" (whole shuffled epochs timed) or "steps" (single batches times N/B)."""
    return "epochs" if k <= EPOCHS_MODE_MAX_K else "steps"
