"""Module structure: no import cycle among the project's modules, no oversized source file.

Imports are read with ``ast``, without importing anything, so a cycle hidden in a function body
(a "lazy" import) counts like a top-level one: it still ties the two modules together.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("mimo_jax", "pallas_kernels")
# Directories whose Python sources must stay readable in one sitting, besides the top-level
# scripts (main.py and its process setup).
SOURCES = ("mimo_jax", "pallas_kernels", "bench", "tests", "configs", "notebooks")
MAX_LINES = 600


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_modules() -> dict[str, pathlib.Path]:
    """{dotted module name: file} of every module in the project packages."""
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: pathlib.Path, modules: set[str]) -> set[str]:
    """Project modules that ``name`` imports anywhere in its source (function bodies included).

    ``from pkg import x`` counts as importing the submodule ``pkg.x`` when there is one, else
    ``pkg`` itself. The implicit import of a parent package's ``__init__`` is not counted: it is
    the same for every module of the package and cannot be avoided.
    """
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                package = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _project_modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Per strongly connected component: one cycle through it (a path back to its start), then
    every module of the component (breaking that one cycle may leave others among them)."""
    index, low, stack, on_stack, sccs = {}, {}, [], set(), []

    def visit(v):  # Tarjan's algorithm; the graph is a few dozen modules, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(set(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for scc in sccs:
        start = min(scc)
        path, seen = [start], {start: 0}
        while True:  # walk inside the component until a module repeats
            nxt = min(w for w in graph[path[-1]] if w in scc)
            if nxt in seen:
                cycles.append(path[seen[nxt] :] + [nxt] + [f"(component: {sorted(scc)})"])
                break
            seen[nxt] = len(path)
            path.append(nxt)
    return cycles


def test_cycle_finder_sees_a_function_local_import(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c", "a", "(component: ['a', 'b', 'c'])"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    lazy = tmp_path / "m.py"
    lazy.write_text("def f():\n    from pkg import n  # noqa\n    import pkg.o\n")
    assert _imports("pkg.m", lazy, {"pkg", "pkg.m", "pkg.n", "pkg.o"}) == {"pkg.n", "pkg.o"}
    lazy.write_text("from . import n\nfrom .o import x\nfrom pkg import something\n")
    assert _imports("pkg.m", lazy, {"pkg", "pkg.m", "pkg.n", "pkg.o"}) == {"pkg", "pkg.n", "pkg.o"}


def test_no_import_cycles():
    graph = _graph()
    assert "mimo_jax.model" in graph and "pallas_kernels.xla" in graph
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_source_file_over_600_lines():
    files = sorted(ROOT.glob("*.py")) + [p for s in SOURCES for p in (ROOT / s).rglob("*.py")]
    assert ROOT / "main.py" in files
    long = {
        str(p.relative_to(ROOT)): n
        for p in files
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines (split them by concept): {long}"
