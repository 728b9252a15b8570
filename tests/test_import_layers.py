"""The import graph at module level: imports run down the layers, and no loop joins two packages (the
three distributions, or two of `tessera`'s own packages such as `tessera.api` and `tessera.store`).

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
        # The steps are below the CLI that runs them (torchrun starts `python -m tessera train`).
        or (within(module, "tessera.train") and within(name, "tessera.cli"))
        # The adapter agent and the operator carry no torch: the adapter format is theirs, not the server's.
        or (within(module, "tessera.agent") and within(name, "tessera.serve"))
        or (within(module, "tessera_operator") and (within(name, "tessera.agent") or within(name, "tessera.serve")))
        # The adapter format is below every runtime, and the API below the store's users.
        or (within(module, "tessera.adapter_format") and any(within(name, f"tessera.{above}") for above in (
            "serve", "agent", "publish", "local", "cli")))
        or (within(module, "tessera.api") and not any(within(name, f"tessera.{below}") for below in (
            "api", "errors", "redact", "safe_yaml", "store.uri", "store.keys")))
    ]
    assert upward == []


def package_of(module: str) -> str | None:
    """`tessera.X` for a module of tessera's package or module X; None for the root and its `__main__`."""
    parts = module.split(".")
    if parts[0] != "tessera":
        return parts[0]
    return None if len(parts) == 1 or parts[1] == "__main__" else ".".join(parts[:2])


def test_no_loop_between_tesseras_own_packages() -> None:
    edges: dict[str, set[str]] = {}
    for module, names in module_imports().items():
        for name in names:
            source, target = package_of(module), package_of(name)
            if source and target and source != target:
                edges.setdefault(source, set()).add(target)

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            for following in edges.get(node, ()):
                if following == goal:
                    return True
                if following not in seen:
                    seen.add(following)
                    todo.append(following)
        return False

    loops = sorted(f"{a} <-> {b}" for a, targets in edges.items() for b in targets if reaches(b, a))
    assert loops == []


def test_no_loop_between_the_packages() -> None:
    edges = {(m.split(".")[0], n.split(".")[0]) for m, names in module_imports().items() for n in names}
    edges = {(a, b) for a, b in edges if a != b}
    assert ("tessera", "tessera_operator") not in edges and ("tessera", "tessera_pipelines") not in edges
    assert ("tessera_pipelines", "tessera_operator") not in edges
