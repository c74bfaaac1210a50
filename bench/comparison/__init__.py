"""The comparison behind ``bench/compare.py``: afmfast against PyTorch and against the
machine's matmul ceiling, side by side in one run.

Modules, in the order a run uses them: ``settings`` (batch, configurations, thread
counts, repetitions), ``datasets`` (the data sets and their counts), ``probes`` (the CPU
0/1 probe), ``workers`` and ``check`` (the training workers and the same-math check,
each in its own interpreter), ``memory`` (RSS helpers and the memory table's figures),
``measure`` (every row of every set), ``figures`` (medians, ratios, rates, verdicts),
``targets`` (the goals as data), ``report`` (the console tables), ``document`` (the
JSON document), ``readme`` (the README's tables from JSON), ``loadrun`` (``--load``)
and ``cli`` (the command line and the main sequence).

Data
- frappe-mini train split: ``../shared/data/frappe/frappe.validation.libfm`` beside the
  repository (research data, read in place, never copied), rows whose 1-based line number
  is not divisible by 5 (46,178 rows, 10 one-hot nonzeros, 45 pairs a row). Skipped
  with a message when the file is absent.
- synthetic, shaped like ml-tag: ``--rows`` rows (2,000,000 by default), 3 one-hot fields
  (user 17,000, item 23,500, tag 49,500 ids: 90,000 features) drawn with Zipf-like
  popularity, labels -1/1 (one third positive) from planted pairwise factors; generated
  in memory from a fixed seed.

What is measured (batch 4096; the estimators' default hyperparameters)
- seconds per epoch of FM k=16, k=256 and AFM k=t=16, k=t=256: afmfast (each backend
  that imports, 1 and 2 threads) and ``bench/torch_models.py`` (same threads through
  ``torch.set_num_threads``). afmfast trains as fit does without its per-epoch
  evaluation: a ``afmfast.models.training.Trainer``'s ``epoch_order`` and
  ``train_epoch`` (runs of batches per kernel call); single batches go through its
  ``train_batch``. PyTorch runs ``torch.randperm``, then per batch
  zero_grad, loss, backward and Adagrad on pre-built (N, n) index tensors. At k <= 64
  the figure is the median of at least ``--epochs`` full epochs (a shuffled pass each);
  at k >= 128 it is the median of at least ``--steps`` single full batches times
  n_rows / 4096 (marked "steps x N/B" in the table). 1 and 2
  threads alternate repetition by repetition, after one warm-up batch each, so that a
  change of load on the shared machine hits both alike. In steps mode a repetition is
  STEPS_PER_SWITCH consecutive batches at one thread count, the first untimed:
  switching the thread count every batch made the 2-thread batches slower (FM k=256 on
  ml-tag), a cost that training at one thread count never pays. Repetitions go on while
  a thread count has been timed for less than MIN_TIMED_SECONDS of wall time in all (at
  most MAX_REPS; in steps mode the batches' own time, not the epochs they stand for):
  a few short epochs or batches would be at the mercy of one noisy moment of the
  shared machine.
- the AFM attention product's achieved GFLOP/s: 6 P k t flops per batch (forward
  2 P k t for W e_ij, backward 4 P k t for dW and de; P = the batch's pairs, counted from
  the data), divided by the whole step time, against NumPy float32 ``(P x k) @ (k x t)``
  of that P in a subprocess per environment: with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE
  removed (the CPU's own OpenBLAS kernel: the ceiling) and with the environment as set;
  threadpoolctl names the kernel that ran. afmfast runs the attention MLP once per
  distinct (i, j) pair of a batch, so the all-pairs rate is an effective one (it can
  pass 100% and the machine's peak); the table adds the rate on the distinct pairs
  counted in the timed batches (6 D k t), the flops actually executed.
- 2-thread speed-up t(1 thread) / t(2 threads) per configuration, with two probes of
  CPUs 0 and 1 run before and after every configuration and between its repetitions
  (every PROBE_EVERY seconds; ``bench/core_to_core.c``, compiled with ``cc`` when there
  is one; the table gives the range of the readings): the one-way latency of a cache
  line between them (the VMs here sometimes have their two vCPUs on one chiplet and
  sometimes on two, see the README's Speed section, and the memory-bound kernels scale
  far worse in the second case) and their floating-point throughput together relative
  to CPU 0 alone (2.00 unless the host runs other work on the same physical cores). The summary of the
  issue's targets adds to a missed one what the probes of its rows saw when it was not
  a quiet machine (a latency over SPLIT_LATENCY_NS, flops below SHARED_FLOPS).
- memory: every configuration runs in its own subprocess (afmfast's with
  AFMFAST_MALLOC_ENV, so that freed memory leaves the RSS); after loading the data and a
  warm-up fit on 64 rows (JIT and thread pools; a model of those rows' features only)
  the peak RSS is reset (``/proc/self/clear_refs``) and read back as VmHWM after
  training (the figure ``resource.getrusage`` gives, without the parent's peak that
  ru_maxrss inherits across fork + exec): the peak of training itself, shown with the
  RSS before training, the data's bytes, the parameters plus the optimiser state in
  memory, fit's epoch order (8 bytes a row, epochs mode; the steps mode's batches are
  drawn before the baseline), what remains (training's work space) and the issue's
  work-space bound B * (P per row) * max(k, t) * 4 bytes (FM: B * (nonzeros per row) *
  k * 4). The memory target counts as met when every afmfast row's work space is at
  most MEMORY_FACTOR times its bound plus MEMORY_SLACK_MB (``targets``: why 8).
- the libFM reader (``bench/reader_speed.py``'s measurement; ``--no-reader`` or
  ``--configs`` skip it): MB/s of ``load_libfm`` on a 100 MB synthetic one-hot file
  (Frappe's shape), 1 thread and all CPUs alternating, against the reference-style
  Python loader; the target is 1000 MB/s with all CPUs.

Same math check (printed first): the PyTorch models, built in float64 from the same
initial parameters as afmfast, take two Adagrad steps on 256 rows with dropout off (keep
1) and batch norm on (FM) / attention with l2_attention 100 and k != t (AFM); the loss of
each step and every parameter table afterwards (V, w, W, w0/p/b/h, BN scale/shift and
running statistics) must equal ``afmfast.kernels.reference.fm_step`` / ``afm_step`` (float64)
to 1e-9 relative. A failed check is printed and marks the PyTorch columns unverified.
Dropout draws differ (PyTorch's RNG against afmfast's counter hash); the distribution is
the same.
"""
