"""How the packages may import each other: one direction, no cycles, no private names.

``models`` ← ``tune``; ``models`` ← ``deployments`` ← ``cluster``; ``loadtests``
uses ``models`` and ``deployments``; only ``cluster`` (the command line) may use
``loadtests``. Read from the source with ``ast``: nothing is imported.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("models", "tune", "deployments", "cluster", "loadtests")
MAY_IMPORT = {
    "models": set(),
    "tune": {"models"},
    "deployments": {"models"},
    "loadtests": {"models", "deployments"},
    "cluster": {"models", "tune", "deployments", "loadtests"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imports(path: Path) -> list[tuple[str, str]]:
    """``(module, name)`` of every ``from project.module import name`` (name may be "")."""
    pairs = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            pairs += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            pairs += [(alias.name, "") for alias in node.names]
    return [(m, n) for m, n in pairs if m.split(".")[0] in (*PACKAGES, "ray")]


MODULES = _modules()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_module_imports_only_what_its_package_may_and_no_private_name(module):
    package = module.split(".")[0]
    for imported, name in _imports(MODULES[module]):
        top = imported.split(".")[0]
        if top == "ray":
            assert package != "models", f"{module} imports Ray: models/ is plain PyTorch"
            continue
        assert top == package or top in MAY_IMPORT[package], f"{module} imports {imported}"
        assert not (name.startswith("_") and imported != module), (
            f"{module} imports the private {imported}.{name}"
        )


def test_there_is_no_import_cycle():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for imported, name in _imports(path):
            for candidate in (f"{imported}.{name}", imported):
                if candidate in MODULES and candidate != module:
                    if not module.startswith(candidate + "."):  # a package's own __init__
                        graph[module].add(candidate)
                    break
    # Depth-first search for a back edge.
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail, node, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
