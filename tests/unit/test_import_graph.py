"""kvconnect's modules import each other without a cycle, even lazily inside a function.

The graph is read from the source with ``ast``: every ``import`` / ``from ... import`` at any depth
(module level, inside functions and methods, relative or absolute), plus the modules imported by
name (``importlib.import_module("kvconnect....")`` with a literal, and the registry's tables). An
import under ``if TYPE_CHECKING:`` never runs and is left out. ``from pkg import name`` is an edge
to ``pkg.name`` when that is a module, else to ``pkg`` (its ``__init__``); importing a module is
not counted as importing its parent packages (every package's ``__init__`` would otherwise be in
a cycle with the modules it re-exports).
"""

from __future__ import annotations

import ast
import pathlib

import kvconnect

ROOT = pathlib.Path(kvconnect.__file__).parent


def module_files() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.AST]:
    """Every import statement and call in ``tree`` outside ``if TYPE_CHECKING:`` bodies."""
    found: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            todo.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.Call)):
            found.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return found


def import_graph() -> dict[str, set[str]]:
    """kvconnect module -> the kvconnect modules it imports."""
    files = module_files()

    def owner(name: str) -> str | None:
        """The longest kvconnect module that ``name`` names or lies in."""
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges: set[str | None] = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(owner(a.name) for a in node.names if a.name.split(".")[0] == "kvconnect")
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = (
                    (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
                )
                if target.split(".")[0] != "kvconnect":
                    continue
                for a in node.names:
                    edges.add(f"{target}.{a.name}" if f"{target}.{a.name}" in files else owner(target))
            elif (
                isinstance(node, ast.Call)
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
                and node.args[0].value.startswith("kvconnect.")
                and (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) == "import_module"
            ):
                edges.add(owner(node.args[0].value))
        edges.discard(None)
        edges.discard(mod)
        graph[mod] = edges  # type: ignore[assignment]
    # The registry imports each backend, and its stats module, by name from these tables.
    from kvconnect import registry

    graph["kvconnect.registry"] |= {owner(m) for m, *_ in registry.BACKENDS.values()}  # type: ignore[misc]
    graph["kvconnect.registry"] |= {owner(m) for m in registry.STATS.values()}  # type: ignore[misc]
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (depth-first search, colouring nodes)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_kvconnect_module_imports_one_that_imports_it_back():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or ())


def test_the_graph_sees_function_level_relative_and_by_name_imports():
    graph = import_graph()
    # function-level: the vLLM stats helper imports the registry inside a function
    assert "kvconnect.registry" in graph["kvconnect.adapters.vllm_stats"]
    # ``from kvconnect.multi import MultiScheduler`` is the package, ``from ... import metadata`` the module
    assert {"kvconnect.multi", "kvconnect.multi.metadata"} <= graph["kvconnect.registry"]
    # by name, from the registry's tables
    assert {"kvconnect.backends.nixl", "kvconnect.pd.stats"} <= graph["kvconnect.registry"]


def test_find_cycle_reports_the_cycle_it_finds():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
