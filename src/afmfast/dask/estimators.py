"""Estimators that train FM and AFM on a Dask cluster: ``DaskFM``, ``DaskAFM``,
``DaskFMClassifier`` and ``DaskAFMClassifier``.

The driver (this module, in the client's process) places one ``ShardWorker`` actor on
every worker, hands each its shards (paths; the workers open the stores themselves),
and runs the epochs as rounds: every worker trains ``sync_every`` batches (the last
round of an epoch what is left), then the workers average their parameters among
themselves (``afmfast.dask.averaging``). After each epoch the workers score their
validation shards and judge the epoch among themselves (``afmfast.dask.scoring``: the
sums travel with the next epoch's first payload), so early stopping and the best-epoch
restore work as in a single process with no driver round trip between two epochs. The
driver asks for about ``CALL_SECONDS`` of epochs in one call per worker (one epoch at a
time when there are callbacks, which see each epoch before the next starts) and logs
the epochs from their records. The fitted local estimator (``to_local()``) is an
ordinary ``afmfast.FM`` / ``AFM`` / classifier.

The driver never blocks on a lost worker: it waits in short slices and asks the
scheduler, between them, whether every worker of the fit is still there. A lost worker
stops the fit with ``WorkerLostError``, and the model keeps the parameters of the last
synchronisation (taken from a surviving worker).
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
import time
from typing import TYPE_CHECKING

import numpy as np

from afmfast.data.hashed_frames import hash_frame
from afmfast.data.hashing import DEFAULT_HASH_BITS
from afmfast.dask.scoring import score_sums, summed_metrics
from afmfast.dask.worker import MEMORY, Aborted, ShardWorker, summed_counts
from afmfast.data.store import open_store
from afmfast.kernels import backends
from afmfast.models.afm import AFM, AFMClassifier
from afmfast.models.base import FactorizationModel, _as_model, _check_int
from afmfast.models.fm import FM, FMClassifier
from afmfast.models.training import TrainingDivergedError

if TYPE_CHECKING:  # annotations only
    from collections.abc import Callable, Sequence

LOG = logging.getLogger("afmfast.dask")

#: batches each worker trains between two synchronisations, unless told
DEFAULT_SYNC_EVERY = 4
#: how the workers' tables combine at a synchronisation (``afmfast.dask.averaging.merge``)
MERGE_RULES = ("sum", "mean")
#: seconds between the driver's checks that every worker of the fit is alive
POLL_SECONDS = 0.5
#: seconds the driver waits for a surviving worker's parameters after a loss
RECOVER_SECONDS = 60.0
#: seconds of epochs the driver asks for in one call (the log's cadence, and how often
#: the driver's round trip is paid)
CALL_SECONDS = 1.0


class WorkerLostError(RuntimeError):
    """A worker of a Dask fit died; the model keeps the parameters of the last
    synchronisation (``syncs_done`` of them in all), so ``to_local()`` works and a new
    fit can start from it (``init_from=model.to_local()``).

    Examples
    --------
    >>> err = WorkerLostError("worker tcp://127.0.0.1:1 was lost", syncs_done=3)
    >>> err.syncs_done
    3
    """

    def __init__(self, message, syncs_done=0):
        super().__init__(message)
        self.syncs_done = syncs_done


def rounds_per_epoch(batches: int, sync_every: int) -> int:
    """Synchronisations in an epoch whose busiest worker has ``batches`` batches: one
    after every ``sync_every`` batches and one at the end of the epoch, at least one.

    Examples
    --------
    >>> rounds_per_epoch(391, 64), rounds_per_epoch(384, 64), rounds_per_epoch(0, 64)
    (7, 6, 1)
    """
    return max(1, -(-batches // sync_every))


def _paths(X, name):
    """``X`` as a list of store paths (a single path is a list of one)."""
    if isinstance(X, (str, os.PathLike)):
        return [os.fspath(X)]
    if isinstance(X, (list, tuple)) and X and all(isinstance(p, (str, os.PathLike))
                                                  for p in X):
        return [os.fspath(p) for p in X]
    raise TypeError(f"{name} must be a store path or a non-empty list of store paths "
                    f"(afmfast.write_store / afmfast.convert write them), got "
                    f"{type(X).__name__}")


def assign_shards(paths, n_workers):
    """Each worker's shards: whole stores in turn when there are at least as many
    stores as workers, else every store cut into ``n_workers`` row ranges.

    Examples
    --------
    >>> assign_shards(["a", "b", "c"], 2)
    [[('a', 0, 1), ('c', 0, 1)], [('b', 0, 1)]]
    >>> assign_shards(["a"], 2)
    [[('a', 0, 2)], [('a', 1, 2)]]
    """
    if len(paths) >= n_workers:
        return [[(p, 0, 1) for p in paths[i::n_workers]] for i in range(n_workers)]
    return [[(p, i, n_workers) for p in paths] for i in range(n_workers)]


def _is_dask_frame(X):
    """Whether X is a dask.dataframe DataFrame (without importing dask.dataframe)."""
    return any(c.__module__.startswith("dask.dataframe") and c.__name__ == "DataFrame"
               for c in type(X).__mro__)


async def _result(future):
    return await future


class _Fit:
    """One fit's actors and the driver's waits on them."""

    def __init__(self, client):
        self.client = client
        nthreads = client.nthreads()  # every worker (scheduler_info may list a few)
        if not nthreads:
            raise RuntimeError("the Dask cluster has no workers")
        self.addresses = sorted(nthreads)
        self.nthreads = [int(nthreads[a]) for a in self.addresses]
        futures = [client.submit(ShardWorker, actor=True, workers=[a], pure=False,
                                 allow_other_workers=False) for a in self.addresses]
        self.futures = futures
        self.actors = client.gather(futures)
        self.syncs_done = 0
        self.held = []  # futures of hash-encoded partitions

    def lost(self, alive):
        return [a for a in self.addresses if a not in alive]

    def wait(self, calls):
        """The results of actor method calls (ActorFutures), in order; raises
        ``WorkerLostError`` as soon as a worker of the fit is gone."""
        client = self.client

        async def run():
            tasks = [asyncio.ensure_future(_result(f)) for f in calls]
            try:
                while True:
                    done, pending = await asyncio.wait(
                        tasks, timeout=POLL_SECONDS, return_when=asyncio.FIRST_EXCEPTION)
                    for task in done:
                        exc = task.exception()
                        if isinstance(exc, OSError):
                            identity = await client.scheduler.identity()
                            raise self._lost_error(exc, identity["workers"])
                        if exc is not None:
                            raise exc
                    if not pending:
                        return [t.result() for t in tasks]
                    identity = await client.scheduler.identity()
                    if self.lost(identity["workers"]):
                        raise self._lost_error(None, identity["workers"])
            finally:
                for task in tasks:
                    if not task.done():
                        task.cancel()

        return client.sync(run)

    def _lost_error(self, exc, alive):
        lost = self.lost(alive) or ["(unknown)"]
        why = f" ({exc})" if exc is not None else ""
        return WorkerLostError(
            f"worker {', '.join(lost)} was lost during the fit{why}; the model keeps the "
            f"parameters of the last synchronisation. Fit again with "
            f"init_from=model.to_local() to go on.", self.syncs_done)

    def survivor_params(self):
        """What the first surviving worker keeps (``ShardWorker.synced_params``: the
        last synchronised parameters, the rounds they include, the best epoch's
        parameters or None, its number), None if none answers, after telling every
        worker to stop."""
        client = self.client

        async def run():
            identity = await client.scheduler.identity()
            alive = [i for i, a in enumerate(self.addresses) if a in identity["workers"]]
            for i in alive:
                self.actors[i].abort()
            for i in alive:
                try:
                    return await asyncio.wait_for(_result(self.actors[i].synced_params()),
                                                  RECOVER_SECONDS)
                except Exception:  # noqa: BLE001 - try the next survivor
                    continue
            return None

        return client.sync(run)

    def encode(self, frame, hashing, name):
        """Hash-encode the partitions of the Dask DataFrame ``frame`` on the workers,
        partition p on worker p mod n; each worker's shards: (MEMORY, key) of the
        Datasets it holds."""
        if not _is_dask_frame(frame):
            raise TypeError(f"{name} must be a Dask DataFrame like X, got "
                            f"{type(frame).__name__}")
        if hashing["label"] not in frame.columns:
            raise ValueError(f"{name}: no label column {hashing['label']!r}")
        import dask

        n = len(self.addresses)
        shards = [[] for _ in range(n)]
        for p, part in enumerate(frame.to_delayed()):
            encoded = dask.delayed(_encode_frame)(part, hashing)
            future = self.client.compute(encoded, workers=[self.addresses[p % n]],
                                         allow_other_workers=False)
            self.held.append(future)
            shards[p % n].append((MEMORY, future.key))
        self.wait_futures(self.held)
        return shards

    def wait_futures(self, futures):
        from distributed import wait

        wait(futures)
        for future in futures:
            if future.status == "error":
                future.result()  # raises the task's error

    def close(self):
        """Release every surviving actor's hold on the allocator settings (best effort:
        a lost worker's process is gone, with its settings), then the actors."""
        client = self.client

        async def release():
            identity = await client.scheduler.identity()
            for address, actor in zip(self.addresses, self.actors or ()):
                if address in identity["workers"]:
                    try:
                        await asyncio.wait_for(_result(actor.release()), RECOVER_SECONDS)
                    except Exception:  # noqa: BLE001 - the fit's outcome stands
                        continue

        try:
            client.sync(release)
        except Exception:  # noqa: BLE001 - a closing cluster: the fit's outcome stands
            pass
        finally:
            client.cancel(self.futures + self.held)
            self.actors = self.futures = self.held = None


