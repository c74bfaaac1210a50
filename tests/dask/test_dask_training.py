"""afmfast.dask: data-parallel training on a real multi-process Dask cluster
(``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)``, shared by the
module), on small stores written from the demo data. Skipped when dask or distributed
is not installed (they come with the ``test`` and ``dask`` extras)."""
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("distributed")

from distributed import Client, LocalCluster  # noqa: E402

import afmfast  # noqa: E402
from afmfast.dask import (  # noqa: E402
    DaskAFM,
    DaskFM,
    DaskFMClassifier,
    ShardError,
    WorkerLostError,
)
from afmfast.dask.averaging import Payload, merge_into, to_bfloat16  # noqa: E402
from afmfast.demo import make_demo_data  # noqa: E402
from helpers.paths import FRAPPE  # noqa: E402

SMALL = dict(n_factors=4, batch_size=256, n_threads=1, verbose=0, random_state=3)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stores")
    data = make_demo_data(n_rows=6000, seed=1)
    paths = {"train": folder / "train.store", "valid": folder / "valid.store"}
    afmfast.write_store(data.train, paths["train"])
    afmfast.write_store(data.valid, paths["valid"])
    # the training rows again as two stores, and as binary labels
    half = data.train.n_rows // 2
    for name, part in (("a", data.train[:half]), ("b", data.train[half:])):
        paths[name] = folder / f"{name}.store"
        afmfast.write_store(part, paths[name])
    median = float(np.median(data.train.y))
    for name, part in (("train01", data.train), ("valid01", data.valid)):
        paths[name] = folder / f"{name}.store"
        afmfast.write_store(part.with_labels((part.y > median).astype(np.float32)),
                            paths[name])
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module", autouse=True)
def no_bench_folder_on_the_path():
    """bench/distributed.py shares the package's name, and tests/bench puts bench/ first
    on sys.path: worker processes, which start with this process's path, would import
    it instead of the package. Keep such folders off the path while clusters run."""
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if not os.path.isfile(os.path.join(p or os.curdir,
                                                                        "distributed.py"))]
    yield
    sys.path[:] = saved


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def client1():
    """One in-process worker: what a single process does, through the Dask path."""
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster,
                                                                  set_as_default=False) as c:
        yield c


def same_params(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a._params, b._params))


def test_import_afmfast_does_not_import_dask(tmp_path):
    code = "import sys, afmfast; print('dask' in sys.modules or 'distributed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, check=True)
    assert out.stdout.strip() == "False"


def test_merge_averages_rows_over_the_workers_that_touched_them():
    # worker 0 touched rows 1 and 3, worker 1 rows 3 and 4; worker 2 trained nothing
    # (the rows start at 1: the payloads carry the changes 2 - 1, 4 - 1, ...)
    p0 = Payload(np.array([1, 3], np.int32), (to_bfloat16([[1.0], [3.0]]),),
                 (np.array([1.0, 1.0], np.float32),), 3)
    p1 = Payload(np.array([3, 4], np.int32), (to_bfloat16([[7.0], [5.0]]),),
                 (np.array([3.0, 5.0], np.float32),), 2)
    idle = Payload(np.zeros(0, np.int32), (np.zeros((0, 1), np.uint16),),
                   (np.array([100.0, 100.0], np.float32),), 0)
    for rule, row3, dense in ((None, 6.0, [2.0, 3.0]), (([True], [True]), 11.0, [3.0, 5.0])):
        V = np.full((6, 1), 1.0, np.float32)
        synced, d, synced_d = V.copy(), [np.ones(2, np.float32)], [np.ones(2, np.float32)]
        count = np.zeros(6, np.int32)
        merge_into([p0, p1, idle], [V], [synced], d, synced_d, rule, count)
        # row 1 alone keeps worker 0's value; untouched rows keep theirs; the idle
        # worker's dense copy is left out
        assert V.ravel().tolist() == [1.0, 2.0, 1.0, row3, 6.0, 1.0]
        assert d[0].tolist() == dense and np.array_equal(synced, V)
        assert not count.any()


@pytest.mark.parametrize("shuffle_unit", [1, 16])
def test_one_worker_trains_exactly_as_a_single_process(client1, stores, shuffle_unit):
    local = afmfast.FM(n_epochs=3, shuffle_unit=shuffle_unit, **SMALL).fit(
        afmfast.open_store(stores["train"]), validation=afmfast.open_store(stores["valid"]))
    dask_model = DaskFM(n_epochs=3, client=client1, sync_every=3, shuffle_unit=shuffle_unit,
                        **SMALL)
    dask_model.fit(stores["train"], validation=stores["valid"])
    assert same_params(dask_model.to_local(), local)
    assert dask_model.to_local().y_range_ == local.y_range_  # evaluate's default clip
    np.testing.assert_allclose([h["valid_rmse"] for h in dask_model.history_],
                               [h["valid_rmse"] for h in local.history_], rtol=1e-6)


