"""Fixtures for the operator tests: a simulated cluster per module, the real operator per test.

What stands in for what is said in tests/operator/harness.py, emulator.py and controllers.py.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.operator.harness import OperatorProcess, SimulatedCluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatedCluster]:
    simulated = SimulatedCluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield simulated
    finally:
        simulated.stop()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLaMA base model, built locally (nothing downloads)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tessera.model.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def namespace(cluster: SimulatedCluster) -> str:
    """A namespace of its own for each test, with the WorkflowTemplate installed as the chart does."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.apply_workflow_template(name)
    return name


@pytest.fixture
def operator(cluster: SimulatedCluster, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    process = OperatorProcess(cluster, [namespace], tmp_path / "operator.log").start()
    try:
        yield process
    finally:
        process.stop()