def _signature(local_class):
    """The Dask estimator's constructor signature: the local estimator's parameters
    (keyword-only) plus ``client`` and ``sync_every``."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for p in list(inspect.signature(local_class.__init__).parameters.values())[1:]:
        params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))
    params += [inspect.Parameter("client", inspect.Parameter.KEYWORD_ONLY, default=None),
               inspect.Parameter("sync_every", inspect.Parameter.KEYWORD_ONLY,
                                 default=DEFAULT_SYNC_EVERY),
               inspect.Parameter("merge", inspect.Parameter.KEYWORD_ONLY, default="sum")]
    return inspect.Signature(params)


class DaskModel:
    """What the four Dask estimators share; not used directly. Subclasses set
    ``_local_class``; their constructors take that class's parameters plus ``client``
    (a ``distributed.Client``; None: the current one), ``sync_every`` (batches each
    worker trains between two synchronisations) and ``merge``: "sum" (the trained
    parameters and Adagrad's accumulators become the synchronised value plus the sum of
    the workers' changes, as if one process had trained all their batches; running
    statistics and moments are averaged) or "mean" (every table is the workers' mean).

    Examples
    --------
    >>> from afmfast.dask import DaskFM
    >>> model = DaskFM(n_factors=8, sync_every=4)
    >>> model.get_params()["n_factors"], model.get_params()["sync_every"]
    (8, 4)
    """

    _local_class = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls._local_class is not None:
            init = cls.__init__

            def __init__(self, **params):
                init(self, **params)

            __init__.__signature__ = _signature(cls._local_class)
            __init__.__doc__ = init.__doc__
            cls.__init__ = __init__

    def __init__(self, **params):
        names = self._get_param_names()
        defaults = {n: p.default for n, p in
                    inspect.signature(type(self).__init__).parameters.items() if n != "self"}
        unknown = sorted(set(params) - set(names))
        if unknown:
            raise TypeError(f"{type(self).__name__}() got unexpected keyword arguments "
                            f"{unknown}; valid: {', '.join(names)}")
        for name in names:
            setattr(self, name, params.get(name, defaults[name]))

    # the scikit-learn parameter protocol of the local estimators
    _get_param_names = classmethod(FactorizationModel._get_param_names.__func__)
    get_params = FactorizationModel.get_params
    set_params = FactorizationModel.set_params

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items()
                         if k != "client")
        return f"{type(self).__name__}({args})"

    def _local_params(self):
        return {k: v for k, v in self.get_params().items()
                if k not in ("client", "sync_every", "merge")}

    def _client(self):
        if self.client is not None:
            return self.client
        from distributed import default_client

        return default_client()

    # ----- training ----------------------------------------------------------------------
    def fit(self, X, y=None, *, validation=None, init_from=None,
            callbacks: Sequence[Callable] | None = None, metric: str | None = None,
            categorical: Sequence[str] | None = None,
            hash_bits: int | None = None) -> DaskModel:
        """Train on the cluster; from scratch unless ``init_from`` is given.

        Parameters
        ----------
        X : store path, list of store paths, or dask.dataframe.DataFrame
            Binary stores (``afmfast.write_store``, ``afmfast.convert``) that every
            worker can read at the same path. With at least as many stores as workers
            each worker trains whole stores; otherwise every store is cut into one
            row range per worker. A Dask DataFrame's partitions are hash-encoded on
            the workers (``afmfast.data.hashed_frames.hash_frame``: the ids that
            ``afmfast.convert(..., format="csv")`` gives the same table, with no
            global vocabulary), partition p on worker p mod n_workers.
        y : None, or the label column's name for a DataFrame
            The stores' labels are their own.
        validation : like X, optional
            Scored on the workers after every epoch (sums added up by every worker);
            drives early stopping and the best-epoch restore as in a single process.
        init_from : fitted local model, DaskModel, or path of a saved model, optional
            Warm start, as the local estimator's ``init_from``.
        callbacks : list of callables, optional
            Called as ``callback(model, record)`` after every epoch; a truthy return
            stops training.
        metric : str, optional
            "rmse" for regressors; "logloss" (default) or "accuracy" for classifiers.
        categorical : list of str, optional
            DataFrame only: float columns to hash as categories (other float columns
            are numeric features: one id a column, the number as its value).
        hash_bits : int, optional
            DataFrame only: hash into 2^hash_bits ids (default
            ``afmfast.data.hashing.DEFAULT_HASH_BITS``).

        Returns
        -------
        self

        Examples
        --------
        >>> import os, tempfile, afmfast
        >>> from distributed import Client, LocalCluster
        >>> from afmfast.dask import DaskFM
        >>> from afmfast.demo import make_demo_data
        >>> data = make_demo_data(n_rows=2000, seed=0)
        >>> folder = tempfile.mkdtemp()
        >>> afmfast.write_store(data.train, os.path.join(folder, "train.store"))
        >>> afmfast.write_store(data.valid, os.path.join(folder, "valid.store"))
        >>> with LocalCluster(n_workers=2, threads_per_worker=1, processes=False) as cluster, \\
        ...         Client(cluster) as client:
        ...     model = DaskFM(n_factors=4, n_epochs=2, verbose=0, sync_every=2)
        ...     model = model.fit(os.path.join(folder, "train.store"),
        ...                       validation=os.path.join(folder, "valid.store"))
        >>> len(model.history_), type(model.to_local()).__name__
        (2, 'FM')
        """
        frame = _is_dask_frame(X)
        if frame and not isinstance(y, str):
            raise ValueError("y: with a Dask DataFrame X, pass the label column's name")
        if not frame and y is not None:
            raise ValueError("y: a Dask fit reads the labels from the stores (their y "
                             "column); pass y=None")
        if not frame and (categorical is not None or hash_bits is not None):
            raise ValueError("categorical and hash_bits apply to a Dask DataFrame X only")
        _check_int("sync_every", self.sync_every, 1)
        if self.merge not in MERGE_RULES:
            raise ValueError(f"merge must be one of {MERGE_RULES}, got {self.merge!r}")
        local = self._local_class(**self._local_params())
        local._validate()
        monitor = local._task_metrics[0] if metric is None else metric
        allowed = ("rmse",) if not local._is_classifier else ("logloss", "auc", "accuracy")
        if monitor not in allowed:
            raise ValueError(f"metric must be one of {allowed} on Dask (validation is "
                             f"summed over the workers), got {metric!r}")
        if not frame:
            train_paths = _paths(X, "X")
            valid_paths = [] if validation is None else _paths(validation, "validation")
        if init_from is not None:
            init_from = init_from.to_local() if isinstance(init_from, DaskModel) \
                else _as_model(init_from)
        fit = _Fit(self._client())
        self.sync_log_ = []
        try:
            if frame:
                hashing = {"label": y,
                           "hash_bits": DEFAULT_HASH_BITS if hash_bits is None else hash_bits,
                           "kinds": {c: "categorical" for c in categorical or ()},
                           "columns": [c for c in X.columns if c != y]}
                shards = fit.encode(X, hashing, "X")
                valid_shards = (fit.encode(validation, hashing, "validation")
                                if validation is not None else [[]] * len(fit.actors))
            else:
                hashing = None
                shards = assign_shards(train_paths, len(fit.actors))
                valid_shards = (assign_shards(valid_paths, len(fit.actors)) if valid_paths
                                else [[]] * len(fit.actors))
            self._run(fit, local, shards, valid_shards, init_from, list(callbacks or ()),
                      monitor)
            self.hashing_ = hashing
        except BaseException as exc:
            # every worker stops waiting for its peers (a worker thread left waiting
            # would block the next fit's actors on that worker)
            kept = fit.survivor_params()
            keep = isinstance(exc, (WorkerLostError, TrainingDivergedError, Aborted,
                                    KeyboardInterrupt))
            if keep and kept is not None:
                params, rounds, best, best_epoch = kept
                # an interrupted or diverging fit keeps its best epoch, as a single
                # process does; a lost worker's, the last synchronisation (the issue's
                # rule: what the survivors can go on from)
                if best is not None and isinstance(exc, (KeyboardInterrupt,
                                                         TrainingDivergedError)):
                    local.best_epoch_ = best_epoch
                    self._finish(local, best)
                    what = f"its best epoch ({best_epoch})"
                else:
                    self._finish(local, params)
                    what = f"the last synchronisation ({rounds} done)"
                if isinstance(exc, WorkerLostError):
                    exc.syncs_done = rounds
                if hasattr(exc, "add_note"):
                    exc.add_note(f"afmfast.dask: the model keeps the parameters of {what}.")
            raise
        finally:
            fit.close()
        return self

    def _run(self, fit, local, shards, valid_shards, init_from, callbacks, monitor):
        n = len(fit.actors)
        cls, params = self._local_class, self._local_params()
        infos = fit.wait([a.open(cls, params, shards[i], valid_shards[i], i, n,
                                 local._is_classifier) for i, a in enumerate(fit.actors)])
        n_features = max(info["n_features"] for info in infos)
        if sum(info["n_rows"] for info in infos) == 0:
            raise ValueError("X: cannot fit on an empty data set")
        classes = None
        if local._is_classifier:
            labels = sorted(set().union(*(info["labels"] for info in infos)))
            if len(labels) != 2:
                raise ValueError(f"X: a classifier needs exactly two distinct labels in the "
                                 f"stores, found {labels[:5]}")
            classes = labels
            local.classes_ = np.array(labels)
        bounds = None
        if not local._is_classifier:  # evaluate's default clip, as a local fit records
            local.y_range_ = bounds = _union([info["train_range"] for info in infos])
        threads = ([int(local.n_threads)] * n if local.n_threads is not None
                   else fit.nthreads)
        rows = sum(info["n_rows"] for info in infos)
        if classes is not None:
            bias = local._initial_bias(
                float(sum(info["label_counts"].get(classes[1], 0) for info in infos)), rows)
        else:
            bias = local._initial_bias(sum(info["label_sum"] for info in infos), rows)
        row_lengths = summed_counts([info["row_lengths"] for info in infos])
        valid = any(valid_shards)
        batches = fit.wait([a.start(n_features, threads[i], fit.actors, init_from, classes,
                                    self.merge, bias, row_lengths, monitor, valid)
                            for i, a in enumerate(fit.actors)])
        syncs = rounds_per_epoch(max(batches), self.sync_every)
        local.n_features_in_ = n_features
        self.n_workers_ = n
        self.workers_ = [info["address"] for info in infos]
        history, best_epoch, stopped = [], 0, False
        next_round, epoch, per_call = 1, 1, 1
        last_result = None
        while epoch <= local.n_epochs and not stopped:
            # callbacks see every epoch before the next one starts; otherwise a call
            # runs about CALL_SECONDS of epochs (the first call one, to time it)
            count = 1 if callbacks else min(per_call, local.n_epochs - epoch + 1)
            t0 = time.perf_counter()
            results = fit.wait([a.run_epochs(epoch, count, syncs, self.sync_every,
                                             next_round, bounds) for a in fit.actors])
            now = time.perf_counter()
            # an epoch's seconds run from the previous epoch's end, scoring excluded
            # (each worker timed both); the driver's part of a call (from the previous
            # call's result: the driver's own work counts, as it does in a pass over the
            # data) goes to the call's first epoch
            call = now - (t0 if last_result is None else last_result)
            last_result = now
            worked = max(sum(e.get("seconds", 0.0) + e.get("score_seconds", 0.0)
                             for e in r["epochs"]) for r in results)
            next_round = results[0]["next_round"]
            fit.syncs_done = next_round - 1
            for i, entries in enumerate(zip(*(r["epochs"] for r in results))):
                self._log_rounds(entries)
                if entries[0].get("unfinished"):
                    break
                verdict = entries[0]["verdict"]
                epoch = entries[0]["epoch"]
                if verdict["diverged"]:
                    raise TrainingDivergedError(
                        f"training diverged in epoch {epoch}: the parameters or the "
                        f"validation scores are no longer finite. Try a lower "
                        f"learning_rate (now {local.learning_rate}).")
                seconds = max(e["seconds"] for e in entries)
                if i == 0:
                    seconds += max(0.0, call - worked)
                record = self._epoch_record(epoch, entries, verdict, seconds, rows)
                history.append(record)
                self.history_ = history
                best_epoch = verdict["best_epoch"]
                line = f"Epoch {epoch} [{seconds:.1f} s, {record['syncs']} syncs]\ttrain " \
                       f"loss={record['train_loss']:.4f}"
                if valid:
                    line += f", validation {monitor}={verdict['metrics'][monitor]:.4f}"
                local._log(line)
                if verdict["stop"]:
                    # the workers stopped in the next epoch's first round: that
                    # unfinished epoch's rounds are logged, and no callback runs
                    local._log(f"Early stop after epoch {epoch}: validation {monitor} "
                               f"{verdict['stop']}; restoring epoch {best_epoch}.")
                    stopped = True
                    continue
                if any([bool(callback(self, record)) for callback in callbacks]):
                    stopped = True
                    break
            epoch = history[-1]["epoch"] + 1 if history else epoch
            per_call = max(1, int(CALL_SECONDS * len(history)
                                  / max(sum(h["seconds"] for h in history), 1e-9)))
        restore = local.early_stopping and valid
        which = "best" if restore and best_epoch else "live"
        final = fit.wait([fit.actors[0].params(which)])[0]
        local.history_ = history
        local.best_epoch_ = best_epoch if restore else len(history)
        self._finish(local, final)

    def _log_rounds(self, entries):
        """Add an epoch's rounds (``entries``: the epoch's entry from each worker) to
        ``sync_log_``."""
        for records in zip(*(e["records"] for e in entries)):
            round_log = {"epoch": entries[0]["epoch"], "round": len(self.sync_log_) + 1,
                         "batches": sum(r["batches"] for r in records),
                         "bytes": sum(r["bytes"] for r in records),
                         "wait_seconds": sum(r["wait_seconds"] for r in records),
                         "train_seconds": max(r["train_seconds"] for r in records),
                         "train_cpu_seconds": max(r["train_cpu_seconds"] for r in records),
                         "merge_seconds": max(r["merge_seconds"] for r in records),
                         "seconds": max(r["seconds"] for r in records)}
            self.sync_log_.append(round_log)
            LOG.debug("sync %d (epoch %d): %d bytes sent, %.4f s waiting",
                      round_log["round"], round_log["epoch"], round_log["bytes"],
                      round_log["wait_seconds"])

    @staticmethod
    def _epoch_record(epoch, entries, verdict, seconds, rows):
        """The history record of a finished epoch from each worker's entry."""
        rounds = list(zip(*(e["records"] for e in entries)))
        record = {"epoch": epoch,
                  "train_loss": sum(r["loss_sum"] for rs in rounds for r in rs) / max(rows, 1)}
        record.update((f"valid_{k}", v) for k, v in verdict["metrics"].items())
        record.update(seconds=seconds, syncs=len(rounds),
                      sync_bytes=sum(r["bytes"] for rs in rounds for r in rs),
                      sync_wait_seconds=sum(r["wait_seconds"] for rs in rounds for r in rs))
        return record

    def _finish(self, local, arrays):
        """Make ``local`` the fitted model with the parameter arrays ``arrays``."""
        local._set_arrays(arrays)
        local.n_features_in_ = local._params.V.shape[0]
        local.history_ = getattr(local, "history_", getattr(self, "history_", []))
        local.best_epoch_ = getattr(local, "best_epoch_", 0)
        local.backend_ = backends.backend_name(local._kernel_backend())
        local.n_threads_ = local._threads = local._kernel_threads()
        self.model_ = local
        self.history_ = local.history_
        self.best_epoch_ = local.best_epoch_
        self.n_features_in_ = local.n_features_in_

    def _hashing(self):
        hashing = getattr(self, "hashing_", None)
        if hashing is None:
            raise ValueError(f"this {type(self).__name__} was fitted on stores: predict and "
                             "evaluate take store paths (or local data), not a DataFrame")
        return hashing

    # ----- results -----------------------------------------------------------------------
    def to_local(self):
        """The fitted local estimator (``afmfast.FM``, ``AFM``, ``FMClassifier`` or
        ``AFMClassifier``): save, load, predict, explain and field_attention work on it.

        Examples
        --------
        >>> from afmfast.dask import DaskFM
        >>> try:
        ...     DaskFM().to_local()
        ... except Exception as exc:
        ...     print(type(exc).__name__)
        NotFittedError
        """
        model = getattr(self, "model_", None)
        if model is None:
            from afmfast.models.base import NotFittedError

            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call fit() "
                                 "first")
        return model

    def predict(self, X):
        """Predictions for a store path or a list of them, as a lazy ``dask.array``
        (one chunk per store, computed on the workers); for a Dask DataFrame (of a
        model fitted on one), a lazy Series mapped over its partitions, each
        hash-encoded where it lives; any other X (a Dataset, matrix, array) is
        predicted here by ``to_local()``.

        Examples
        --------
        >>> from afmfast.dask import DaskFM
        >>> DaskFM.predict.__name__
        'predict'
        """
        model = self.to_local()
        if _is_dask_frame(X):
            hashing = self._hashing()
            dtype = model.classes_.dtype if model._is_classifier else np.float32
            return X.map_partitions(_predict_frame, model, hashing,
                                    meta=("prediction", dtype))
        try:
            paths = _paths(X, "X")
        except TypeError:
            return model.predict(X)
        import dask
        import dask.array as da

        counts = dask.compute(*[dask.delayed(_store_rows)(p) for p in paths])
        shared = dask.delayed(model, pure=True)
        dtype = model.classes_.dtype if model._is_classifier else np.float32
        return da.concatenate([
            da.from_delayed(dask.delayed(_predict_store)(shared, p), shape=(n,), dtype=dtype)
            for p, n in zip(paths, counts)])

    def evaluate(self, X, *, clip="train") -> dict:
        """The metrics of the fitted model on a store path or list of them, or on a Dask
        DataFrame holding the label column (a model fitted on one), summed on the
        workers ("rmse"; classifiers "logloss", "auc" and "accuracy"); any other X is
        evaluated here by ``to_local()``. ``clip`` as for the local ``evaluate``: the
        training labels' range by default.

        Examples
        --------
        >>> from afmfast.dask import DaskFM
        >>> DaskFM.evaluate.__name__
        'evaluate'
        """
        model = self.to_local()
        bounds = model._clip_bounds(clip)
        if bounds is False:
            bounds = (-math.inf, math.inf)
        import dask

        if _is_dask_frame(X):
            hashing = self._hashing()
            parts = [dask.delayed(_encode_frame)(p, hashing, model)
                     for p in X.to_delayed()]
            if bounds is None:  # the labels' own range (a model saved without y_range)
                bounds = _union(dask.compute(*[dask.delayed(_label_range)(p)
                                               for p in parts]))
            sums = dask.compute(*[dask.delayed(score_sums)(model, [p], bounds)
                                  for p in parts])
            return summed_metrics(model, sums)
        try:
            paths = _paths(X, "X")
        except TypeError:
            return model.evaluate(X, clip=clip)

        if bounds is None:
            bounds = _union(dask.compute(*[dask.delayed(_label_range)(p) for p in paths]))
        shared = dask.delayed(model, pure=True)
        sums = dask.compute(*[dask.delayed(_score_store)(shared, p, bounds) for p in paths])
        return summed_metrics(model, sums)


