"""afmfast against PyTorch and against the machine's matmul ceiling, side by side in one run.

    python bench/compare.py            # full run: frappe-mini + synthetic ml-tag (2,000,000 rows)
    python bench/compare.py --quick    # 200,000 synthetic rows, fewer epochs/steps
    python bench/compare.py --rows 500000 --epochs 3 --steps 5
    python bench/compare.py --configs afm:16,fm:256 --no-reader
    python bench/compare.py --load 1 [--load-kind afmfast] [--quick] [--load-reps 5]
                            [--load-no-torch]
        # only the fits of frappe-mini, quiet and beside 1 competing process, side by
        # side with their verdicts (bench/fit_times.py; the load: bench/load.py)

Machine-readable figures and the README's tables:

    python bench/compare.py --json results.json          # any run above, plus its JSON
    python bench/compare.py --report results.json        # the README tables, printed
    python bench/compare.py --report results.json --write-readme
        # rewrite them in README.md between <!-- compare:NAME:begin --> and
        # <!-- compare:NAME:end --> (NAME: speed, sets, load), each with the command
        # that produced its JSON; --tables speed,sets picks some; several JSON files
        # may be given (a row comes from the last that has it); a --quick run's
        # figures are refused unless --allow-quick

The JSON holds per data set, configuration and implementation (backend or PyTorch)
every timing and its medians per thread count, the ratios, the speed-up, the probe
readings, the memory figures, and per set the verdicts on the targets (with the
targets themselves), plus the machine, the versions and the command line.

Needs ``pip install ".[bench]"`` (PyTorch, threadpoolctl) for every column; without
PyTorch the PyTorch columns are skipped with a message, without threadpoolctl the BLAS
kernel is reported as unknown. The last line of the output gives the run's duration.
What is measured and how: ``bench/comparison/__init__.py``; the code lives in that
package, this file is its entry point and keeps the names other scripts import from it
(BATCH, make_estimator, synthetic_mltag, frappe_mini_train, build_core_probe,
core_probe).
"""
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # its helper modules, also when loaded by path (tests)
from bench_common import (frappe_mini_train, make_estimator,  # noqa: E402
                          packages_before_bench, synthetic_mltag)
from comparison.probes import build_core_probe, core_probe  # noqa: E402
from comparison.settings import BATCH  # noqa: E402

# the helpers are imported: the folder goes after site-packages again, so that a test
# process that loaded this file by path still imports the ``distributed`` package, not
# bench/distributed.py
packages_before_bench()

__all__ = ["BATCH", "make_estimator", "synthetic_mltag", "frappe_mini_train",
           "build_core_probe", "core_probe", "main"]


def main():
    from comparison.cli import main as run

    run(__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
