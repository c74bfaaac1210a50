"""What users hit around fit: the validation argument's forms and the within-epoch
progress line of verbose=2 on a terminal and in a log."""
import io

import numpy as np
import pytest

import afmfast
from afmfast.models import training
from afmfast.demo import make_demo_data


@pytest.fixture(scope="module")
def demo():
    return make_demo_data(n_rows=1000, seed=4)


def _fm():
    return afmfast.FM(n_factors=4, n_epochs=1, batch_size=256, verbose=0)


@pytest.mark.parametrize("bad,needle", [
    (lambda d: d.X, "a tuple of 3 items (Dataset.X"),
    (lambda d: (d.X[0],), "a tuple of 1 items"),
    (lambda d: [d, d.y], "a list"),
    (lambda d: np.zeros((3, 200)), "a ndarray"),
])
def test_validation_must_be_a_dataset_or_an_x_y_tuple(demo, bad, needle):
    with pytest.raises(ValueError) as exc:
        _fm().fit(demo.train, validation=bad(demo.valid))
    message = str(exc.value)
    assert message.startswith("validation must be an afmfast.Dataset or an (X, y) tuple")
    assert needle in message and "validation=(X_valid, y_valid)" in message


def test_validation_forms_that_work(demo):
    dense = np.zeros((len(demo.valid), demo.valid.n_features))
    for r in range(len(demo.valid)):
        lo, hi = demo.valid.indptr[r], demo.valid.indptr[r + 1]
        dense[r, demo.valid.indices[lo:hi]] = demo.valid.values[lo:hi]
    a = _fm().fit(demo.train, validation=demo.valid).history_[0]["valid_rmse"]
    b = _fm().fit(demo.train, validation=(dense, demo.valid.y)).history_[0]["valid_rmse"]
    assert a == pytest.approx(b)


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.fixture
def clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(training.time, "perf_counter", lambda: now[0])
    return now


def _drive(stream, clock, steps, dt):
    progress = training._Progress(3, 1000, stream=stream)
    for i in range(1, steps + 1):
        clock[0] += dt
        progress.update(i * 1000 // steps)
    progress.close()
    return stream.getvalue()


def test_progress_redraws_in_place_on_a_terminal(clock):
    text = _drive(_Stream(tty=True), clock, steps=10, dt=0.3)
    assert text.count("\r") == 11 and text.endswith("\r\033[K")
    assert "Epoch 3: 100/1000 rows" in text and "\n" not in text


def test_progress_in_a_log_is_plain_and_rare(clock, monkeypatch):
    monkeypatch.setattr(training._Progress, "PLAIN_INTERVAL", 5.0)
    text = _drive(_Stream(tty=False), clock, steps=10, dt=0.3)
    assert text == ""  # 3 s: shorter than the plain interval
    text = _drive(_Stream(tty=False), clock, steps=10, dt=2.0)
    lines = text.splitlines()
    assert "\r" not in text and "\033" not in text
    assert len(lines) == 3  # at 6, 12 and 18 s of the 20
    assert lines[0].startswith("Epoch 3: 300/1000 rows, ") and "ETA" in lines[0]