def _store_rows(path):
    return open_store(path).n_rows


def _union(ranges):
    """The smallest (low, high) holding every range of ``ranges`` (None entries skipped),
    or None."""
    ranges = [r for r in ranges if r is not None]
    return (min(r[0] for r in ranges), max(r[1] for r in ranges)) if ranges else None


def _label_range(source):
    y = (open_store(source) if isinstance(source, str) else source).y
    return (float(y.min()), float(y.max())) if len(y) else None


def _encode_frame(frame, hashing, model=None):
    """A partition hash-encoded as the fit encoded its rows (the label column, when
    present, as labels; a classifier's as 0/1 targets)."""
    label = hashing["label"] if hashing["label"] in frame.columns else None
    data = hash_frame(frame, label, hash_bits=hashing["hash_bits"],
                      columns=hashing["columns"], kinds=hashing["kinds"])
    return data if model is None or label is None else _classes_labels(model, data)


def _predict_frame(frame, model, hashing):
    import pandas as pd

    return pd.Series(model.predict(_encode_frame(frame, hashing)), index=frame.index,
                     name="prediction")


def _classes_labels(model, data):
    if model._is_classifier:
        return data.with_labels(data.y == model.classes_[1])
    return data


def _score_store(model, path, bounds):
    return score_sums(model, [_classes_labels(model, open_store(path))], bounds)