def test_two_workers_are_reproducible_and_learn_as_a_single_process_does(client, stores):
    runs = [DaskFM(n_epochs=10, client=client, sync_every=2, **SMALL).fit(
        stores["train"], validation=stores["valid"]) for _ in range(2)]
    assert same_params(runs[0].to_local(), runs[1].to_local())
    local = afmfast.FM(n_epochs=10, **SMALL).fit(afmfast.open_store(stores["train"]))
    single = local.evaluate(afmfast.open_store(stores["valid"]))["rmse"]
    assert runs[0].evaluate(stores["valid"])["rmse"] <= single + 0.05
    log = runs[0].sync_log_
    assert log and all(entry["bytes"] > 0 for entry in log if entry["batches"])
    assert runs[0].history_[-1]["syncs"] >= 2 and runs[0].n_workers_ == 2
    # the mean rule is another model (it moves shared rows by the mean of the changes)
    mean = DaskFM(n_epochs=2, client=client, sync_every=2, merge="mean", **SMALL)
    runs[0].set_params(n_epochs=2).fit(stores["train"])
    assert not same_params(mean.fit(stores["train"]).to_local(), runs[0].to_local())


def test_early_stopping_as_a_single_process_and_the_best_epoch_restored(client1, client,
                                                                        stores):
    """The workers judge the epochs themselves, the verdict on an epoch coming with the
    next epoch's first payload (or, for a call's last epoch, a round of its own): one
    worker stops and restores exactly as a single process does, in calls of many epochs
    or of one; two restore the epoch whose validation score was the best."""
    settings = dict(SMALL, learning_rate=0.3, patience=2)
    train, valid = stores["train"], stores["valid"]
    local = afmfast.FM(n_epochs=60, **settings).fit(afmfast.open_store(train),
                                                    validation=afmfast.open_store(valid))
    assert 3 < len(local.history_) < 60  # it stops early, after calls of several epochs
    one = DaskFM(n_epochs=60, client=client1, sync_every=3, **settings).fit(
        train, validation=valid)
    assert same_params(one.to_local(), local)
    assert one.to_local().best_epoch_ == local.best_epoch_
    # with a callback every call is one epoch, judged before the call returns
    stepwise = DaskFM(n_epochs=60, client=client1, sync_every=3, **settings).fit(
        train, validation=valid, callbacks=[lambda model, record: False])
    assert same_params(stepwise.to_local(), local)
    np.testing.assert_allclose([h["valid_rmse"] for h in one.history_],
                               [h["valid_rmse"] for h in local.history_], rtol=1e-6)
    two = DaskFM(n_epochs=60, client=client, sync_every=3, **settings).fit(
        train, validation=valid)
    scores = [h["valid_rmse"] for h in two.history_]
    best = two.to_local().best_epoch_
    assert len(scores) < 60 and len(scores) - best == 2 and scores[best - 1] == min(scores)
    assert two.evaluate(valid)["rmse"] == pytest.approx(scores[best - 1], rel=1e-9)


def test_a_callback_sees_every_epoch_before_the_next_and_can_stop_the_fit(client, stores):
    seen = []

    def stop_after_3(model, record):
        seen.append((record["epoch"], len(model.history_)))
        return record["epoch"] == 3

    model = DaskFM(n_epochs=10, client=client, **SMALL).fit(stores["train"],
                                                           callbacks=[stop_after_3])
    assert seen == [(1, 1), (2, 2), (3, 3)] and len(model.history_) == 3
    assert max(entry["epoch"] for entry in model.sync_log_) == 3


def test_an_interrupted_fit_keeps_its_best_epoch(client, stores):
    """Ctrl-C (a KeyboardInterrupt in the driver, here from a callback) keeps the best
    epoch's parameters, as a single process does."""
    settings = dict(SMALL, learning_rate=0.3, patience=50)
    model = DaskFM(n_epochs=60, client=client, sync_every=3, **settings)

    def interrupt_after_a_worse_epoch(fitted, record):
        scores = [h["valid_rmse"] for h in fitted.history_]
        if len(scores) > 3 and scores[-1] > min(scores):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as info:
        model.fit(stores["train"], validation=stores["valid"],
                  callbacks=[interrupt_after_a_worse_epoch])
    scores = [h["valid_rmse"] for h in model.history_]
    best = model.to_local().best_epoch_
    assert scores[best - 1] == min(scores) and best < len(scores)
    assert model.evaluate(stores["valid"])["rmse"] == pytest.approx(scores[best - 1],
                                                                     rel=1e-9)
    assert f"its best epoch ({best})" in "".join(getattr(info.value, "__notes__", []))


