"""The import graph at module level: imports run down the layers and no loop joins the three packages.

Read from the source with `ast` (imports inside functions are lazy on purpose and left out), so the
test needs none of the heavy dependencies.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"tessera": ROOT / "platform" / "tessera", "tessera_operator": ROOT / "operators",
            "tessera_pipelines": ROOT / "pipelines"}


def module_imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for package, base in PACKAGES.items():
        for path in base.rglob("*.py"):
            parts = [package, *path.relative_to(base).with_suffix("").parts]
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found: set[str] = set()
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                    continue
                for item in ast.walk(node) if isinstance(node, (ast.Import, ast.ImportFrom, ast.Try, ast.If)) else ():
                    if isinstance(item, ast.Import):
                        found |= {alias.name for alias in item.names}
                    elif isinstance(item, ast.ImportFrom) and item.module and item.level == 0:
                        found |= {item.module} | {f"{item.module}.{alias.name}" for alias in item.names}
            graph[module] = {name for name in found if name.split(".")[0] in PACKAGES}
    return graph


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_imports_run_down_the_layers() -> None:
    upward = [
        f"{module} -> {name}"
        for module, names in module_imports().items() for name in names
        if (within(module, "tessera.tasks") and within(name, "tessera.evaluate"))
        or (within(module, "tessera.serve.runtime") and within(name, "tessera.serve.http"))
        or (within(module, "tessera") and not within(name, "tessera"))
    ]
    assert upward == []


def test_no_loop_between_the_packages() -> None:
    edges = {(m.split(".")[0], n.split(".")[0]) for m, names in module_imports().items() for n in names}
    edges = {(a, b) for a, b in edges if a != b}
    assert ("tessera", "tessera_operator") not in edges and ("tessera", "tessera_pipelines") not in edges
    assert ("tessera_pipelines", "tessera_operator") not in edges