def _predict_store(model, path):
    return model.predict(open_store(path))


class DaskFM(DaskModel):
    """``afmfast.FM`` trained data-parallel on a Dask cluster (see ``DaskModel.fit``).

    Examples
    --------
    >>> from afmfast.dask import DaskFM
    >>> DaskFM(n_factors=8, sync_every=4)
    DaskFM(n_factors=8, ...sync_every=4, merge='sum')
    """

    _local_class = FM


class DaskAFM(DaskModel):
    """``afmfast.AFM`` trained data-parallel on a Dask cluster (see ``DaskModel.fit``).

    Examples
    --------
    >>> from afmfast.dask import DaskAFM
    >>> DaskAFM(attention_size=8).attention_size
    8
    """

    _local_class = AFM


class DaskFMClassifier(DaskModel):
    """``afmfast.FMClassifier`` trained data-parallel on a Dask cluster; the stores'
    labels must take exactly two values.

    Examples
    --------
    >>> from afmfast.dask import DaskFMClassifier
    >>> DaskFMClassifier().n_factors
    16
    """

    _local_class = FMClassifier


class DaskAFMClassifier(DaskModel):
    """``afmfast.AFMClassifier`` trained data-parallel on a Dask cluster; the stores'
    labels must take exactly two values.

    Examples
    --------
    >>> from afmfast.dask import DaskAFMClassifier
    >>> DaskAFMClassifier().n_factors
    16
    """

    _local_class = AFMClassifier
