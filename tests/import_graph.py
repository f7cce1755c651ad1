"""The package's static import graph, as tests/test_architecture.py checks it.

Every ``import multiembed.X`` / ``from multiembed.X import name`` of every module, at any depth (function-level
imports too), is an edge; ``from multiembed.a import b`` names the module ``multiembed.a.b`` when that is a module.

Run as a script, it prints the sizes a reader must hold::

    python tests/import_graph.py
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

REPO = Path(__file__).resolve().parents[1]
# The installed sub-packages (pyproject's package-dir) and torchx's component file.
LAYERS = (
    "runtime", "data", "config", "models", "sharding", "collapse", "training", "serving", "analysis", "cli",
    "benchmarks",
)


@dataclass(frozen=True)
class Import:
    """One import statement's target inside the package.

    Attributes:
        line: the statement's line number.
        module: the imported module's dotted name (``multiembed.data.vocab``).
        names: the names a ``from`` import binds from that module (empty for ``import``).
    """

    line: int
    module: str
    names: Tuple[str, ...] = ()


@dataclass
class ModuleInfo:
    """A source file of the package.

    Attributes:
        name: the dotted module name (``multiembed.models`` for ``models/__init__.py``).
        path: the file.
        imports: its imports of other package modules.
        lines: its line count.
        functions: ``(qualified name, line count)`` of each function and method.
    """

    name: str
    path: Path
    imports: List[Import] = field(default_factory=list)
    lines: int = 0
    functions: List[Tuple[str, int]] = field(default_factory=list)


def module_name(path: Path) -> str:
    """The dotted name ``path`` installs as (``data/vocab.py`` -> ``multiembed.data.vocab``)."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["multiembed", *parts]) if parts[0] in LAYERS else ".".join(parts)


def _source_files() -> Iterator[Path]:
    for layer in LAYERS:
        yield from sorted((REPO / layer).rglob("*.py"))
    yield REPO / "torchx_components.py"


def _raw_imports(tree: ast.AST) -> Iterator[Import]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("multiembed."):
                    yield Import(node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("multiembed."):
                yield Import(node.lineno, node.module, tuple(alias.name for alias in node.names))


def _functions(tree: ast.AST, prefix: str = "") -> Iterator[Tuple[str, int]]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node.end_lineno - node.lineno + 1
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")


def load() -> Dict[str, ModuleInfo]:
    """Every module of the package by dotted name, with its imports resolved to modules."""
    modules: Dict[str, ModuleInfo] = {}
    for path in _source_files():
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text, filename=str(path))
        info = ModuleInfo(module_name(path), path, list(_raw_imports(tree)), len(text.splitlines()),
                          list(_functions(tree)))
        modules[info.name] = info
    for info in modules.values():
        resolved = []
        for imp in info.imports:
            submodules = [name for name in imp.names if f"{imp.module}.{name}" in modules]
            plain = tuple(name for name in imp.names if name not in submodules)
            resolved += [Import(imp.line, f"{imp.module}.{name}") for name in submodules]
            if plain or not imp.names:
                resolved.append(Import(imp.line, imp.module, plain))
        info.imports = resolved
    return modules


def _discovered(name: str, info: ModuleInfo, modules: Dict[str, ModuleInfo]) -> Set[str]:
    """The submodules a package's ``__init__`` imports by listing itself (``pkgutil.iter_modules(__path__)``)."""
    if info.path.name != "__init__.py" or "pkgutil.iter_modules(__path__)" not in info.path.read_text("utf-8"):
        return set()
    return {other for other in modules if other.rpartition(".")[0] == name}


def edges(modules: Dict[str, ModuleInfo]) -> Dict[str, Set[str]]:
    """Module -> the package modules it imports (itself excluded), discovered submodules included."""
    return {
        name: {imp.module for imp in info.imports if imp.module in modules and imp.module != name}
        | _discovered(name, info, modules)
        for name, info in modules.items()
    }


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for child in sorted(graph.get(node, ())):
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in on_stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def private_imports(modules: Dict[str, ModuleInfo]) -> List[str]:
    """``file:line imports module._name`` for each underscore name imported from another module of the package."""
    found = []
    for name, info in sorted(modules.items()):
        for imp in info.imports:
            private = [n for n in imp.names if n.startswith("_") and not n.startswith("__")]
            private_module = any(part.startswith("_") and not part.startswith("__") for part in imp.module.split("."))
            if imp.module != name and (private or private_module):
                what = ", ".join(f"{imp.module}.{n}" for n in private) or imp.module
                found.append(f"{info.path.relative_to(REPO)}:{imp.line} imports {what}")
    return found


def closure(graph: Dict[str, Set[str]], start: str) -> Set[str]:
    """``start`` and every module it imports, directly or not, with each one's package ``__init__``s."""
    seen: Set[str] = set()
    todo = [start]
    while todo:
        node = todo.pop()
        if node in seen or node not in graph:
            continue
        seen.add(node)
        todo.extend(graph[node])
        parts = node.split(".")
        todo.extend(".".join(parts[:i]) for i in range(2, len(parts)))
    return seen


def _longest(items: List[Tuple[str, int]]) -> Optional[Tuple[str, int]]:
    return max(items, key=lambda item: item[1]) if items else None


def main() -> int:
    modules = load()
    graph = edges(modules)
    for command in ("train", "predict"):
        reached = closure(graph, f"multiembed.cli.{command}")
        lines = sum(modules[name].lines for name in reached)
        print(f"multiembed {command}: {len(reached)} modules, {lines} lines")
    found = cycles(graph)
    print(f"import cycles: {len(found)}")
    for component in found:
        print("  " + " <-> ".join(component))
    private = private_imports(modules)
    names = sum(line.count(", ") + 1 for line in private)
    print(f"private imports: {names} names in {len(private)} statements")
    for line in private:
        print("  " + line)
    files = [(str(info.path.relative_to(REPO)), info.lines) for info in modules.values()]
    functions = [(f"{info.path.relative_to(REPO)}:{fn}", n) for info in modules.values() for fn, n in info.functions]
    print("longest file: {} ({} lines)".format(*_longest(files)))
    print("longest function: {} ({} lines)".format(*_longest(functions)))
    over_80 = sum(1 for _, n in functions if n > 80)
    print(f"functions over 80 lines: {over_80} of {len(functions)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
