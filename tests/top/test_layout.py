"""The package's architecture, checked from its sources: the folders are the layers and
imports run one way (cli, demo and plotting -> models -> data -> kernels), with no import
cycle among afmfast's modules (counting imports inside functions too), and no Python
source file over 1,000 lines."""
import ast
import re
from pathlib import Path

import afmfast
from helpers.paths import REPO

PACKAGE = Path(afmfast.__file__).resolve().parent
# What each layer may import besides itself; the compiled extensions (afmfast._fm_cython,
# _afm_cython, _reader, _cpu, _build_config) belong to the kernel layer.
LAYERS = {
    "version": set(),
    "kernels": {"kernels", "version"},
    "data": {"data", "kernels"},
    "metrics": set(),
    "models": {"models", "data", "kernels", "metrics"},
    "top": {"top", "models", "data", "kernels", "metrics", "version"},
}
COMPILED = {"_fm_cython", "_afm_cython", "_reader", "_cpu", "_build_config"}


def module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(name):
    parts = name.split(".")
    if len(parts) == 1:
        return "top"
    if parts[1] in COMPILED:
        return "kernels"
    if parts[1] == "_version":
        return "version"
    return parts[1] if parts[1] in LAYERS else "top"


def imports(path, modules):
    """The afmfast modules that the file at ``path`` imports, anywhere in it."""
    found = set()
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):  # imports for type checkers only never run
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("afmfast")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.startswith("afmfast"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules or alias.name in COMPILED else node.module)
        assert not (isinstance(node, ast.ImportFrom) and node.level), \
            f"{path}: relative import; afmfast's modules import each other by full name"
    return found


def graph():
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in files} | {f"afmfast.{c}" for c in COMPILED}
    return {module_name(p): imports(p, modules) - {module_name(p)} for p in files}


def wrong_directions(deps):
    """The imports of ``deps`` ({module: modules it imports}) that go against LAYERS."""
    return [f"{src} ({layer(src)}) imports {dst} ({layer(dst)})"
            for src, targets in deps.items() for dst in targets
            if dst != "afmfast" and layer(dst) not in LAYERS[layer(src)] | {layer(src)}]


def import_cycles(deps):
    """The cycles that a depth-first walk of ``deps`` meets, each as a list of modules."""
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(deps.get(node, ())):
            if nxt == "afmfast" or nxt not in deps:
                continue
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(deps):
        if node not in state:
            visit(node)
    return cycles


def test_imports_run_one_way_between_layers():
    wrong = wrong_directions(graph())
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_the_package_root():
    # afmfast/__init__ imports every layer: a module that imports it closes a cycle
    assert not [src for src, deps in graph().items() if "afmfast" in deps and src != "afmfast"]


def test_no_import_cycle():
    cycles = import_cycles(graph())
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_see_a_cycle_and_a_wrong_direction():
    # the checks above must be able to fail: a fake edge kernels -> models is both
    fake = graph()
    fake["afmfast.kernels.api"] = fake["afmfast.kernels.api"] | {"afmfast.models.base"}
    assert any("afmfast.kernels.api (kernels) imports afmfast.models.base" in line
               for line in wrong_directions(fake))
    assert any("afmfast.kernels.api" in cycle for cycle in import_cycles(fake))


def test_no_python_source_over_1000_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 1000}
    assert not long, long


#: a measured figure or a date in the code goes stale unseen: figures live in docs/ and
#: the README, with the command that gives them
FIGURE = re.compile(r"\b\d+(\.\d+)? ?(ms|µs|us|ns|GB/s|MB/s|GFLOP/s)\b|\btook \d"
                    r"|\b20\d\d-\d\d-\d\d\b|\b\d+(\.\d+)?x (faster|slower)\b")


def test_no_timing_figures_or_dates_in_the_sources():
    sources = [*(REPO / "src" / "afmfast").rglob("*.py"),
               *(p for p in (REPO / "csrc").iterdir()
                 if p.suffix in (".pyx", ".pxd", ".pxi", ".h") or p.name == "_cpu.c")]
    found = [f"{p.relative_to(REPO)}:{n}: {line.strip()}" for p in sources
             for n, line in enumerate(p.read_text().splitlines(), 1) if FIGURE.search(line)]
    assert len(sources) > 20 and not found, found
