"""The JSON document of a run: what every run records (the command line, the machine,
the versions, the targets), and writing it without NaN (JSON has none: null)."""
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench_common import afmfast, cpu_description, torch_available

from comparison import targets
from comparison.figures import finite_or_none

SCHEMA = "afmfast-compare/1"


def command_line():
    """The command as typed, relative to the repository: what the README quotes."""
    return "python bench/compare.py" + "".join(" " + shlex.quote(a) for a in sys.argv[1:])


def uptime():
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def machine_info():
    has_torch, torch_info = torch_available()
    return dict(cpu=cpu_description(), cpus=os.cpu_count(), platform=platform.platform(),
                python=platform.python_version(), numpy=np.__version__,
                afmfast=afmfast.__version__, afmfast_path=str(Path(afmfast.__file__).parent),
                torch=torch_info if has_torch else None, uptime_start=uptime(),
                uptime_end=None)


def new_document(kind, args, backends, has_torch):
    """A run's document before its figures: kind "compare" or "load"."""
    return dict(schema=SCHEMA, kind=kind, command=command_line(), argv=sys.argv[1:],
                quick=bool(args.quick), started=time.strftime("%Y-%m-%d %H:%M:%S"),
                machine=machine_info(), targets=targets.as_data(), backends=backends,
                has_torch=has_torch)


def finish(doc, started):
    """The run's end: the load then and its duration."""
    doc["machine"]["uptime_end"] = uptime()
    doc["duration_s"] = time.perf_counter() - started


def write(doc, path):
    """The document as JSON at path (nothing without a path)."""
    if path:
        Path(path).write_text(json.dumps(finite_or_none(doc), indent=1) + "\n")


def read(path):
    doc = json.loads(Path(path).read_text())
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a bench/compare.py document ({doc.get('schema')!r})")
    return doc
