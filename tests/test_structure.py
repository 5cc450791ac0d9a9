"""The package's shape: no import circle, no project import hidden inside a function, every module importable
on its own. Read from the source with `ast` (what Python would import), so a new module is covered as it lands."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "prefixtuning"

# Imports of the package's own modules allowed inside a function, each with its reason.
LAZY_ALLOWED = {
    # `import prefixtuning` (the config resolvers Hydra needs, the scorer CLI) must not load torch and
    # transformers; the Python API pulls them in when `PrefixTuned` is first used.
    ("__init__.py", "prefixtuning.api"),
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(path: Path, node: ast.ImportFrom) -> list[str]:
    """The package modules an ImportFrom names (`from . import a, b` names modules a and b)."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    if node.level:
        base = package[: len(package) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("prefixtuning"):
        return []
    names = [target]
    for alias in node.names:  # `from .pkg import submodule`
        candidate = f"{target}.{alias.name}"
        if (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").is_file() or \
                (PACKAGE.parent / Path(*candidate.split(".")) / "__init__.py").is_file():
            names.append(candidate)
    return names


def graph() -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """(module -> modules it imports at load time, [(file, line, module) imported inside a function])."""
    edges: dict[str, set[str]] = {}
    lazy = []
    for path in sorted(PACKAGE.rglob("*.py")):
        mod = module_name(path)
        edges.setdefault(mod, set())
        tree = ast.parse(path.read_text(), str(path))
        in_function = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                in_function.update(id(n) for n in ast.walk(fn) if n is not fn)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                targets = resolve(path, node)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("prefixtuning")]
            else:
                continue
            if id(node) in in_function:
                lazy += [(str(path.relative_to(PACKAGE)), node.lineno, t) for t in targets]
            else:
                # importing a child imports its ancestors first, so `from . import sibling` adds no edge to them
                edges[mod].update(t for t in targets if t != mod and not mod.startswith(t + "."))
    return edges, lazy


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


@pytest.mark.fast
def test_the_cycle_finder_finds_a_planted_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.fast
def test_the_package_has_no_import_circle():
    edges, _ = graph()
    assert len(edges) > 40  # every module was read
    assert cycles(edges) == []


@pytest.mark.fast
def test_no_project_import_inside_a_function():
    _, lazy = graph()
    bad = [(f, line, m) for f, line, m in lazy if (f, m) not in LAZY_ALLOWED]
    assert bad == [], "imports of the package inside functions (move them to the top): " + repr(bad)


MODULES = sorted(m for m in graph()[0] if not m.endswith("__main__"))


def test_every_module_imports():
    proc = subprocess.run([sys.executable, "-c", "import importlib\n" + "".join(
        f"importlib.import_module({m!r})\n" for m in MODULES)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports_on_its_own(module):
    """A fresh interpreter per module: an import order that only works after another module is caught
    (about 6 s a module, so in the slow tier; the circle test above is the fast guard)."""
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
