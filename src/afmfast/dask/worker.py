"""The per-worker side of data-parallel training: a Dask actor that holds one
``Trainer`` on the worker's shards.

A ``ShardWorker`` lives on one Dask worker for the length of a fit. It opens its shards
itself (binary stores, memory-mapped: the rows never pass through the client), trains
``sync_every`` batches at a time through the native kernels, and at every
synchronisation fetches the other workers' payloads straight from them (an actor calling
actors: Dask's worker-to-worker communication, no sockets of afmfast's own) and merges
them (``afmfast.dask.averaging``), so that every worker leaves the synchronisation with
the same parameters. It also scores its validation shards and keeps the snapshots that
the driver asks for (the last synchronised parameters, the best epoch's).

A shard is ``(path, part, parts)``: rows ``[n * part // parts, n * (part + 1) // parts)``
of the store at ``path`` (of n rows), so that one store can feed several workers without
the client reading it.
"""
from __future__ import annotations

import asyncio
import inspect
import os
import threading
import time

import numpy as np

from afmfast.dask import averaging, memory
from afmfast.dask.scoring import SummedEpochJudge, score_sums
from afmfast.data.dataset import Dataset
from afmfast.data.store import open_store
from afmfast.models.training import (Trainer, TrainingDivergedError, _whole_batches,
                                     label_sum)

#: the first item of a shard held in a worker's memory: (MEMORY, key of a Dask future)
MEMORY = "<memory>"
#: seconds between two checks for an abort while a worker waits for its peers
POLL_SECONDS = 0.25
#: seconds ``synced_params`` waits for an aborted call to end before it answers anyway
IDLE_SECONDS = 30.0


def _resolve(future):
    if not future.done():
        future.set_result(None)


class ShardError(ValueError):
    """A worker could not open one of its shards; the message names the file and the
    worker.

    Examples
    --------
    >>> str(ShardError("tcp://127.0.0.1:1234: /data/a.store: no such store directory"))
    'tcp://127.0.0.1:1234: /data/a.store: no such store directory'
    """


class Aborted(RuntimeError):
    """The driver stopped the fit while this worker waited for its peers."""


def _address():
    from distributed import get_worker

    try:
        return get_worker().address
    except ValueError:  # not on a worker (called directly, as the doctests do)
        return f"pid {os.getpid()}"


