"""Several Python threads using one model: concurrent predictions agree with serial ones
(the kernels release the GIL and share no scratch), and predicting during fit is refused."""
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import afmfast
from afmfast.kernels.backends import available_backends
from afmfast.demo import make_demo_data
from afmfast.models.training import Trainer


@pytest.fixture(scope="module")
def demo():
    return make_demo_data(n_rows=6000, seed=8)


def _models(demo, backend):
    fm = afmfast.FM(n_factors=8, n_epochs=1, batch_size=512, verbose=0, backend=backend)
    afm = afmfast.AFM(n_factors=8, attention_size=8, n_epochs=1, batch_size=512, verbose=0,
                      backend=backend)
    return fm.fit(demo.train), afm.fit(demo.train)


@pytest.mark.parametrize("backend", available_backends("afm"))
def test_concurrent_predictions_equal_serial_ones(demo, backend):
    chunks = [demo.valid[np.arange(i, len(demo.valid), 7)] for i in range(7)]
    for model in _models(demo, backend):
        expected = [model.predict(c) for c in chunks]
        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = [(i, pool.submit(model.predict, chunks[i])) for _ in range(6)
                       for i in range(len(chunks))]
            for i, fut in futures:
                np.testing.assert_array_equal(fut.result(), expected[i])


def test_predict_while_fit_runs_is_refused(demo, monkeypatch):
    model = afmfast.FM(n_factors=8, n_epochs=2, batch_size=512, verbose=0).fit(demo.train)
    inside_fit, release = threading.Event(), threading.Event()
    real_run = Trainer.train_run

    def slow_run(*args):
        inside_fit.set()
        release.wait(timeout=30)
        return real_run(*args)

    monkeypatch.setattr(Trainer, "train_run", slow_run)
    worker = threading.Thread(target=model.fit, args=(demo.train,))
    worker.start()
    try:
        assert inside_fit.wait(timeout=30)
        with pytest.raises(RuntimeError, match="being trained"):
            model.predict(demo.valid)
    finally:
        release.set()
        worker.join(timeout=60)
    assert np.all(np.isfinite(model.predict(demo.valid)))
