"""Run the real helm binaries on charts/tessera and read back what they render.

`scripts/fetch-tools.sh` puts Helm 3 at `.tools/bin/helm` (and Helm 4 at `.tools/bin/helm4`);
a test that needs a binary that is not there is skipped with the reason, never passed.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "tessera"
RELEASE = "tessera"
NAMESPACE = "tessera-system"


def helm_path(name: str) -> str | None:
    """The helm binary called `name` in .tools/bin, else on PATH, else None."""
    local = REPO / ".tools" / "bin" / name
    return str(local) if local.is_file() else shutil.which(name)


def require_helm(name: str = "helm") -> str:
    binary = helm_path(name)
    if binary is None:
        pytest.skip(f"{name} is not in .tools/bin nor on PATH (scripts/fetch-tools.sh installs it)")
    return binary


def run_helm(binary: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60, check=False)


def _values_args(values: dict[str, Any] | None) -> list[str]:
    # --set-json keeps every type (lists, maps, booleans) exactly as the test wrote it.
    return [arg for key, value in (values or {}).items() for arg in ("--set-json", f"{key}={json.dumps(value)}")]


def template(
    values: dict[str, Any] | None = None, *extra: str, binary: str = "helm"
) -> subprocess.CompletedProcess[str]:
    """`helm template` of the chart with `values` given as dotted keys (`operator.replicas`)."""
    return run_helm(require_helm(binary), "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                    "--include-crds", *_values_args(values), *extra)


def lint(values: dict[str, Any] | None = None, binary: str = "helm") -> subprocess.CompletedProcess[str]:
    return run_helm(require_helm(binary), "lint", "--strict", str(CHART), "--namespace", NAMESPACE,
                    *_values_args(values))


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key twice in one mapping, as `kubectl apply` does."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        duplicates = sorted({str(k) for k in keys if keys.count(k) > 1})
        if duplicates:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {duplicates}", node.start_mark)
        return super().construct_mapping(node, deep=deep)


def documents(text: str) -> list[dict[str, Any]]:
    """The YAML documents of `text`; a mapping with a key twice is an error."""
    return [doc for doc in yaml.load_all(text, Loader=_UniqueKeyLoader) if doc]  # noqa: S506 (a SafeLoader)


@functools.cache
def _render_cached(values_json: str, extra: tuple[str, ...], binary: str) -> str:
    result = template(json.loads(values_json), *extra, binary=binary)
    assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
    return result.stdout


def render(values: dict[str, Any] | None = None, *extra: str, binary: str = "helm") -> list[dict[str, Any]]:
    """The documents the chart renders for `values` (cached: every test gets a fresh copy)."""
    return documents(_render_cached(json.dumps(values or {}, sort_keys=True), extra, binary))


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]
