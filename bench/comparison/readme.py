"""The README's tables, rendered from the JSON documents of runs, and rewritten in
README.md between marker comments:

    <!-- compare:speed:begin -->   (frappe-mini, one backend, 2 threads: s/epoch, ratio)
    <!-- compare:sets:begin -->    (PyTorch / afmfast and speed-up on both data sets)
    <!-- compare:load:begin -->    (--load: fits quiet and beside competing processes)

each closed by ``<!-- compare:NAME:end -->``. Everything between a pair is replaced by
the table and a line naming the command that produced its figures; the rest of the file
is left as it is. Several documents may be given (a table of both data sets can come
from two runs of ``--configs``): a row is taken from the last document that has it."""
import math
import re
from pathlib import Path

from bench_common import fmt_s, fmt_x

from comparison import document
from comparison.settings import CONFIGS

README = Path(__file__).resolve().parents[2] / "README.md"
SET_PREFIXES = {"frappe-mini": "frappe", "synthetic ml-tag": "synthetic ml-tag"}


def num(value):
    """A figure of a JSON document as a float (null: NaN)."""
    return float("nan") if value is None else float(value)


def ratio_text(x, digits=1):
    return f"{x:.{digits}f}x" if math.isfinite(x) else "-"


def two_digits(x):
    """A ratio with two significant digits ("7.5x", "27x")."""
    if not math.isfinite(x):
        return "-"
    return f"{x:.2g}x" if x < 100 else f"{x:.0f}x"


def model_name(model, k):
    return f"FM k={k}" if model == "fm" else f"AFM k=t={k}"


def markdown(header, rows):
    lines = ["| " + " | ".join(map(str, r)) + " |" for r in [header] + rows]
    lines.insert(1, "|" + "---|" * len(header))
    return "\n".join(lines)


def find(docs, prefix, model, k, impl):
    """The last document's run of (model, k, impl) on the set whose name starts with
    prefix; "best": the afmfast backend fastest at 2 threads. None when none has it."""
    for doc in reversed(docs):
        for data_set in doc.get("sets", ()):
            if not data_set["name"].startswith(prefix):
                continue
            runs = [r for r in data_set["runs"] if (r["model"], r["k"]) == (model, k)
                    and "error" not in r and r["impl"] != "pytorch"
                    and impl in ("best", r["impl"])]
            if runs:
                return min(runs, key=lambda r: num(r["median_s"]["2"]))
    return None


def _pytorch_2t(run):
    return num(run["pytorch_over_this"]["2"]) if run and run["pytorch_over_this"] else math.nan


def _configs(docs):
    seen = [tuple(c) for d in docs for c in d.get("configs", ())]
    return [c for c in CONFIGS if c in seen] + [c for c in dict.fromkeys(seen)
                                                 if c not in CONFIGS]


def speed_table(docs, backend="cython"):
    """frappe-mini at 2 threads: afmfast and PyTorch s/epoch, their ratio, speed-up."""
    rows = []
    for model, k in _configs(docs):
        run = find(docs, "frappe", model, k, backend)
        if run is None:
            continue
        mine = num(run["median_s"]["2"])
        ratio = _pytorch_2t(run)
        rows.append([model_name(model, k), fmt_s(mine), fmt_s(mine * ratio),
                     ratio_text(ratio), fmt_x(num(run["speedup"]))])
    return markdown(["model", "afmfast s/epoch", "PyTorch s/epoch", "PyTorch / afmfast",
                     "2 threads / 1"], rows)


def sets_table(docs, backend="best"):
    """PyTorch / afmfast at 2 threads and afmfast's speed-up, per data set."""
    rows = []
    for model, k in _configs(docs):
        cells = []
        for prefix in SET_PREFIXES.values():
            run = find(docs, prefix, model, k, backend)
            cells += [ratio_text(_pytorch_2t(run)),
                      fmt_x(num(run["speedup"])) if run else "-"]
        rows.append([model_name(model, k)] + cells)
    return markdown(["model", "frappe-mini", "2 threads / 1", "synthetic ml-tag",
                     "2 threads / 1"], rows)


def _load_cells(rows, model, k):
    by_label = {r["impl"]: num(r["mean_s"]) for r in rows if (r["model"], r["k"]) == (model, k)}
    default = by_label.get("afmfast default threads", math.nan)
    one = by_label.get("afmfast 1 thread", math.nan)
    torch2 = by_label.get("PyTorch 2 threads", math.nan)
    return [fmt_s(default), fmt_s(one), fmt_x(default / one), two_digits(torch2 / default)]


def load_table(docs):
    """Seconds per fit (means) of each phase of the last --load document."""
    doc = docs[-1]
    rows = [[model_name(model, k), phase["label"], *_load_cells(phase["rows"], model, k)]
            for model, k in map(tuple, doc["configs"]) for phase in doc["phases"]]
    return markdown(["model", "phase", "default threads", "`n_threads=1`",
                     "default / 1 thread", "PyTorch 2 threads / afmfast default"], rows)


TABLES = {"speed": ("compare", speed_table), "sets": ("compare", sets_table),
          "load": ("load", load_table)}


def provenance(docs):
    """The line under a table: the commands whose JSON gave it, when and where."""
    runs = "; ".join(f"`{d['command']}` ({d['started']}, {d['machine']['cpu']})"
                     for d in docs)
    return f"Generated by `python bench/compare.py --report` from the JSON of {runs}."


def render(name, docs):
    """Table ``name`` with its provenance line, from the documents of its kind (None
    when there is none)."""
    kind, fn = TABLES[name]
    docs = [d for d in docs if d["kind"] == kind]
    if not docs:
        return None
    return fn(docs) + "\n\n" + provenance(docs)


def markers(name):
    return f"<!-- compare:{name}:begin -->", f"<!-- compare:{name}:end -->"


def rewrite(text, name, block):
    """text with everything between table ``name``'s markers replaced by block (a
    KeyError when the markers are not there)."""
    begin, end = markers(name)
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise KeyError(f"no {begin} ... {end} in the README")
    return pattern.sub(lambda m: f"{begin}\n{block}\n{end}", text, count=1)


def report(paths, names=None, readme=None, allow_quick=False):
    """Print the tables renderable from the documents at paths; with readme, write them
    between their markers there instead. A --quick run's figures are not what the README
    quotes: writing them needs allow_quick. Returns the names of the tables rendered."""
    docs = [document.read(p) for p in paths]
    if readme is not None and not allow_quick and any(d["quick"] for d in docs):
        raise ValueError("a --quick run's figures are not for the README "
                         "(--allow-quick to write them anyway)")
    blocks = {n: b for n in (names or TABLES) if (b := render(n, docs)) is not None}
    if readme is None:
        for name, block in blocks.items():
            print(f"{markers(name)[0]}\n{block}\n{markers(name)[1]}\n")
        return list(blocks)
    text = Path(readme).read_text()
    for name, block in blocks.items():
        text = rewrite(text, name, block)
    Path(readme).write_text(text)
    return list(blocks)