def test_ctrl_c_stops_a_lone_worker_within_a_round(client1, stores, monkeypatch):
    """A worker alone never waits for peers: it still stops at its next round once the
    driver says stop, instead of running its call (here 30 s of epochs) to the end."""
    import afmfast.dask.estimators as estimators

    monkeypatch.setattr(estimators, "CALL_SECONDS", 30.0)
    model = DaskFM(n_epochs=100_000, client=client1, sync_every=3, **SMALL)
    fired = []

    def interrupt():  # Ctrl-C: SIGINT to this process, which the main thread takes
        fired.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Timer(2.0, interrupt)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            model.fit(stores["train"])
        stopped = time.monotonic()
    finally:
        timer.cancel()
    assert fired and stopped - fired[0] < 5
    # the model keeps the last synchronisation (no validation: no best epoch)
    assert np.all(np.isfinite(model.to_local().predict(afmfast.open_store(stores["valid"]))))


def test_a_store_with_fewer_rows_than_workers(client, tmp_path):
    """One row for two workers: one worker trains it, the other trains nothing and
    still merges; the model is the single process's, and each round's record says
    what trained."""
    path = str(tmp_path / "one.store")
    afmfast.write_store(afmfast.Dataset([0, 2], [0, 1], None, [1.0], n_features=3), path)
    settings = dict(SMALL, keep=1.0)  # no dropout: the training worker's seed is its own
    model = DaskFM(n_epochs=2, client=client, **settings).fit([path])
    assert [h["syncs"] for h in model.history_] == [1, 1]
    assert all(entry["batches"] == 1 and entry["train_cpu_seconds"] >= 0
               for entry in model.sync_log_)
    local = afmfast.FM(n_epochs=2, **settings).fit(afmfast.open_store(path))
    np.testing.assert_allclose(model.predict(afmfast.open_store(path)),
                               local.predict(afmfast.open_store(path)), rtol=1e-5)


def test_frappe_mini_two_workers_within_0_01_of_a_single_process(client, tmp_path):
    """The accuracy target: reference FM settings, 20 epochs, 2 workers."""
    if not FRAPPE.exists():
        pytest.skip(f"{FRAPPE} is not present")
    data = afmfast.load_libfm(FRAPPE)
    held_out = (np.arange(1, len(data) + 1) % 5) == 0
    train, valid = str(tmp_path / "train.store"), str(tmp_path / "valid.store")
    afmfast.write_store(data[~held_out], train)
    afmfast.write_store(data[held_out], valid)
    settings = dict(n_factors=16, learning_rate=0.01, batch_size=4096, n_epochs=20, keep=0.7,
                    batch_norm=True, verbose=0, n_threads=1)
    local = afmfast.FM(**settings).fit(afmfast.open_store(train),
                                       validation=afmfast.open_store(valid))
    model = DaskFM(client=client, **settings).fit(train, validation=valid)
    single = local.evaluate(afmfast.open_store(valid))["rmse"]
    assert abs(model.evaluate(valid)["rmse"] - single) <= 0.01


def test_whole_stores_per_worker_and_dask_predict(client, stores, tmp_path):
    model = DaskFM(n_epochs=2, client=client, **SMALL).fit([stores["a"], stores["b"]])
    local = model.to_local()
    predicted = model.predict([stores["valid"], stores["a"]])
    assert type(predicted).__module__.startswith("dask.array")
    expected = np.concatenate([local.predict(afmfast.open_store(stores["valid"])),
                               local.predict(afmfast.open_store(stores["a"]))])
    np.testing.assert_array_equal(predicted.compute(), expected)
    # the local model is an ordinary FM: it saves and loads
    local.save(tmp_path / "fm.npz")
    assert same_params(afmfast.load(tmp_path / "fm.npz"), local)
    assert model.evaluate(stores["valid"])["rmse"] == pytest.approx(
        local.evaluate(afmfast.open_store(stores["valid"]))["rmse"], rel=1e-9)


def test_afm_warm_started_from_a_dask_fm(client, stores):
    fm = DaskFM(n_epochs=2, client=client, **SMALL).fit(stores["train"])
    afm = DaskAFM(n_epochs=1, attention_size=4, client=client,
                  **{k: v for k, v in SMALL.items()}).fit(stores["train"], init_from=fm)
    local = afm.to_local()
    assert isinstance(local, afmfast.AFM)
    record = local.explain(afmfast.open_store(stores["valid"])[:3])
    assert len(record.indptr) == 4 and np.all(np.isfinite(record.weight))


