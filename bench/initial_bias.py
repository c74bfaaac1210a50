"""Where SGD training starts: w0 at the mean training label (what fit does) against 0
(what it did before), on rating-like 1-5 labels and on frappe-mini; and an AFM
warm-started from a batch-norm FM, with the FM's batch norm folded into p and w0 and
h = 0 (``fold_fm=True``) against the reference's warm start (the default: the FM's V, w
and w0; p = 1 and h as initialised).

    python bench/initial_bias.py

Rating-like data: ``bench/mcmc_frappe.py``'s ``rating_like`` (users, items and two
context fields, 1-5 ratings from a planted FM; 80/20 split), FM with its defaults for 5
and 20 epochs. frappe-mini: every 5th row of ../shared/data/frappe's file validates; the
reference FM (k 16, lr 0.01, keep 0.7, batch norm) for 20 epochs, then AFM (reference
settings) warm-started from it and trained from scratch. Test RMSE as ``evaluate``
gives it. The w0 = 0 runs replace the model's ``_initial_bias`` for the run. The warm
start table: the FM's RMSE at its end, the AFM's before any training (n_epochs=0) and
its best validation epoch of 20 (early stopping's restore), at the AFM's learning rate
and, folded, at 0.005, on both data sets (the rating-like AFM with l2_attention 1).
"""
import numpy as np

import afmfast
from afmfast.models.base import FactorizationModel
from bench_common import FRAPPE, table
from mcmc_frappe import rating_like

AFM = dict(n_factors=16, attention_size=16, keep=(1.0, 0.5), l2_attention=100.0,
           learning_rate=0.1, n_epochs=20, verbose=0)


def runs():
    """(label, rows of results) for w0 = 0 and w0 = the mean."""
    ratings = rating_like(seed=0)
    frappe = afmfast.load_libfm(FRAPPE)
    line = np.arange(1, len(frappe) + 1)
    train, valid = frappe[line % 5 != 0], frappe[line % 5 == 0]
    mean_bias = FactorizationModel._initial_bias
    rows = []
    for label, bias in (("0", lambda self, label_sum, n_rows: 0.0),
                        ("mean label", mean_bias)):
        FactorizationModel._initial_bias = bias
        try:
            row = [label]
            for epochs in (5, 20):
                fm = afmfast.FM(n_epochs=epochs, verbose=0).fit(ratings[0])
                row.append(f"{fm.evaluate(ratings[1])['rmse']:.4f}")
            fm = afmfast.FM(n_factors=16, learning_rate=0.01, keep=0.7, batch_norm=True,
                            n_epochs=20, verbose=0).fit(train, validation=valid)
            warm = afmfast.AFM(**AFM).fit(train, validation=valid, init_from=fm)
            cold = afmfast.AFM(**AFM).fit(train, validation=valid)
            row += [f"{m.evaluate(valid)['rmse']:.4f}" for m in (fm, warm, cold)]
        finally:
            FactorizationModel._initial_bias = mean_bias
        rows.append(row)
    return rows


def warm_starts():
    """Rows: data, FM at its end, and the AFM at its start and after 20 epochs, for
    both warm starts."""
    ratings = rating_like(seed=0)
    frappe = afmfast.load_libfm(FRAPPE)
    line = np.arange(1, len(frappe) + 1)
    rows = []
    for name, (train, valid), fm_settings, afm_settings in (
            ("rating-like", ratings, dict(n_epochs=20), dict(AFM, l2_attention=1.0)),
            ("frappe-mini", (frappe[line % 5 != 0], frappe[line % 5 == 0]),
             dict(n_factors=16, learning_rate=0.01, keep=0.7, batch_norm=True,
                  n_epochs=20), AFM)):
        fm = afmfast.FM(verbose=0, **fm_settings).fit(train)
        row = [name, f"{fm.evaluate(valid)['rmse']:.4f}"]
        for fold, lr in ((False, afm_settings["learning_rate"]),
                         (True, afm_settings["learning_rate"]), (True, 0.005)):
            settings = dict(afm_settings, fold_fm=fold, learning_rate=lr)
            start = afmfast.AFM(**{**settings, "n_epochs": 0}).fit(train, init_from=fm)
            if fold and lr != afm_settings["learning_rate"]:
                row.append("")  # the same start as the column before
            else:
                row.append(f"{start.evaluate(valid)['rmse']:.4f}")
            end = afmfast.AFM(**settings).fit(train, validation=valid, init_from=fm)
            row.append(f"{end.evaluate(valid)['rmse']:.4f}")
        rows.append(row)
    return rows


def main():
    print(table(["w0 starts at", "ratings FM 5 epochs", "ratings FM 20 epochs",
                 "frappe FM", "frappe AFM warm", "frappe AFM cold"], runs()))
    print()
    print(table(["data", "FM at its end", "AFM start, reference warm start",
                 "best of 20 epochs", "AFM start, fold_fm=True", "best of 20 epochs",
                 "(fold_fm, lr 0.005: start)", "best of 20 epochs"], warm_starts()))


if __name__ == "__main__":
    main()
