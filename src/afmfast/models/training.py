"""One fit's training: the kernel-side state and the epoch loop.

A ``Trainer`` holds what lives only while a model trains: the kernel backend, the thread
planner, the seed, the optimiser state and the kernels' workspace, beside the model's
parameter tables, which it trains in place. ``FactorizationModel.fit`` builds one, runs
its epoch loop (early stopping, best-epoch restore, divergence stop, Ctrl-C) and drops it,
so a fitted model keeps no optimiser state or native workspace. The bench scripts build
one the same way to time the kernels batch by batch (``train_batch``).

The model supplies what differs between FM and AFM through three hooks:
``_new_params(n_features, rng)``, ``_new_workspace(backend, train)`` and
``_step_config(seed, step, threads)``; the kernel calls are the backend's
``<model>_step`` and ``<model>_steps`` (``model._model`` is "fm" or "afm").
"""
from __future__ import annotations

import math
import sys
import time
from typing import TYPE_CHECKING

import numpy as np

from afmfast.kernels import backends
from afmfast.kernels.api import OPTIMIZER_CODES, new_opt_state
from afmfast.kernels.threads import RunPlanner, resolve_threads
from afmfast.metrics import HIGHER_IS_BETTER
from afmfast.models.epoch_order import order_segments

if TYPE_CHECKING:  # annotations only
    from collections.abc import Callable, Iterable, Iterator, Sequence

    from afmfast.data.dataset import Dataset
    from afmfast.models.base import FactorizationModel

#: the seed of a model whose random_state is None (the reference's fixed seed)
DEFAULT_SEED = 2016


class TrainingDivergedError(FloatingPointError):
    """The training loss became NaN or infinite; the model keeps its last finite
    parameters (those at the end of the last finished epoch).

    Examples
    --------
    >>> import afmfast
    >>> from afmfast.demo import make_demo_data
    >>> data = make_demo_data(n_rows=500, seed=0)
    >>> model = afmfast.FM(learning_rate=1e30, optimizer="sgd", keep=1.0, batch_norm=False,
    ...                    n_epochs=2, n_threads=1, verbose=0)
    >>> try:
    ...     model.fit(data.train)
    ... except afmfast.TrainingDivergedError as exc:
    ...     print(exc)
    training diverged in epoch 1: ... Try a lower learning_rate (now 1e+30).
    """


def _model_seed(model):
    """The seed of a model's initialisation, epoch order and dropout."""
    return DEFAULT_SEED if model.random_state is None else int(model.random_state)


def _copy_params(into, source):
    """Copy every array of the parameter tuple ``source`` into ``into`` (same shapes)."""
    for live, saved in zip(into, source):
        live[...] = saved


