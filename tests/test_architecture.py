"""The package's shape: no import cycle, and only the factory names a storage backend.

Imports are read from the source (module level and inside functions alike; ``if TYPE_CHECKING:``
blocks left out, since they never run), so an import moved into a function to dodge a cycle still
counts as one.
"""
from __future__ import annotations

import ast
from pathlib import Path

import morag_remote

PACKAGE = Path(morag_remote.__file__).parent
BACKENDS = ("morag_remote.store.files", "morag_remote.store.postgres")
FACTORY = "morag_remote.store.factory"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            stack.append(child)


def imports_of(name: str) -> set[str]:
    """The package's modules that module ``name`` imports at run time."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            base = f"{base}.{node.module}" if node.level and node.module else (base if node.level else node.module)
            submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
            # ``from pkg import module`` imports the module; ``from pkg import name`` imports pkg
            targets = submodules if len(submodules) == len(node.names) else [base, *submodules]
        found.update(t for t in targets if t in MODULES and t != name)
    return found


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {name: imports_of(name) for name in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return components


def test_the_package_has_no_import_cycle():
    assert _cycles() == []


def test_the_walker_sees_imports_inside_functions_and_skips_type_checking_blocks():
    assert "morag_remote.store.postgres" in imports_of(FACTORY)  # imported inside open_backend
    assert "morag_remote.service" not in imports_of("morag_remote.context")  # TYPE_CHECKING only


def test_only_the_factory_and_the_backends_themselves_import_a_backend():
    offenders = {}
    for name in MODULES:
        if name == FACTORY or name.startswith(BACKENDS):
            continue
        named = {m for m in imports_of(name) if m.startswith(BACKENDS)}
        if named:
            offenders[name] = sorted(named)
    assert offenders == {}


def test_a_backend_never_imports_the_other():
    files, postgres = BACKENDS
    for name in MODULES:
        if name.startswith(files):
            assert not any(m.startswith(postgres) for m in imports_of(name)), name
        if name.startswith(postgres):
            assert not any(m.startswith(files) for m in imports_of(name)), name


def test_the_client_and_the_worker_import_no_server_module():
    def inside(name: str, packages: tuple[str, ...]) -> bool:
        return any(name == p or name.startswith(p + ".") for p in packages)

    allowed = ("morag_remote.client", "morag_remote.worker", "morag_remote.version")
    for name in MODULES:
        if inside(name, ("morag_remote.client", "morag_remote.worker")):
            server = sorted(m for m in imports_of(name) if not inside(m, allowed))
            assert server == [], f"{name} imports {server}"