def test_classifier(client, stores):
    clf = DaskFMClassifier(n_epochs=3, client=client, **SMALL)
    clf.fit(stores["train01"], validation=stores["valid01"], metric="accuracy")
    local = clf.to_local()
    assert local.classes_.tolist() == [0.0, 1.0]
    metrics = clf.evaluate(stores["valid01"])
    assert metrics["accuracy"] > 0.6 and set(metrics) == {"logloss", "auc", "accuracy"}
    # the AUC from the workers' summed histograms is the exact AUC but for pairs that
    # share a bin of width 2^-14
    exact = local.evaluate(afmfast.open_store(stores["valid01"]))
    assert 0.6 < metrics["auc"] and abs(metrics["auc"] - exact["auc"]) < 1e-3
    assert metrics["logloss"] == pytest.approx(exact["logloss"], rel=1e-6)
    by_auc = DaskFMClassifier(n_epochs=3, client=client, **SMALL)
    by_auc.fit(stores["train01"], validation=stores["valid01"], metric="auc")
    assert all(0.5 < h["valid_auc"] <= 1 for h in by_auc.history_)


def test_a_shard_that_fails_to_open_names_the_file_and_the_worker(client, stores, tmp_path):
    missing = str(tmp_path / "nowhere.store")
    with pytest.raises(ShardError, match=r"tcp://.*nowhere\.store"):
        DaskFM(n_epochs=1, client=client, **SMALL).fit([stores["train"], missing])


def test_bad_arguments(client, stores):
    with pytest.raises(TypeError, match="store path"):
        DaskFM(client=client).fit(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="sync_every"):
        DaskFM(client=client, sync_every=0).fit(stores["train"])
    with pytest.raises(ValueError, match="merge must be one of"):
        DaskFM(client=client, merge="median").fit(stores["train"])
    with pytest.raises(ValueError, match="labels from the stores"):
        DaskFM(client=client).fit(stores["train"], [1.0])


def test_worker_module_examples():
    import doctest

    import afmfast.dask.scoring
    import afmfast.dask.worker

    for module in (afmfast.dask.worker, afmfast.dask.scoring):
        assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0


def test_dask_dataframe_partitions_are_hash_encoded_on_the_workers(client):
    pd = pytest.importorskip("pandas")
    dd = pytest.importorskip("dask.dataframe")
    from afmfast.data.hashed_frames import hash_frame

    rng = np.random.default_rng(0)
    n = 4000
    users, items = rng.integers(0, 50, n), rng.integers(0, 80, n)
    effect_u, effect_i = rng.normal(size=50), rng.normal(size=80)
    frame = pd.DataFrame({"user": [f"u{u}" for u in users], "item": items,
                          "hour": rng.uniform(0, 1, n),
                          "rating": (effect_u[users] + effect_i[items]).astype(np.float32)})
    train, valid = dd.from_pandas(frame[:3200], npartitions=4), dd.from_pandas(frame[3200:],
                                                                               npartitions=2)
    model = DaskFM(n_epochs=8, client=client, learning_rate=0.05, **{
        k: v for k, v in SMALL.items()})
    model.fit(train, "rating", validation=valid, hash_bits=12)
    assert model.history_[-1]["valid_rmse"] < 0.8 * model.history_[0]["valid_rmse"]
    predicted = model.predict(valid).compute()
    local = model.to_local().predict(hash_frame(frame[3200:], "rating", hash_bits=12))
    np.testing.assert_array_equal(predicted.to_numpy(), local)
    assert model.evaluate(valid)["rmse"] == pytest.approx(model.history_[-1]["valid_rmse"]) \
        or model.best_epoch_ != len(model.history_)
    with pytest.raises(ValueError, match="label column's name"):
        model.fit(train)


def test_a_killed_worker_stops_the_fit_with_the_last_synchronised_model(client, stores):
    """Last in the module: it kills one of the cluster's worker processes."""
    pids = client.run(os.getpid)
    model = DaskFM(n_epochs=200, client=client, sync_every=1, **SMALL)
    victim = max(pids)  # the second worker in address order, or the other: either way
    victim_pid = pids[victim]

    def kill_after_some_syncs():
        deadline = time.monotonic() + 60
        while len(getattr(model, "sync_log_", [])) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(victim_pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_after_some_syncs, daemon=True)
    killer.start()
    t = time.monotonic()
    with pytest.raises(WorkerLostError, match=victim) as info:
        model.fit(stores["train"])
    assert time.monotonic() - t < 60
    killer.join()
    assert info.value.syncs_done >= 5
    local = model.to_local()  # the last synchronised parameters
    scores = local.predict(afmfast.open_store(stores["valid"]))
    assert np.all(np.isfinite(scores))
    fresh = afmfast.FM(n_epochs=0, **SMALL).fit(afmfast.open_store(stores["train"]))
    assert not same_params(local, fresh)  # trained, not the initial tables
    client.wait_for_workers(2, timeout=30)  # the nanny restarts the killed one
