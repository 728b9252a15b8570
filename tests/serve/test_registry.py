"""The adapter registry's ordering of state changes, driven without a model: a reload of an evicted
adapter whose fetch is slow must never install over a newer version loaded meanwhile.

The engine is a recorder of installs (the real one runs them between steps on its thread); the
store fetch is replaced by one that waits on an event, so the race is driven, not hoped for."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future

import pytest
from tessera.serve.runtime.adapters import PreparedAdapter, ServedBase
from tessera.serve.runtime.registry import MAX_UNLOADED_RECORDS, AdapterRegistry


class RecordingEngine:
    """Stands in for `Engine`: installs happen at once and are recorded in order."""

    def __init__(self, reloader) -> None:
        self.reloader = reloader
        self.installed: list[tuple[str, str]] = []  # (name, version the weights are)
        self.failed: list[str] = []

    @staticmethod
    def _done() -> Future:
        future: Future = Future()
        future.set_result(None)
        return future

    def install(self, name: str, weights: str) -> Future:
        self.installed.append((name, weights))
        return self._done()

    def remove(self, name: str) -> Future:
        return self._done()

    def fail_adapter(self, name: str, error) -> Future:
        self.failed.append(name)
        return self._done()


@pytest.fixture
def registry(tmp_path):
    for version in ("v1", "v2"):
        (tmp_path / version).mkdir()
    base = ServedBase(name="tiny", architecture=None, vocab_size=8, linear_shapes={})
    registry = AdapterRegistry(RecordingEngine, base, max_rank=16, allowed_prefixes=[str(tmp_path)],
                               cache_dir=tmp_path)
    engine = registry.engine
    gate = threading.Event()
    entered = threading.Event()

    def prepare(name, source, sha256, task):
        version = source.rsplit("/", 1)[-1]
        if version == "v1" and engine.installed:  # the first load of v1 is quick, its reload waits
            entered.set()
            assert gate.wait(30), "the test never opened the gate"
        return PreparedAdapter(name, source, f"sha-{version}", 8, None, None, weights=version)

    registry._prepare = prepare
    yield registry, engine, gate, entered, tmp_path
    registry.close()


def test_a_stale_reload_never_overwrites_an_in_place_load(registry):
    registry, engine, gate, entered, root = registry

    async def drive():
        await registry.load("x", str(root / "v1"))
        assert registry.request_reload("x")  # as the engine asks when x was evicted
        await asyncio.to_thread(entered.wait, 30)  # the reload's fetch of v1 is under way
        await registry.load("x", str(root / "v2"), inplace=True)
        gate.set()
        for reload in registry.reloads_in_flight():
            await asyncio.wrap_future(reload)

    asyncio.run(drive())
    assert engine.installed == [("x", "v1"), ("x", "v2")]  # the stale v1 was discarded, not installed
    assert registry.get("x").sha256 == "sha-v2" and not engine.failed


def test_a_reload_that_ends_first_is_installed_and_then_replaced(registry):
    registry, engine, gate, entered, root = registry

    async def drive():
        await registry.load("x", str(root / "v1"))
        gate.set()
        assert registry.request_reload("x")
        for reload in registry.reloads_in_flight():
            await asyncio.wrap_future(reload)
        await registry.load("x", str(root / "v2"), inplace=True)

    asyncio.run(drive())
    assert engine.installed == [("x", "v1"), ("x", "v1"), ("x", "v2")]
    assert registry.get("x").sha256 == "sha-v2"


def test_a_reload_of_an_unloaded_adapter_is_discarded(registry):
    registry, engine, gate, entered, root = registry

    async def drive():
        await registry.load("x", str(root / "v1"))
        assert registry.request_reload("x")
        await asyncio.to_thread(entered.wait, 30)
        await registry.unload("x")
        gate.set()
        for reload in registry.reloads_in_flight():
            await asyncio.wrap_future(reload)

    asyncio.run(drive())
    assert engine.installed == [("x", "v1")] and registry.get("x") is None


def test_names_full_match_and_records_of_unloaded_adapters_are_bounded(registry):
    from tessera.serve.errors import ServeError

    registry, engine, gate, entered, root = registry

    async def drive():
        with pytest.raises(ServeError) as caught:
            await registry.load("dup\n", str(root / "v2"))
        assert caught.value.code == "invalid_name"
        for i in range(MAX_UNLOADED_RECORDS + 5):
            await registry.load(f"n{i}", str(root / "v2"))
            await registry.unload(f"n{i}")

    asyncio.run(drive())
    assert len(registry.unloaded) == MAX_UNLOADED_RECORDS and "n0" not in registry.unloaded
    assert f"n{MAX_UNLOADED_RECORDS + 4}" in registry.unloaded and not registry._name_locks
