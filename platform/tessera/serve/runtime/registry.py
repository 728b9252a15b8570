"""The adapters a server can serve: loading beside serving, unloading, and reloading on demand.

Fetching an adapter from the store and checking it run on a loader thread; only the final
install runs on the engine thread, between two steps, so requests to other adapters never wait
for a download or fail because of a bad adapter. The registry remembers where every adapter came
from, so one the engine evicted (LRU, capacity `max_loras`) is fetched again when asked for.

Every change of an adapter's state (load, in-place load, reload, unload) installs under the
name's lock, and a reload carries the version (`AdapterRecord.int_id`) it was asked for: one that
finds a newer version registered when its fetch ends is discarded, so a slow fetch of an old
version can never overwrite the version the registry lists.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from tessera.adapter_format import check_allowed, store_refusals
from tessera.safe_yaml import safe_load
from tessera.scratch import scratch_dir
from tessera.serve import metrics
from tessera.serve.errors import ServeError, repository_model_not_found
from tessera.serve.runtime.adapters import (
    ADAPTER_NAME,
    AdapterError,
    PreparedAdapter,
    ServedBase,
    adapter_refusals,
    prepare_adapter,
)
from tessera.serve.runtime.engine import AdapterReloader, Engine

log = logging.getLogger(__name__)

# Unloaded adapters whose origin is remembered for KServe's repository `load` (the most recent ones).
MAX_UNLOADED_RECORDS = 256


class AdapterSource(BaseModel):
    """One entry of the start-up adapters file (a mounted ConfigMap): JSON or YAML list of these."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=ADAPTER_NAME.pattern)
    path: str = Field(min_length=1, description="Store URI or directory of the PEFT adapter.")
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    task: str | None = None


def read_adapters_file(path: Path) -> list[AdapterSource]:
    """Parse the adapters file; a bad file is refused whole, naming each bad entry."""
    try:
        data = safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise AdapterError(f"cannot read adapters file {path}: {error}", code="adapters_file_invalid") from None
    if isinstance(data, dict) and "adapters" in data:
        data = data["adapters"]
    try:
        return TypeAdapter(list[AdapterSource]).validate_python(data or [])
    except ValidationError as error:
        lines = [f"[{'.'.join(str(p) for p in e['loc'])}]: {e['msg']}" for e in error.errors()]
        raise AdapterError(
            f"adapters file {path} is invalid: " + "; ".join(lines), code="adapters_file_invalid"
        ) from None


@dataclass
class AdapterRecord:
    name: str
    source: str
    sha256: str  # of the weights actually loaded: a reload must find the same version
    rank: int
    task: str | None
    base_model: str | None
    int_id: int  # vLLM's lora_int_id: a new one for every load, so also the version that orders state changes
    loaded_at: float = field(default_factory=time.time)


def already_loaded(name: str) -> ServeError:
    """vLLM's answer to loading a name it serves without `load_inplace`."""
    return ServeError(f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, "
                      "set 'load_inplace' to True.", code="already_loaded", param="lora_name", type="InvalidUserInput")


def not_loaded(name: str | int) -> ServeError:
    """vLLM's answer to unloading an adapter it does not serve."""
    return ServeError(f"The lora adapter '{name}' cannot be found.", status=404, code="lora_not_found",
                      param="lora_name", type="NotFoundError")


