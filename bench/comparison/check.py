"""The same-math check: the PyTorch models, built in float64 from the same initial
parameters as afmfast, take two Adagrad steps on the first 256 rows with dropout off
(keep 1) and batch norm on (FM) / attention with k != t (AFM); the loss of each step and
every parameter table afterwards must equal ``afmfast.kernels.reference`` (float64) to
CHECK_TOLERANCE relative."""
import numpy as np

from bench_common import afmfast, load_dataset

CHECK_TOLERANCE = 1e-9


def _compare(out, name, step, loss_ref, loss_torch, theirs, ours):
    """Append the worst relative difference of loss and parameters to out."""
    worst = abs(loss_ref - loss_torch) / max(1.0, abs(loss_ref))
    for key, value in theirs.items():
        mine = np.asarray(getattr(ours, key), dtype=np.float64)
        scale = max(1.0, float(np.abs(mine).max()))
        worst = max(worst, float(np.abs(value - mine).max()) / scale)
    out.append(dict(name=name, step=step, loss_ref=loss_ref, loss_torch=loss_torch,
                    max_rel_diff=worst))


def _check_fm(out, rows, arrays, rng):
    import torch

    from torch_models import TorchFM, adagrad, fm_arrays, train_step
    from afmfast.kernels import reference as ref
    from afmfast.kernels.api import ADAGRAD, StepConfig, new_fm_params, new_opt_state

    X, y, M, idx, val, yt = arrays
    est, k = afmfast.FM(), 8
    params = new_fm_params(M, k, rng, dtype=np.float64)
    params.dense[1:] += rng.normal(0, 0.1, 2 * k)  # BN scale/shift away from 1/0
    state = new_opt_state(params, ADAGRAD)
    model = TorchFM(params, keep=1.0, batch_norm=True, l2=0.0, dtype=torch.float64)
    opt = adagrad(model, est.learning_rate)
    for step in range(2):
        cfg = StepConfig(lr=est.learning_rate, l2=0.0, keep=1.0, optimizer=ADAGRAD,
                         batch_norm=1, seed=2016, step=step, n_threads=1)
        loss_ref = ref.fm_step(X, y, rows, params, state, cfg)
        loss_torch = train_step(model, opt, idx, val, yt)
        _compare(out, f"FM k={k} batch norm", step, loss_ref, loss_torch, fm_arrays(model),
                 params)


def _check_afm(out, rows, arrays, rng):
    import torch

    from torch_models import TorchAFM, adagrad, afm_arrays, train_step
    from afmfast.kernels import reference as ref
    from afmfast.kernels.api import (ACTIVATION_CODES, ADAGRAD, AFMStepConfig,
                                    new_afm_params, new_opt_state)

    X, y, M, idx, val, yt = arrays
    est, k, t = afmfast.AFM(), 8, 6
    params = new_afm_params(M, k, t, rng, dtype=np.float64)
    params.V[...] *= 30.0  # larger embeddings: attention weights far from uniform
    state = new_opt_state(params, ADAGRAD)
    model = TorchAFM(params, idx.shape[1], keep=(1.0, 1.0),
                     l2_attention=est.l2_attention, dtype=torch.float64)
    opt = adagrad(model, est.learning_rate)
    for step in range(2):
        cfg = AFMStepConfig(lr=est.learning_rate, l2=0.0, l2_attention=est.l2_attention,
                            keep_attention=1.0, keep_pooled=1.0, optimizer=ADAGRAD,
                            attention=1, activation=ACTIVATION_CODES["relu"], freeze_fm=0,
                            seed=2016, step=step, n_threads=1)
        loss_ref = ref.afm_step(X, y, rows, params, state, cfg)
        loss_torch = train_step(model, opt, idx, val, yt)
        _compare(out, f"AFM k={k} t={t} attention", step, loss_ref, loss_torch,
                 afm_arrays(model), params)


def worker_check(job):
    """The check's worker: {"results": [one dict a model and step], "rows": count}."""
    import torch

    from torch_models import fixed_width

    torch.sparse.check_sparse_tensor_invariants.disable()
    data = load_dataset(job["data"])
    rows = np.arange(min(256, data.n_rows), dtype=np.int64)
    idx, val = fixed_width(data.indptr, data.indices, data.values)
    idx, val = idx[rows], val[rows].double()
    yt = torch.from_numpy(data.y[rows].astype(np.float64))
    arrays = (data.X, data.y, data.n_features, idx, val, yt)
    out = []
    rng = np.random.default_rng(3)
    _check_fm(out, rows, arrays, rng)
    _check_afm(out, rows, arrays, rng)
    return dict(results=out, rows=len(rows))


def verified(check):
    """True when every step matched, False when one did not or the check failed."""
    return "error" not in check and all(r["max_rel_diff"] < CHECK_TOLERANCE
                                        for r in check["results"])


def print_check(check, set_name):
    """The check's block of the console report."""
    print(f"\nSame-math check, PyTorch (float64) vs afmfast.kernels.reference (float64), "
          f"{set_name}, first {check.get('rows', '?')} rows, dropout off, 2 Adagrad "
          "steps:")
    if "error" in check:
        print(f"  check failed to run: {check['error']}")
        return
    for r in check["results"]:
        print(f"  {r['name']:<22} step {r['step']}: loss ref {r['loss_ref']:.10g} "
              f"torch {r['loss_torch']:.10g}; max relative difference of loss "
              f"and parameters after the step {r['max_rel_diff']:.1e}")
    print("  -> same math" if verified(check) else
          "  -> MISMATCH: the PyTorch figures below are unverified")