def open_shard(shard, name="X"):
    """The rows of ``shard`` ((path, part, parts), or (MEMORY, key) for a Dataset in
    this worker's memory) as a Dataset; a store that fails to open raises
    ``ShardError`` naming the file and this worker.

    Examples
    --------
    >>> import os, tempfile, afmfast
    >>> path = os.path.join(tempfile.mkdtemp(), "s.store")
    >>> afmfast.write_store(afmfast.Dataset([0, 1, 2, 3], [0, 1, 2], None, [1, 2, 3]), path)
    >>> open_shard((path, 1, 2)).y.tolist()
    [2.0, 3.0]
    >>> try:
    ...     open_shard((path + ".missing", 0, 1))
    ... except ShardError as exc:
    ...     print(str(exc).split(": ", 1)[1][-40:])
    s.store.missing: no such store directory
    """
    if shard[0] == MEMORY:  # a partition that this worker holds (hash-encoded frames)
        from distributed import get_worker

        try:
            return get_worker().data[shard[1]]
        except KeyError:
            raise ShardError(f"{_address()}: {name} partition {shard[1]!r} is not in this "
                             f"worker's memory") from None
    path, part, parts = shard
    try:
        data = open_store(path)
    except (OSError, ValueError) as exc:
        message = str(exc)
        if os.fspath(path) not in message:
            message = f"{path}: {message}"
        raise ShardError(f"{_address()}: {name} shard {message}") from None
    if parts == 1:
        return data
    n = data.n_rows
    return data[n * part // parts:n * (part + 1) // parts]


def _call(method, *args):
    """Call an async actor method from the actor's thread; something with
    ``result(timeout)``. Dask hands a peer in the same process (an in-process
    LocalCluster) back as the bare coroutine, which then runs on this worker's loop."""
    out = method(*args)
    if inspect.iscoroutine(out):
        from distributed import get_worker

        return asyncio.run_coroutine_threadsafe(out, get_worker().loop.asyncio_loop)
    return out


def worker_seed(seed: int, index: int) -> int:
    """The seed of worker ``index``'s epoch order and dropout: the model's own for
    worker 0 (one worker trains exactly as a single process does), a derived one
    for the others.

    Examples
    --------
    >>> worker_seed(2016, 0), worker_seed(2016, 1) != worker_seed(2016, 2)
    (2016, True)
    """
    if index == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def summed_counts(histograms: list[np.ndarray]) -> np.ndarray:
    """The entrywise sum of count arrays of different lengths (``row_length_counts``).

    Examples
    --------
    >>> summed_counts([np.array([0, 2]), np.array([1, 0, 3])]).tolist()
    [1, 2, 3]
    """
    out = np.zeros(max([len(h) for h in histograms], default=1), np.int64)
    for counts in histograms:
        out[:len(counts)] += counts
    return out


class ShardWorker:
    """A Dask actor training one model on this worker's shards (see the module
    docstring). The driver (``afmfast.dask.estimators``) calls, in order: ``open``,
    ``start``, then ``run_epochs`` for a run of epochs at a time (each epoch's rounds,
    its scoring and the decisions on it: the workers synchronise and judge the epochs
    among themselves, and the driver's round trip is paid once a call, not once an
    epoch or a round); ``params`` at the end. Construction does nothing, so that Dask
    recomputing a lost actor elsewhere costs nothing.

    Examples
    --------
    >>> ShardWorker().model is None
    True
    """

    def __init__(self):
        self.model = None
        # this worker's payloads by round, the last two: a peer may still ask for the
        # previous round's while this worker has exported the next one's
        self._payloads, self._abort = {}, False
        # (event loop, future) of each peer's request waiting for a payload: woken when
        # one is exported, instead of polling the loop through the training
        self._waiters = []
        self._synced_rounds = 0  # rounds whose result the snapshot holds
        self._allocator = False  # whether this actor holds memory.acquire()
        # (epoch, parameters) of the best epoch, replaced whole (one reference that
        # ``synced_params`` reads on the event loop), and a spare copy: the last scored
        # epoch's while its verdict waits; the two trade places when it improved
        self._synced = self._kept = self._spare = None
        # set while no call of the actor thread is training or merging (what
        # ``synced_params`` waits for before it reads the copies)
        self._idle = threading.Event()
        self._idle.set()

    # ----- set-up ------------------------------------------------------------------------
    def open(self, local_class, params, shards, valid_shards, index, n_workers,
             classifier_labels=False):
        """Open the shards; return what the driver needs to agree on the data: the
        feature count, row counts (all, and by nonzeros), the training labels' sum and
        range (or, for a classifier, the distinct labels and the training rows of each)
        and this worker's address and process id."""
        self.index, self.n_workers = index, n_workers
        self.model = local_class(**params)
        self.model._validate()
        self.train = [open_shard(s) for s in shards]
        self.valid = [open_shard(s, "validation") for s in valid_shards]
        labels = None
        label_counts = {}
        if classifier_labels:
            for d in self.train:
                for label, count in zip(*np.unique(d.y, return_counts=True)):
                    label_counts[label.item()] = label_counts.get(label.item(), 0) + int(count)
            labels = sorted(set(label_counts).union(*(np.unique(d.y).tolist()
                                                      for d in self.valid)))
        train_ys = [d.y for d in self.train if d.n_rows]
        return {
            "row_lengths": summed_counts([d.row_length_counts() for d in self.train]),
            "label_sum": sum(label_sum(d) for d in self.train),
            "label_counts": label_counts,
            "train_range": ((min(float(y.min()) for y in train_ys),
                             max(float(y.max()) for y in train_ys)) if train_ys else None),
            "n_features": max([d.n_features for d in self.train + self.valid], default=0),
            "n_rows": sum(d.n_rows for d in self.train),
            "valid_rows": sum(d.n_rows for d in self.valid),
            "labels": labels, "address": _address(), "pid": os.getpid(),
        }

    def start(self, n_features, threads, peers, init_from=None, classes=None, merge="sum",
              bias=0.0, row_lengths=None, monitor="rmse", validated=False):
        """Build the Trainer on ``n_features`` features (the largest id of any shard),
        w0 starting at ``bias`` (the model's ``_initial_bias`` over every worker's rows),
        warm-started from ``init_from`` if given (``row_lengths``: every worker's
        training rows counted by nonzeros, for an AFM's start from an FM); ``peers``
        are the actors of every
        worker of the fit, in worker order; ``classes`` (a classifier's two labels)
        relabels the rows as the kernels' 0/1 targets; ``merge`` is the estimator's
        merge rule ("sum" or "mean", ``afmfast.dask.averaging.merge``); ``monitor``
        the validation metric that judges the epochs and ``validated`` whether any
        worker has validation shards (``afmfast.dask.scoring.SummedEpochJudge``). Returns
        this worker's batches per epoch."""
        model = self.model
        self.peers = peers
        if not self._allocator:
            memory.acquire()
            self._allocator = True
        data = [d.with_n_features(n_features) for d in self.train]
        valid = [d.with_n_features(max(n_features, d.n_features)) for d in self.valid]
        if classes is not None:
            positive = classes[1]
            data = [d.with_labels(d.y == positive) for d in data]
            valid = [d.with_labels(d.y == positive) for d in valid]
        self.train, self.valid = data, valid
        sizing = max(data, key=lambda d: (d.n_rows, d.max_row_nnz))
        if sizing.n_rows == 0:
            # a store with fewer rows than workers leaves this one none: it trains
            # nothing and still merges its peers' payloads, with a workspace of one
            # empty row
            sizing = Dataset(np.zeros(2, np.int64), np.zeros(0, np.int32), None,
                             np.zeros(1, np.float32), n_features=n_features)
        self.trainer = trainer = Trainer(model, sizing, threads=threads, bias=bias)
        trainer.seed = worker_seed(trainer.seed, self.index)
        model.n_features_in_ = n_features
        model._threads = threads
        model._backend = trainer.backend
        if init_from is not None:
            model._warm_start(init_from, n_features, row_lengths)
        # one workspace per shard: each is sized by its own longest rows, and marks the
        # features that its batches touch
        self.touched = averaging.TouchedRows(n_features)
        self.workspaces = [trainer.backend.track_touched(
            trainer.workspace if d is sizing or d.n_rows == 0 else
            model._new_workspace(trainer.backend, d), self.touched.marks) for d in data]
        self.rows = averaging.row_tables(trainer.params, trainer.state, model.optimizer)
        self.dense = averaging.dense_tables(trainer.params, trainer.state, model.optimizer)
        self.additive = averaging.additive_tables(trainer.params, model.optimizer)
        self.merge_rule = merge
        self.judge = SummedEpochJudge(model, monitor, validated)
        # the best epoch's snapshot is only ever restored by an early-stopping fit
        self._keeps_best = self.judge.early_stopping
        self._count = np.zeros(n_features, np.int32)  # merge scratch
        # the last synchronisation's tables, updated row by row at each synchronisation
        self._synced_rows = tuple(np.array(t) for t in self.rows)
        self._synced_dense = [t.copy() for t in self.dense]
        self._synced = self._synced_params()
        trainer._last_good = self._synced  # a divergence restores the last synchronisation
        self.step = 0
        self._pieces = iter(())
        bs = model.batch_size
        # a shard's last batch may be short: batch_size counts whole batches per shard
        self._epoch_batches = sum(-(-d.n_rows // min(bs, d.n_rows)) for d in data if d.n_rows)
        if self.n_workers > 1:
            # compile the merge (or load it from Numba's cache) now rather than inside
            # the first round, whose timing the sync log reports: merging this
            # worker's own untrained payload changes nothing
            self._merge([averaging.export(self.rows, self._synced_rows, self.dense,
                                          np.zeros(0, np.int32), 0)])
        return self._epoch_batches

    # ----- training ----------------------------------------------------------------------
    def run_epochs(self, first_epoch, n_epochs, n_rounds, sync_every, first_round, bounds):
        """Epochs ``first_epoch`` to ``first_epoch + n_epochs - 1``, each in ``n_rounds``
        rounds (every worker of the fit runs the same number) of ``sync_every``
        batches (fewer, or none, once this worker's batches run out), the rounds
        numbered from ``first_round``; after each epoch its validation sums
        (``score``, with ``bounds``).

        An epoch's sums travel to the peers with the next epoch's first payload, and
        every worker judges the epoch (``SummedEpochJudge``) once it has all of them; the last
        epoch of the call is judged after a round that carries the sums alone (no
        batches, not in the sync log). The parameters of an epoch whose verdict waits
        for the next epoch are kept aside when the fit may restore its best epoch (a
        second copy beside the best epoch's, in calls of more than one epoch). A
        verdict to stop or of divergence ends the call at once, in the middle of the
        epoch that carried it (its rounds are reported, the epoch is marked
        unfinished).

        Returns {"epochs": a dict per epoch begun ({"epoch", "records": its rounds'
        records (``round``'s), "seconds": from the end of the epoch before (the
        call's start for the first) to its end, scoring excluded, "score_seconds",
        "verdict"; or "unfinished": True with its rounds' records}), "next_round": the
        first round number that is still unused}."""
        self._idle.clear()
        try:
            return self._run_epochs(first_epoch, n_epochs, n_rounds, sync_every,
                                    first_round, bounds)
        finally:
            self._idle.set()

    def _run_epochs(self, first_epoch, n_epochs, n_rounds, sync_every, first_round,
                    bounds):
        clock = time.perf_counter()
        epochs, round_id = [], first_round
        pending = None  # this worker's sums of the last epoch, while it waits for a verdict
        last = first_epoch + n_epochs - 1
        for epoch in range(first_epoch, last + 1):
            self.begin_epoch(epoch)
            records, halt = [], False
            for r in range(n_rounds):
                # fixed-size rounds, the last one short: the epoch ends, where the model
                # is scored and kept, with the least staleness (an even spread of the
                # batches over the rounds was less accurate: docs/distributed.md)
                n_batches = max(0, min(sync_every, self._epoch_batches - r * sync_every))
                record, notes = self.round(n_batches, round_id, pending)
                round_id += 1
                records.append(record)
                if pending is not None:
                    verdict = self._take_verdict(epochs[-1], notes, waited=True)
                    pending = None
                    if verdict["stop"] or verdict["diverged"]:
                        halt = True
                        break
            if halt:
                epochs.append({"epoch": epoch, "records": records, "unfinished": True})
                break
            scored = time.perf_counter()
            pending = self.score(bounds)
            now = time.perf_counter()
            entry = {"epoch": epoch, "records": records, "score_seconds": now - scored}
            epochs.append(entry)
            if epoch == last:
                _, notes = self.round(0, round_id, pending)
                round_id += 1
                self._take_verdict(entry, notes)
                now = time.perf_counter()
            elif self._keeps_best:
                self._check_abort()  # once the driver said stop, no copy changes
                self._spare = self.trainer._snapshot(self._spare)
            entry["seconds"] = now - clock - entry["score_seconds"]
            clock = now
        return {"epochs": epochs, "next_round": round_id}

    def _take_verdict(self, entry, sums, waited=False):
        """Judge the epoch of ``entry`` from every worker's sums; when it improved, its
        parameters become the best epoch's: those kept aside if its verdict ``waited``
        for the next epoch, else the live ones (nothing trained since it was scored)."""
        verdict = self.judge.judge_sums(entry["epoch"], sums)
        if verdict["improved"] and self._keeps_best:
            if not waited:
                self._check_abort()
                self._spare = self.trainer._snapshot(self._spare)
            kept = self._kept
            self._kept = (entry["epoch"], self._spare)
            self._spare = kept[1] if kept is not None else None
        entry["verdict"] = verdict
        return verdict

    def _check_abort(self):
        if self._abort:
            raise Aborted(f"{_address()}: the fit was stopped by the driver")

    def begin_epoch(self, epoch):
        """Start ``epoch``: the shards in a seeded order, each in its own epoch order
        (windowed for memory-mapped stores)."""
        self.epoch = epoch
        order = np.random.default_rng([self.trainer.seed, epoch]).permutation(len(self.train))
        self._pieces = self._epoch_pieces([int(s) for s in order])
        self._pending = None

    def _epoch_pieces(self, order):
        bs_model = self.model.batch_size
        for s in order:
            data = self.train[s]
            if data.n_rows == 0:
                continue
            bs = min(bs_model, data.n_rows)
            for rows in _whole_batches(self.trainer.epoch_segments(data, self.epoch,
                                                                   reuse=True), bs):
                yield s, rows

    def round(self, n_batches, round_id, notes=None):
        """Train up to ``n_batches`` batches of the epoch, then synchronise with the
        other workers, telling them ``notes`` (the payload's). Returns the round's
        record (loss sum, batches, rows, whether the epoch is done, seconds training
        (wall, and this thread's CPU), seconds waiting for peers, bytes received,
        seconds merging, and the round's seconds in all) and every worker's notes in
        worker order."""
        self._check_abort()
        t0, cpu0 = time.perf_counter(), time.thread_time()
        # ask the peers for their payloads now: each request waits on its peer until
        # the payload is ready, so it is sent as soon as it is, not one request's
        # latency after this worker's training ends
        requests = self._request_payloads(round_id) if self.n_workers > 1 else None
        loss_sum, batches, rows_done = self._train(n_batches)
        t1 = time.perf_counter()
        done = self._pending is None and self._peek() is None
        told = [notes]  # every worker's notes: a worker alone has its own only
        # CPU seconds against wall seconds: a worker whose CPU other processes take
        # shows a train_cpu_seconds well below its train_seconds
        record = {"loss_sum": loss_sum, "batches": batches, "rows": rows_done,
                  "done": done, "train_seconds": t1 - t0,
                  "train_cpu_seconds": time.thread_time() - cpu0, "wait_seconds": 0.0,
                  "bytes": 0, "merge_seconds": 0.0}
        if self.n_workers > 1:
            ids = self.touched.take()
            payload = averaging.export(self.rows, self._synced_rows, self.dense, ids,
                                       batches)._replace(notes=notes)
            self._payloads[round_id] = payload
            self._payloads.pop(round_id - 2, None)
            self._wake_waiters()
            payloads, waited, received = self._fetch(requests, payload)
            t2 = time.perf_counter()
            self._merge(payloads)
            self._synced_rounds = round_id
            record.update(wait_seconds=waited, bytes=received,
                          merge_seconds=time.perf_counter() - t2)
            told = [p.notes for p in payloads]
        elif done:
            # alone, a worker has nothing to exchange: its snapshot (what a divergence
            # or a lost worker falls back to) is taken once an epoch, as a single
            # process keeps its last good epoch, instead of copying rows every round
            self._commit(self.touched.take())
            self._synced_rounds = round_id
        record["seconds"] = time.perf_counter() - t0
        return record, told

    def _merge(self, payloads):
        averaging.merge_into(payloads, self.rows, self._synced_rows, self.dense,
                             self._synced_dense,
                             self.additive if self.merge_rule == "sum" else None,
                             self._count)

    def _peek(self):
        if self._pending is None:
            self._pending = next(self._pieces, None)
        return self._pending

    def _train(self, n_batches):
        trainer, model = self.trainer, self.model
        loss_sum, batches, rows_done = 0.0, 0, 0
        while batches < n_batches and self._peek() is not None:
            s, rows = self._pending
            data = self.train[s]
            bs = min(model.batch_size, data.n_rows)
            take = min(len(rows), (n_batches - batches) * bs)
            piece, rest = rows[:take], rows[take:]
            self._pending = (s, rest) if len(rest) else None
            trainer.workspace = self.workspaces[s]
            try:
                self.step, loss = trainer.train_epoch(data.X, data.y, piece, self.step,
                                                      self.epoch)
            except TrainingDivergedError as exc:
                raise TrainingDivergedError(
                    f"{_address()}: training diverged in epoch {self.epoch} ({exc}); the "
                    f"workers keep the last synchronised parameters. Try a lower "
                    f"learning_rate (now {model.learning_rate}).") from None
            loss_sum += loss
            batches += -(-len(piece) // bs)
            rows_done += len(piece)
        return loss_sum, batches, rows_done

    def _request_payloads(self, round_id):
        """The peers' payloads of round ``round_id``, asked for: {worker index: a
        future}."""
        return {i: _call(peer.payload, round_id) for i, peer in enumerate(self.peers)
                if i != self.index}

    def _fetch(self, futures, own):
        """Every worker's payload, in worker order (``futures``: the peers' requests;
        ``own``: this worker's); the seconds spent waiting for them and the bytes
        received."""
        t = time.perf_counter()
        peers = self.peers
        payloads = []
        for i in range(len(peers)):
            if i == self.index:
                payloads.append(own)
                continue
            while True:
                self._check_abort()
                try:
                    payloads.append(futures[i].result(timeout=POLL_SECONDS))
                    break
                except (TimeoutError, asyncio.TimeoutError):
                    continue
        received = sum(p.nbytes for i, p in enumerate(payloads) if i != self.index)
        return payloads, time.perf_counter() - t, received

    def _commit(self, ids):
        """Copy the synchronised rows ``ids`` and the dense tables into the snapshot of
        the last synchronisation."""
        for live, saved in zip(self.rows, self._synced_rows):
            saved[ids] = live[ids]
        for live, saved in zip(self.dense, self._synced_dense):
            saved[...] = live

    def _synced_params(self):
        """The last synchronisation's parameters as the model's namedtuple (views of
        the snapshot tables)."""
        params = self.trainer.params
        n_sparse = len(averaging.SPARSE_FIELDS)
        tables = {name: synced.reshape(getattr(params, name).shape) for name, synced in
                  zip(averaging.SPARSE_FIELDS, self._synced_rows)}
        dense_names = [n for n in params._fields if n not in averaging.SPARSE_FIELDS]
        tables.update(zip(dense_names, self._synced_dense[:len(params) - n_sparse]))
        return type(params)(**tables)

    def _wake_waiters(self):
        """Wake the requests waiting in ``payload`` (from the actor thread)."""
        waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            loop.call_soon_threadsafe(_resolve, future)

    async def payload(self, round_id):
        """This worker's payload of round ``round_id``, once it is ready (an async
        method: it runs on the worker's event loop, so peers get it while this
        worker's actor thread trains or waits for theirs)."""
        loop = asyncio.get_running_loop()
        while round_id not in self._payloads:
            self._check_abort()
            future = loop.create_future()
            self._waiters.append((loop, future))
            if round_id in self._payloads:  # exported while the waiter was added
                break
            try:  # woken by the export, or after a while to look at the abort flag
                await asyncio.wait_for(future, POLL_SECONDS)
            except (TimeoutError, asyncio.TimeoutError):
                pass
        return self._payloads[round_id]

    async def release(self):
        """The fit is over: give back this actor's hold on the training allocator
        settings (``afmfast.dask.memory``). On the event loop, so that it is answered
        even while the actor thread is stuck waiting for a lost peer."""
        if self._allocator:
            self._allocator = False
            memory.release()

    async def abort(self):
        """Make a worker waiting for its peers give up (the driver lost a worker)."""
        self._abort = True
        self._wake_waiters()

    # ----- validation and results --------------------------------------------------------
    def score(self, bounds):
        """``score_sums`` of the validation shards, and whether the parameters are
        still finite."""
        out = score_sums(self.model, self.valid, bounds)
        out["finite"] = out["finite"] and self.trainer.finite_parameters()
        return out

    def params(self, which="live"):
        """The parameter arrays by name: "live", "best" (the best epoch's) or
        "synced" (the last synchronisation's)."""
        source = {"live": self.trainer.params, "best": self._kept and self._kept[1],
                  "synced": self._synced}[which]
        return dict(zip(source._fields, source))

    async def synced_params(self):
        """What the fit keeps when it fails: the last synchronised parameters, the
        number of rounds they include, and the best epoch's parameters with its number
        when there is such a copy (``(arrays by name, rounds, best arrays by name or
        None, best epoch or 0)``; None before ``start``). Answered on the event loop,
        even while the actor thread is stuck waiting for a lost peer; after ``abort``
        the actor thread writes neither copy again: this waits (up to IDLE_SECONDS)
        for the thread to leave its call, which it does at its next round at the
        latest."""
        if self._synced is None:
            return None
        deadline = time.monotonic() + IDLE_SECONDS
        while not self._idle.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        kept = self._kept
        best, epoch = (None, 0) if kept is None else (dict(zip(kept[1]._fields, kept[1])),
                                                      kept[0])
        return dict(zip(self._synced._fields, self._synced)), self._synced_rounds, best, epoch
