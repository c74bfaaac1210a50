"""Late against early epoch time of AFM with its reference settings (the denormal slow-down).

    python bench/denormals.py                          # this checkout's build
    python bench/denormals.py --base /tmp/base         # and a base build, alternately

``afmfast.AFM(n_factors=16, attention_size=16)`` (l2_attention=100, learning_rate=0.1)
on frappe-mini (bench_common.frappe_mini_train), 1 thread, 20 epochs, no early
stopping. Prints per build the seconds of epoch 2 and epoch 20, their ratio (target: at
most 1.15) and the share of attention_W_ that is denormal at the end. Without
flush-to-zero that share grows over the epochs; whether it costs time depends on the
CPU (CPUs that handle a denormal operation in microcode slow down, others do not), so
the ratio is the figure to quote for a given machine. Each build runs in its own process
(``PYTHONPATH=<dir>``); with --base the builds alternate for --repeats rounds, so both
see the same load.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET = 1.15

CHILD = """
import json, sys
import numpy as np
sys.path.insert(0, {bench!r})
import afmfast
from bench_common import frappe_mini_train
model = afmfast.AFM(n_factors=16, attention_size=16, n_epochs={epochs}, n_threads=1,
                    backend={backend!r}, early_stopping=False, verbose=0)
model.fit(frappe_mini_train())
W = model.attention_W_
tiny = np.finfo(W.dtype).tiny
print(json.dumps(dict(file=afmfast.__file__, seconds=[h["seconds"] for h in model.history_],
                      denormal=float(np.mean((W != 0) & (np.abs(W) < tiny))))))
"""


def run(directory, epochs, backend):
    env = dict(os.environ, PYTHONPATH=str(directory))
    code = CHILD.format(bench=str(REPO / "bench"), epochs=epochs, backend=backend)
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=directory,
                          capture_output=True, text=True, check=True)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    if not out["file"].startswith(str(Path(directory).resolve())):
        sys.exit(f"denormals: {directory} imported afmfast from {out['file']}")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", help="directory of a base build to compare with")
    parser.add_argument("--new", default=str(REPO), help="directory of the new build")
    parser.add_argument("--backend", default="cython", choices=("cython", "numba"))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    builds = [("new", args.new)] + ([("base", args.base)] if args.base else [])
    print(f"AFM k=t=16 reference settings, frappe-mini, 1 thread, {args.backend}; "
          f"epoch {args.epochs} / epoch 2 (target <= {TARGET})")
    for _ in range(args.repeats):
        for label, directory in builds:
            r = run(directory, args.epochs, args.backend)
            s = r["seconds"]
            ratio = s[-1] / s[1]
            print(f"  {label:<5} {directory}: epoch 2 {s[1]:.3f} s, epoch {len(s)} "
                  f"{s[-1]:.3f} s, ratio {ratio:.2f} "
                  f"({'met' if ratio <= TARGET else 'NOT met'}); attention_W_ denormal "
                  f"{100 * r['denormal']:.1f}%", flush=True)


if __name__ == "__main__":
    main()