class Trainer:
    """The per-fit state of a model and the loops that train it.

    Parameters
    ----------
    model : FactorizationModel
        A validated model; its hyperparameters configure every step.
    train : Dataset
        The training rows (they size the workspace).
    threads : int, optional
        Most kernel threads (default: the model's ``n_threads`` resolved).
    backend : str, optional
        "auto", "cython" or "numba" (default: the model's ``backend``).
    adaptive : bool, optional
        Let runs use fewer threads while that is faster (default: the model's
        ``adaptive_threads``).
    bias : float, optional
        w0's start (default: the model's ``_initial_bias`` of ``train``'s labels).

    New parameter tables are drawn from the model's seed and become ``model._params``:
    the trainer updates the model's own arrays, so the model predicts with the live
    parameters at any time during training (validation after every epoch).

    Examples
    --------
    >>> import numpy as np, afmfast
    >>> from afmfast.demo import make_demo_data
    >>> data = make_demo_data(n_rows=1000, seed=0)
    >>> model = afmfast.FM(n_factors=4, n_threads=1)
    >>> model._validate()
    >>> trainer = Trainer(model, data.train, adaptive=False)
    >>> loss = trainer.train_batch(data.train.X, data.train.y, np.arange(256), step=0)
    >>> bool(np.isfinite(loss)), trainer.params is model._params
    (True, True)
    """

    def __init__(self, model: FactorizationModel, train: Dataset, *,
                 threads: int | None = None, backend: str | None = None,
                 adaptive: bool | None = None, bias: float | None = None):
        self.model = model
        self.backend = backends.get_backend(model.backend if backend is None else backend,
                                            model._model)
        self.threads = resolve_threads(model.n_threads) if threads is None else threads
        self.seed = _model_seed(model)
        self.planner = RunPlanner(self.threads, adaptive=bool(
            model.adaptive_threads if adaptive is None else adaptive))
        self.params = model._new_params(train.n_features, np.random.default_rng(self.seed))
        # w0's start: the model's _initial_bias of train's labels unless given (a Dask
        # worker's, over every worker's rows)
        self.params.dense[0] = (model._initial_bias(label_sum(train), train.n_rows)
                                if bias is None else bias)
        self.state = new_opt_state(self.params, OPTIMIZER_CODES[model.optimizer])
        self.workspace = model._new_workspace(self.backend, train)
        # last: a set-up that fails (memory) leaves a fitted model's parameters alone
        model._params = self.params
        self._step = getattr(self.backend, f"{model._model}_step")
        self._steps = getattr(self.backend, f"{model._model}_steps")
        self._best = self._last_good = None

    # ----- kernel calls ---------------------------------------------------------------
    def config(self, step: int, threads: int | None = None):
        """The kernels' step configuration for global step ``step`` (the seed and step
        give the dropout masks; ``threads`` the kernel's thread count, by default the
        trainer's).

        Examples
        --------
        >>> import afmfast
        >>> from afmfast.demo import make_demo_data
        >>> train = make_demo_data(n_rows=1000, seed=0).train  # 800 rows
        >>> trainer = Trainer(afmfast.FM(n_factors=4, batch_size=256, n_threads=1), train)
        >>> config = trainer.config(7, threads=2)
        >>> config.step, config.n_threads, config.seed
        (7, 2, 2016)
        """
        return self.model._step_config(self.seed, step,
                                       self.threads if threads is None else threads)

    def train_batch(self, X, y, rows: np.ndarray, step: int,
                    threads: int | None = None) -> float:
        """Train one batch (the rows ``rows``) as step ``step``; returns its loss (the
        batch's mean training objective, L2 terms included).

        Examples
        --------
        >>> import afmfast
        >>> from afmfast.demo import make_demo_data
        >>> train = make_demo_data(n_rows=1000, seed=0).train  # 800 rows
        >>> trainer = Trainer(afmfast.FM(n_factors=4, batch_size=256, n_threads=1), train)
        >>> before = trainer.params.V.copy()
        >>> loss = trainer.train_batch(train.X, train.y, np.arange(256), step=0)
        >>> bool(loss > 0), bool((trainer.params.V != before).any())
        (True, True)
        """
        return self._step(X, y, rows, self.params, self.state, self.config(step, threads),
                          self.workspace)

    def train_run(self, X, y, rows: np.ndarray, batch_size: int, step: int,
                  losses: np.ndarray, threads: int | None = None) -> int:
        """Train the rows ``rows`` in batches of ``batch_size`` from step ``step`` in one
        kernel call; writes each batch's loss to ``losses`` and returns the batches
        done (fewer than asked when a loss stops being finite).

        Examples
        --------
        >>> import afmfast
        >>> from afmfast.demo import make_demo_data
        >>> train = make_demo_data(n_rows=1000, seed=0).train  # 800 rows
        >>> trainer = Trainer(afmfast.FM(n_factors=4, batch_size=256, n_threads=1), train)
        >>> losses = np.empty(3)
        >>> trainer.train_run(train.X, train.y, np.arange(768), 256, 0, losses)
        3
        >>> bool(np.all(losses > 0))
        True
        """
        return self._steps(X, y, rows, batch_size, self.params, self.state,
                           self.config(step, threads), self.workspace, losses)

    def epoch_order(self, n_rows: int, epoch: int, threads: int | None = None) -> np.ndarray:
        """The seeded shuffle of ``n_rows`` rows for ``epoch`` (the same for any thread
        count), drawn on the kernels' threads: NumPy's permutation is serial and misses
        the cache at every swap (docs/performance.md, "Epoch order").

        Examples
        --------
        >>> import afmfast
        >>> from afmfast.demo import make_demo_data
        >>> train = make_demo_data(n_rows=1000, seed=0).train  # 800 rows
        >>> trainer = Trainer(afmfast.FM(n_factors=4, batch_size=256, n_threads=1), train)
        >>> order = trainer.epoch_order(train.n_rows, epoch=1)
        >>> sorted(order.tolist()) == list(range(train.n_rows))
        True
        >>> bool((trainer.epoch_order(train.n_rows, 1, threads=2) == order).all())
        True
        """
        return self.backend.shuffled_rows(n_rows, self.seed, epoch,
                                          self.planner.current if threads is None else threads)

    def epoch_segments(self, train: Dataset, epoch: int, *,
                       reuse: bool = False) -> Iterator[np.ndarray]:
        """The order of ``epoch`` over ``train`` as segments for ``train_epoch``: the
        full shuffle in one piece in memory, a windowed order for a memory-mapped
        Dataset (``afmfast.models.epoch_order``; ``reuse``: its windows go into
        buffers that the next window but one overwrites, as training consumes them).

        Examples
        --------
        >>> import afmfast
        >>> from afmfast.demo import make_demo_data
        >>> train = make_demo_data(n_rows=1000, seed=0).train  # 800 rows
        >>> trainer = Trainer(afmfast.FM(n_factors=4, batch_size=256, n_threads=1), train)
        >>> [len(segment) for segment in trainer.epoch_segments(train, epoch=1)]
        [800]
        """
        return order_segments(train, self.seed, epoch, lambda n, seed, key, out=None: (
            self.backend.shuffled_rows(n, seed, key, self.planner.current, out=out)),
            reuse=reuse, unit=int(self.model.shuffle_unit))

    def train_epoch(self, X, y, order: np.ndarray | Iterable[np.ndarray], step: int,
                    epoch: int = 0, progress: _Progress | None = None) -> tuple[int, float]:
        """One pass over the rows ``order`` in batches of the model's batch_size from
        global step ``step``; returns (the step after it, the sum of the batch losses).
        ``order`` is an array of row numbers, or segments of one (``epoch_segments``):
        batches then run across the segments' ends, as over one array.

        The batches go to the kernel in runs (``train_run``, one call each) that the
        planner (``afmfast.kernels.threads.RunPlanner``) sizes and gives a thread count:
        about 0.1 s each, short enough for Ctrl-C to land soon, and long enough that the
        call costs nothing against one call per epoch (python bench/epoch_overhead.py).

        Examples
        --------
        >>> import afmfast
        >>> from afmfast.demo import make_demo_data
        >>> train = make_demo_data(n_rows=1000, seed=0).train  # 800 rows
        >>> trainer = Trainer(afmfast.FM(n_factors=4, batch_size=256, n_threads=1), train)
        >>> order = trainer.epoch_order(train.n_rows, epoch=1)
        >>> step, loss_sum = trainer.train_epoch(train.X, train.y, order, step=0)
        >>> step, bool(loss_sum > 0)  # 800 rows in batches of 256
        (4, True)
        """
        planner = self.planner
        if isinstance(order, np.ndarray):
            # the workspace's batch size (a smaller data set)
            bs = min(self.model.batch_size, len(order))
            segments = [order]
        else:
            bs = min(self.model.batch_size, len(y))
            segments = _whole_batches(order, bs)
        batch_losses, rows_done = [], 0
        for rows in segments:
            n, start = len(rows), 0
            while start < n:
                threads, span = planner.next_run(bs, n - start)
                stop = min(n, start + span * bs)
                losses = np.empty(-(-(stop - start) // bs))
                t = time.perf_counter()
                done = self.train_run(X, y, rows[start:stop], bs, step, losses, threads)
                elapsed = time.perf_counter() - t
                if not math.isfinite(losses[done - 1]):
                    raise self._diverged(epoch, f"the batch loss became {losses[done - 1]}")
                planner.record(threads, stop - start, done, elapsed)
                step += done
                batch_losses.extend(losses[:done].tolist())
                start = stop
                if progress is not None:
                    progress.update(rows_done + stop)
            rows_done += n
        # fsum: the same total however the planner cut the epoch into runs
        return step, math.fsum(batch_losses)

    # ----- the epoch loop -------------------------------------------------------------
    def run_epochs(self, train: Dataset, valid: Dataset | None,
                   callbacks: Sequence[Callable], monitor: str, score_train: bool) -> None:
        """Train ``model.n_epochs`` epochs (fewer on early stop or a callback's stop),
        recording ``history_`` and ``best_epoch_`` on the model; leaves the model fitted
        however it ends (done, early stop, divergence, or Ctrl-C, which restores the best
        epoch so far and re-raises). ``monitor`` names the validation metric that picks
        the best epoch; ``score_train`` also re-scores the training set every epoch.

        Examples
        --------
        >>> import afmfast
        >>> from afmfast.demo import make_demo_data
        >>> train = make_demo_data(n_rows=1000, seed=0).train  # 800 rows
        >>> trainer = Trainer(afmfast.FM(n_factors=4, batch_size=256, n_threads=1), train)
        >>> trainer.model.set_params(n_epochs=2, verbose=0)
        FM(...)
        >>> trainer.run_epochs(train, None, [], "rmse", score_train=False)
        >>> [record["epoch"] for record in trainer.model.history_]
        [1, 2]
        """
        model = self.model
        model.history_ = []
        model.best_epoch_ = 0
        self._best = self._last_good = self._snapshot()
        try:
            self._epochs(train, valid, list(callbacks), monitor, score_train)
            if model.early_stopping or valid is None:
                _copy_params(self.params, self._best)
            else:
                model.best_epoch_ = len(model.history_)
        except KeyboardInterrupt as exc:
            if self._best is not None:  # None: interrupted while the best was copied
                _copy_params(self.params, self._best)
            # a note on the traceback rather than a printed line: the CLI reports the
            # interrupt in one line of its own
            if hasattr(exc, "add_note"):  # Python 3.11+
                exc.add_note(f"afmfast: fit was interrupted; the model keeps epoch "
                             f"{model.best_epoch_}.")
            raise
        finally:
            self._best = self._last_good = None
            model._publish()

    def _epochs(self, train, valid, callbacks, monitor, score_train):
        model = self.model
        n = train.n_rows
        X, y = train.X, train.y
        judge = EpochJudge(model, monitor, valid is not None)
        label = "" if monitor == "rmse" else f" {monitor}"
        if model.verbose and (score_train or valid is not None):
            t = time.perf_counter()
            parts = []
            if score_train:
                parts.append(f"train{label}={model._measure(train)[1][monitor]:.4f}")
            if valid is not None:
                parts.append(f"validation{label}={model._measure(valid)[1][monitor]:.4f}")
            model._log(f"Init: \t {', '.join(parts)} [{time.perf_counter() - t:.1f} s]")
        step = 0
        for epoch in range(1, model.n_epochs + 1):
            train.validate()  # a callback may have changed the arrays (Dataset.validate)
            if valid is not None:
                valid.validate("validation")
            t0 = time.perf_counter()
            order = self.epoch_segments(train, epoch, reuse=True)
            progress = _Progress(epoch, n) if model.verbose >= 2 else None
            step, loss_sum = self.train_epoch(X, y, order, step, epoch, progress)
            del order  # before the next epoch's is drawn: one order in memory, not two
            if progress is not None:
                progress.close()
            t1 = time.perf_counter()
            if not self.finite_parameters():
                raise self._diverged(epoch, "the parameters or the optimiser state are no "
                                           "longer finite")
            if not score_train and not np.all(np.isfinite(
                    model._predict_dataset(train[:model.batch_size]))):
                raise self._diverged(epoch, "the predictions are no longer finite")
            rows_by_threads = self.planner.take_rows_by_threads()
            threads = max(rows_by_threads, key=rows_by_threads.get)
            record = {"epoch": epoch, "train_loss": loss_sum / n}
            if score_train:
                scores, train_metrics = model._measure(train)
                if not np.all(np.isfinite(scores)):
                    raise self._diverged(epoch, "the predictions are no longer finite")
                record.update((f"train_{k}", v) for k, v in train_metrics.items())
            valid_metrics = (model._measure(valid)[1] if valid is not None
                             else dict.fromkeys(model._task_metrics))
            record.update((f"valid_{k}", v) for k, v in valid_metrics.items())
            record.update(seconds=t1 - t0, threads=threads)
            model.history_.append(record)
            improved, why = judge.judge(epoch, valid_metrics)
            self._keep_epoch(epoch, improved)
            line = (f"Epoch {epoch} [{t1 - t0:.1f} s, {threads} of {self.threads} "
                    f"threads]\ttrain loss={record['train_loss']:.4f}")
            if score_train:
                line += f", train{label}={record[f'train_{monitor}']:.4f}"
            if valid is not None:
                line += f", validation{label}={valid_metrics[monitor]:.4f}"
            model._log(f"{line} [{time.perf_counter() - t1:.1f} s]")
            if why:
                model._log(f"Early stop after epoch {epoch}: validation {monitor} {why}; "
                           f"restoring epoch {model.best_epoch_}.")
                break
            if any([bool(callback(model, record)) for callback in callbacks]):
                model._log(f"Stopped by a callback after epoch {epoch}.")
                break

    def finite_parameters(self) -> bool:
        """Whether every parameter and every optimiser-state entry in use is finite: a
        float64 sum of each array is NaN or infinite exactly when an entry is (float32
        entries cannot overflow it), and costs no temporary array. The state counts
        too: gradients beyond the float32 range (labels near it) turn an accumulator
        infinite while the parameters stay finite, and nothing learns after that.
        Finite parameters can still overflow a prediction, which is why the epoch loop
        also scores one batch of training rows.

        Examples
        --------
        >>> import afmfast
        >>> from afmfast.demo import make_demo_data
        >>> train = make_demo_data(n_rows=1000, seed=0).train  # 800 rows
        >>> trainer = Trainer(afmfast.FM(n_factors=4, batch_size=256, n_threads=1), train)
        >>> trainer.finite_parameters()
        True
        >>> trainer.state.V[0, 0, 0] = np.inf
        >>> trainer.finite_parameters()
        False
        """
        slots = 2 if self.model.optimizer == "adam" else 1  # Adam alone uses slot 1
        arrays = [*self.params, *(s[:slots] for s in self.state)]
        with np.errstate(over="ignore", invalid="ignore"):  # inf + -inf: NaN, no warning
            return all(math.isfinite(float(a.sum(dtype=np.float64))) for a in arrays)

    def _diverged(self, epoch, what):
        _copy_params(self.params, self._last_good)
        return TrainingDivergedError(
            f"training diverged in epoch {epoch}: {what}; the model keeps the parameters "
            f"of epoch {epoch - 1}. Try a lower learning_rate (now "
            f"{self.model.learning_rate}).")

    def _snapshot(self, into=None):
        """A copy of the parameters, written into ``into`` (an unneeded snapshot) if given."""
        if into is None:
            return type(self.params)(*(a.copy() for a in self.params))
        _copy_params(into, self.params)
        return into

    def _keep_epoch(self, epoch, improved):
        """Snapshot the parameters of a finished, finite epoch as the last good one (and
        as the best one, epoch ``epoch``, if improved). At most two copies live beside the
        parameters (the best and a later last good one), one while every epoch improves
        (always without validation); copies are reused, not allocated per epoch."""
        if improved:
            # the copy may overwrite the best snapshot: until it is done the live
            # parameters are the best (Ctrl-C keeps them)
            self._best, self.model.best_epoch_ = None, epoch
            self._best = self._last_good = self._snapshot(self._last_good)
        elif self._last_good is not self._best:
            self._last_good = self._snapshot(self._last_good)
        else:
            self._last_good = self._snapshot()


def _whole_batches(segments, batch_size):
    """The row arrays of ``segments`` regrouped so that every piece but the last holds a
    whole number of batches: a batch never ends early at a segment's end. A batch that
    spans two segments is a piece of its own (a segment's rows are not copied), and no
    piece outlives the consumer's request for the next one but one (``windowed_order``'s
    reuse).

    Examples
    --------
    >>> [p.tolist() for p in _whole_batches([np.arange(5), np.arange(5, 9)], 3)]
    [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    """
    carry = np.empty(0, np.int64)
    for rows in segments:
        if carry.size:
            head = batch_size - len(carry)
            if len(rows) < head:  # still short of a batch
                carry = np.concatenate([carry, rows])
                continue
            yield np.concatenate([carry, rows[:head]])
            rows = rows[head:]
        cut = len(rows) - len(rows) % batch_size
        if cut:
            yield rows[:cut]
        # a copy: the segment's buffer may be reused before the carry is spent
        carry = rows[cut:].copy()
    if carry.size:
        yield carry


class _Progress:
    """Within-epoch progress on stderr (verbose >= 2): rows done, rows/s and ETA. On a
    terminal one line redrawn in place at most four times a second; otherwise (a log
    file, a pipe) a plain line at most every ``PLAIN_INTERVAL`` seconds, without the
    carriage returns and escape codes that would litter the log."""

    PLAIN_INTERVAL = 5.0

    def __init__(self, epoch, n_rows, stream=None):
        self.epoch, self.n_rows = epoch, n_rows
        self.stream = sys.stderr if stream is None else stream
        try:
            self.tty = bool(self.stream.isatty())
        except (AttributeError, ValueError, OSError):  # no isatty, or closed
            self.tty = False
        self.interval = 0.25 if self.tty else self.PLAIN_INTERVAL
        self.t0 = self.last = time.perf_counter()
        self.drawn = False

    def update(self, done):
        now = time.perf_counter()
        if now - self.last < self.interval:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.n_rows - done) / rate
        text = (f"Epoch {self.epoch}: {done}/{self.n_rows} rows, {rate:,.0f} rows/s, "
                f"ETA {eta:.1f} s")
        if self.tty:
            print(f"\r{text}", end="", file=self.stream, flush=True)
        else:
            print(text, file=self.stream, flush=True)
        self.drawn = True

    def close(self):
        if self.drawn and self.tty:  # clear the line for the epoch's summary
            print("\r\033[K", end="", file=self.stream, flush=True)


def label_sum(data: Dataset) -> float:
    """The sum of a data set's labels in float64 (``_initial_bias``'s input; a sum so
    that the parts of a data set add up, as Dask workers' shards do).

    Examples
    --------
    >>> import afmfast
    >>> label_sum(afmfast.Dataset([0, 1, 2], [0, 1], None, [1.5, 2.0]))
    3.5
    """
    return float(np.sum(data.y, dtype=np.float64))


class EpochJudge:
    """The decisions taken after each epoch from its validation metrics: the epoch
    improved (and becomes the best one) when its ``monitor`` metric beats the best so
    far (always, without validation; never, for a NaN metric), and with the model's
    ``early_stopping`` training stops by ``early_stop_reason``. ``Trainer`` keeps one a
    fit; every worker of a Dask fit too (``afmfast.dask.scoring.SummedEpochJudge``).

    Examples
    --------
    >>> import afmfast
    >>> judge = EpochJudge(afmfast.FM(patience=1), "rmse", validated=True)
    >>> judge.judge(1, {"rmse": 2.0}), judge.judge(2, {"rmse": 1.0})
    ((True, None), (True, None))
    >>> judge.judge(3, {"rmse": 3.0}), judge.best_epoch
    ((False, 'did not improve for 1 epochs'), 2)
    """

    def __init__(self, model, monitor: str, validated: bool):
        self.model, self.monitor, self.validated = model, monitor, validated
        self.early_stopping = bool(model.early_stopping) and validated
        self.sign = 1.0 if monitor in HIGHER_IS_BETTER else -1.0
        self.goodness: list[float] = []  # sign * metric of each epoch judged
        self.best, self.best_epoch = -math.inf, 0

    def judge(self, epoch: int, metrics: dict) -> tuple[bool, str | None]:
        """(whether ``epoch`` improved, why training stops after it or None) from its
        validation ``metrics`` (ignored without validation).

        Examples
        --------
        >>> import afmfast
        >>> judge = EpochJudge(afmfast.FMClassifier(), "auc", validated=True)
        >>> judge.judge(1, {"auc": 0.7}), judge.judge(2, {"auc": float("nan")})
        ((True, None), (False, None))
        """
        improved = True
        if self.validated:
            goodness = self.sign * metrics[self.monitor]
            improved = goodness > self.best
            self.goodness.append(goodness)
            if improved:
                self.best = goodness
        if improved:
            self.best_epoch = epoch
        stop = (early_stop_reason(self.goodness, self.best_epoch, self.model.patience)
                if self.early_stopping else None)
        return improved, stop


def early_stop_reason(goodness: list[float], best_epoch: int,
                      patience: int | None) -> str | None:
    """Why training stops after the last of the epochs whose validation metric is
    ``goodness`` (higher is better; ``best_epoch``, 1-based, the best so far), or None
    to go on: with ``patience``, no improvement for that many epochs; without, the
    reference's rule: after more than 5 epochs, worse in each of the last 4.

    Examples
    --------
    >>> early_stop_reason([1, 2, 1.5, 1.4], 2, patience=2)
    'did not improve for 2 epochs'
    >>> early_stop_reason([1, 2, 1.5, 1.4], 2, None) is None  # 4 epochs only
    True
    >>> early_stop_reason([1, 5, 4, 3, 2, 1], 2, None)
    'got worse 4 epochs in a row'
    """
    v = goodness
    if patience is not None:
        return (f"did not improve for {patience} epochs"
                if len(v) - best_epoch >= patience else None)
    if len(v) > 5 and all(v[-i] < v[-i - 1] for i in range(1, 5)):
        return "got worse 4 epochs in a row"
    return None