@dataclass
class _NameLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class AdapterRegistry:
    """The adapters served, by name. The registry brings back what the engine evicts, so it builds the
    engine it serves with itself as the reloader: `make_engine(reloader)` (both are wired once, here)."""

    def __init__(
        self,
        make_engine: Callable[[AdapterReloader], Engine],
        base: ServedBase,
        *,
        max_rank: int,
        allowed_prefixes: list[str],
        cache_dir: Path,
    ) -> None:
        self.base = base
        self.max_rank = max_rank
        self.allowed_prefixes = allowed_prefixes
        self.cache_dir = cache_dir
        self.records: dict[str, AdapterRecord] = {}
        # Where the most recently unloaded adapters came from, so KServe's repository `load` can bring
        # one back by name; bounded, since names come from callers.
        self.unloaded: OrderedDict[str, AdapterRecord] = OrderedDict()
        self._ids = itertools.count(1)
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tessera-loader")
        self._name_locks: dict[str, _NameLock] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # the server's, known from the first load
        self._reloads: set[Future] = set()
        self.engine = make_engine(self)  # last: the engine may call back into a complete registry

    def get(self, name: str) -> AdapterRecord | None:
        return self.records.get(name)

    def _prepare(self, name: str, source: str, sha256: str | None, task: str | None) -> PreparedAdapter:
        from tessera.store import fetch

        with scratch_dir("adapter", self.cache_dir) as workdir:
            with adapter_refusals(), store_refusals(source):
                directory = fetch(source, workdir)
            if not directory.is_dir():
                raise AdapterError(f"lora_path {source!r} is a file; give the adapter directory",
                                   code="adapter_corrupt")
            try:
                return prepare_adapter(
                    name, source, directory, self.base, max_rank=self.max_rank, expected_sha256=sha256, task=task
                )
            except (OSError, ValueError, RuntimeError) as error:  # unreadable files the checks did not foresee
                raise AdapterError(f"cannot read the adapter at {source!r}: {error}", code="adapter_corrupt") from None

    async def load(self, name: str, source: str, sha256: str | None = None, task: str | None = None,
                   *, inplace: bool = False) -> AdapterRecord:
        """Fetch, check and install an adapter; a name already served is refused unless `inplace`
        (vLLM's `load_inplace`), which replaces it with no gap in serving."""
        if not ADAPTER_NAME.fullmatch(name):  # `match` would take a name with a final newline
            raise ServeError(
                f"invalid lora_name {name!r}: use letters, digits, '.', '_', ':' or '-' (at most 128)",
                code="invalid_name", param="lora_name",
            )
        started = time.perf_counter()
        self._loop = asyncio.get_running_loop()
        try:
            async with self._lock(name):
                if name in self.records and not inplace:  # vLLM's first check, before the path's
                    raise already_loaded(name)
                # The checked location is what is fetched, now and on every reload: never `source` again.
                with adapter_refusals():
                    checked = check_allowed(source, self.allowed_prefixes)
                # A local adapter keeps a plain path, as vLLM's model cards show `root`.
                location = str(checked) if checked.is_remote else str(checked.path)
                loop = asyncio.get_running_loop()
                prepared = await loop.run_in_executor(self._executor, self._prepare, name, location, sha256, task)
                await asyncio.wrap_future(self.engine.install(name, prepared.weights))
                record = AdapterRecord(name, location, prepared.sha256, prepared.rank, prepared.task,
                                       prepared.base_model, next(self._ids))
                self.records[name] = record
                self.unloaded.pop(name, None)
                metrics.ADAPTERS_REGISTERED.set(len(self.records))
        except ServeError as error:
            metrics.ADAPTER_LOAD_FAILURES.labels(error.code).inc()
            metrics.ADAPTER_LOAD_SECONDS.labels("failed").observe(time.perf_counter() - started)
            log.warning("refused adapter %s from %s: %s", name, source, error.message)
            raise error from None
        metrics.ADAPTER_LOAD_SECONDS.labels("loaded").observe(time.perf_counter() - started)
        log.info("loaded adapter %s (rank %d) from %s in %.3fs", name, record.rank, source,
                 time.perf_counter() - started)
        return record

    def named(self, name: str | None, int_id: int | None) -> str:
        """The served adapter a vLLM unload request means: by `lora_name`, or by `lora_int_id` alone."""
        if name is None and int_id is None:
            raise ServeError("either 'lora_name' and 'lora_int_id' needs to be provided.", param="lora_name",
                             code="invalid_request", type="InvalidUserInput")
        if name is None:
            name = next((r.name for r in self.records.values() if r.int_id == int_id), None)
        record = self.records.get(name) if name is not None else None
        if record is None or (int_id is not None and record.int_id != int_id):
            raise not_loaded(name if name is not None else int_id)
        return record.name

    async def unload(self, name: str) -> None:
        """Stop serving `name` everywhere (every protocol reads this registry)."""
        async with self._lock(name):
            record = self.records.pop(name, None)
            if record is None:
                raise not_loaded(name)
            self.unloaded[name] = record
            while len(self.unloaded) > MAX_UNLOADED_RECORDS:
                self.unloaded.popitem(last=False)
            await asyncio.wrap_future(self.engine.remove(name))
            metrics.ADAPTERS_REGISTERED.set(len(self.records))
            metrics.forget_adapter(name)

    async def reload(self, name: str) -> AdapterRecord:
        """Serve again an adapter that was unloaded, from where it came (KServe's repository `load`)."""
        if name in self.records:
            return self.records[name]
        record = self.unloaded.get(name)
        if record is None:
            raise repository_model_not_found(name)
        return await self.load(name, record.source, record.sha256, record.task)

    async def load_file(self, path: Path) -> list[tuple[str, str | None]]:
        """Load every adapter of the start-up file; one bad entry does not stop the others."""
        results = []
        for source in read_adapters_file(path):
            try:
                await self.load(source.name, source.path, source.sha256, source.task)
                results.append((source.name, None))
            except ServeError as error:
                results.append((source.name, error.message))
        return results

    def request_reload(self, name: str) -> bool:
        """Called by the engine thread for an evicted adapter a request needs: reload the version
        registered now, on the event loop, where every other state change of the adapter runs."""
        record = self.records.get(name)
        if record is None or self._loop is None:
            return False
        future = asyncio.run_coroutine_threadsafe(self._reload(record), self._loop)
        self._reloads.add(future)
        future.add_done_callback(self._reloads.discard)
        return True

    def reloads_in_flight(self) -> list[Future]:
        return list(self._reloads)

    async def _reload(self, record: AdapterRecord) -> None:
        name = record.name
        try:
            prepared = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._prepare, name, record.source, record.sha256, record.task)
            async with self._lock(name):
                current = self.records.get(name)
                if current is None or current.int_id != record.int_id:
                    # A newer version was loaded (and installed) or the adapter was unloaded while this
                    # one was fetched: installing it now would serve what the registry no longer lists.
                    log.info("discarded the reload of adapter %s version %d: %s", name, record.int_id,
                             "unloaded since" if current is None else f"version {current.int_id} registered since")
                    return
                await asyncio.wrap_future(self.engine.install(name, prepared.weights))
            log.info("reloaded evicted adapter %s version %d", name, record.int_id)
        except Exception as error:
            message = error.message if isinstance(error, AdapterError) else type(error).__name__
            log.error("reloading adapter %s failed: %s", name, message)
            metrics.ADAPTER_LOAD_FAILURES.labels("reload_failed").inc()
            self.engine.fail_adapter(
                name, ServeError(f"adapter {name} could not be reloaded: {message}", status=503,
                                 code="adapter_unavailable"))

    @asynccontextmanager
    async def _lock(self, name: str) -> AsyncIterator[None]:
        """The name's lock, kept only while someone holds or awaits it: names come from callers."""
        entry = self._name_locks.setdefault(name, _NameLock())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if not entry.users:
                del self._name_locks[name]

    def close(self) -> None:
        for future in self.reloads_in_flight():
            future.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
