"""The agent's work: fetch an adapter into the shared volume, verify and check it, have the
runtime load it from there; unload and delete on request; reload what the runtime lost.

Layout of the shared volume: `<adapters-dir>/<name>/<sha256>/` holds one version of an adapter,
renamed into place only once complete, verified and checked, so the runtime never sees a partial
directory; `<adapters-dir>/.agent-state.json` remembers what the agent holds, so a restarted agent
(or a restarted runtime) gets the same adapters back without the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field

from tessera.adapter_format import (
    ADAPTER_NAME,
    CONFIG_FILE,
    MODEL_CARD_FILE,
    WEIGHTS_FILE,
    AdapterFormatError,
    adapter_rank,
    check_allowed,
    read_checked_adapter,
    store_refusals,
    weights_sha256,
)
from tessera.adapter_format.runtime import RuntimeProfile
from tessera.agent.rules import AgentError, classify_load, classify_unload, servability_problems
from tessera.store import is_remote, open_store

log = logging.getLogger(__name__)
STATE_FILE = ".agent-state.json"
STAGING_PREFIX = ".staging-"


class LoadRequest(BaseModel):
    """vLLM's load body, with Tessera's sha256 and task (what the operator sends either runtime)."""

    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(pattern=ADAPTER_NAME.pattern)
    lora_path: str = Field(min_length=1, description="s3:// URI or local directory of the PEFT adapter.")
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    task: str | None = None


class UnloadRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1)


@dataclass
class HeldAdapter:
    """An adapter the agent brought into the volume: where from, which version, where it lies."""

    name: str
    source: str
    sha256: str
    path: str
    rank: int
    task: str | None = None


def _runtime_unavailable(runtime: RuntimeProfile, error: httpx.HTTPError) -> AgentError:
    return AgentError(f"{runtime.label} is not answering ({type(error).__name__}); it may be starting or restarting",
                      code="runtime_unavailable")


class AdapterAgent:
    def __init__(self, runtime: RuntimeProfile, runtime_url: str, adapters_dir: Path, *,
                 allowed_prefixes: list[str] | None = None, client: httpx.AsyncClient | None = None) -> None:
        self.runtime = runtime
        self.runtime_url = runtime_url.rstrip("/")
        self.dir = adapters_dir
        self.allowed_prefixes = allowed_prefixes or []
        self.client = client or httpx.AsyncClient(timeout=httpx.Timeout(300.0, connect=5.0))
        self.held: dict[str, HeldAdapter] = {}
        # Why an adapter the agent holds is not in the runtime now (a failed reload), by name.
        self.problems: dict[str, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.dir.mkdir(parents=True, exist_ok=True)
        self._restore()

    # --- state ---------------------------------------------------------------------------------

    def _restore(self) -> None:
        """Read what a previous agent held; drop versions whose files are gone, and stale staging."""
        for leftover in self.dir.glob(STAGING_PREFIX + "*"):
            shutil.rmtree(leftover, ignore_errors=True)
        try:
            entries = json.loads((self.dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return
        for entry in entries if isinstance(entries, list) else []:
            try:
                held = HeldAdapter(**entry)
            except TypeError:
                continue
            if (Path(held.path) / WEIGHTS_FILE).is_file():
                self.held[held.name] = held

    def _save(self) -> None:
        temporary = self.dir / f"{STATE_FILE}.tmp"
        temporary.write_text(json.dumps([asdict(h) for h in self.held.values()], indent=1))
        os.replace(temporary, self.dir / STATE_FILE)

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    # --- fetching and checking (blocking: runs on a worker thread) -----------------------------------

    def _stage(self, source: str, staging: Path) -> None:
        if is_remote(source):
            store, key = open_store(source)
            store.get_dir(key, staging)
            return
        store, key = open_store(source)
        directory = store.local_path(key)
        if directory is None or not directory.is_dir():
            raise AgentError(f"no adapter directory at {source}", code="adapter_not_found")
        for file in (CONFIG_FILE, WEIGHTS_FILE, MODEL_CARD_FILE):
            path = directory / file
            # Regular files only: a link could make the agent copy (and echo) any file it can read.
            if path.is_symlink():
                raise AgentError(f"{file} of {source} is a symbolic link; adapters must be regular files",
                                 code="adapter_corrupt")
            if path.is_file():
                shutil.copyfile(path, staging / file)

    def _prepare(self, request: LoadRequest) -> HeldAdapter:
        """Fetch into a staging directory, verify, check, and rename into place."""
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{request.lora_name}-", dir=self.dir))
        try:
            try:
                with store_refusals(request.lora_path):
                    self._stage(request.lora_path, staging)
                files = read_checked_adapter(
                    staging, lambda f: servability_problems(f.config, f.card, f.shapes, self.runtime),
                    expected_sha256=request.sha256)
            except AdapterFormatError as error:
                raise AgentError(error.message.replace(str(staging), request.lora_path), code=error.code,
                                 status=error.status) from None
            except OSError as error:  # the volume is full or unwritable; its path says nothing secret
                raise AgentError(f"cannot write the adapter into {self.dir}: {error.strerror}",
                                 code="volume_error") from None
            digest, rank = files.sha256, adapter_rank(files.shapes)
            final = self.dir / request.lora_name / digest
            final.parent.mkdir(exist_ok=True)
            if final.exists():  # the same version fetched before: the new copy is as good
                shutil.rmtree(final)
            os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return HeldAdapter(request.lora_name, request.lora_path, digest, str(final), rank,
                           request.task or files.card.task)

    # --- the runtime's adapter API -------------------------------------------------------------------

    async def runtime_models(self) -> dict[str, dict[str, Any]]:
        try:
            response = await self.client.get(f"{self.runtime_url}/v1/models", timeout=10.0)
        except httpx.HTTPError as error:
            raise _runtime_unavailable(self.runtime, error) from None
        try:
            if response.status_code != 200:
                raise ValueError(f"status {response.status_code}")
            cards = response.json()["data"]
            return {c["id"]: c for c in cards if isinstance(c, dict) and "id" in c}
        except (ValueError, KeyError, TypeError) as error:
            raise AgentError(f"{self.runtime.label} gave no model list to GET /v1/models ({error})",
                             code="runtime_error") from None

    async def _runtime_load(self, held: HeldAdapter, replace: bool) -> None:
        body = {"lora_name": held.name, "lora_path": held.path, "load_inplace": replace}
        try:
            response = await self.client.post(f"{self.runtime_url}/v1/load_lora_adapter", json=body)
        except httpx.HTTPError as error:
            raise _runtime_unavailable(self.runtime, error) from None
        answer = classify_load(response.status_code, response.text)
        where = self.runtime.label
        if answer.outcome == "loaded":
            return
        if answer.outcome == "already_loaded" and not replace:
            # The runtime holds the name from before (an earlier agent, another version): replace it.
            await self._runtime_load(held, replace=True)
            return
        if answer.outcome == "not_found":
            raise AgentError(f"{where} found no adapter at {held.path}: the adapters volume must be mounted at the "
                             f"same path in the runtime and the agent ({answer.message})",
                             code="runtime_cannot_read")
        if answer.outcome == "rank_too_high":
            raise AgentError(f"{where} refused the adapter's rank {held.rank}: {answer.message}",
                             code="rank_too_high")
        if answer.outcome == "refused" or answer.outcome == "already_loaded":
            raise AgentError(f"{where} refused the adapter: {answer.message}", code="runtime_refused")
        raise AgentError(f"{where} failed to load the adapter: {answer.message}", code="runtime_error")

    async def _runtime_unload(self, name: str) -> bool:
        """Whether the runtime held the adapter."""
        try:
            response = await self.client.post(f"{self.runtime_url}/v1/unload_lora_adapter", json={"lora_name": name},
                                              timeout=60.0)
        except httpx.HTTPError as error:
            raise _runtime_unavailable(self.runtime, error) from None
        answer = classify_unload(response.status_code, response.text)
        if answer.outcome in ("unloaded", "not_found"):
            return answer.outcome == "unloaded"
        raise AgentError(f"{self.runtime.label} failed to unload {name}: {answer.message}",
                         code="runtime_error" if answer.outcome == "failed" else "runtime_refused")

    # --- what the operator calls -------------------------------------------------------------------

    async def load(self, request: LoadRequest) -> HeldAdapter:
        try:
            check_allowed(request.lora_path, self.allowed_prefixes)
        except AdapterFormatError as error:
            raise AgentError.of(error) from None
        async with self._lock(request.lora_name):
            before = self.held.get(request.lora_name)
            same = (before is not None and before.source == request.lora_path
                    and (request.sha256 or before.sha256).lower() == before.sha256)
            if same and request.lora_name in await self.runtime_models():
                return before
            held = before if same else await asyncio.to_thread(self._prepare, request)
            try:
                await self._runtime_load(held, replace=False)
            except AgentError:
                if before is None or held.path != before.path:
                    shutil.rmtree(held.path, ignore_errors=True)
                    with contextlib.suppress(OSError):  # the name's directory, unless another version is in it
                        Path(held.path).parent.rmdir()
                raise
            if before is not None and before.path != held.path:
                shutil.rmtree(before.path, ignore_errors=True)
            self.held[held.name] = held
            self.problems.pop(held.name, None)
            self._save()
        log.info("loaded adapter %s (sha256 %s, rank %d) from %s", held.name, held.sha256[:12], held.rank, held.source)
        return held

    async def unload(self, name: str) -> None:
        async with self._lock(name):
            held = self.held.get(name)
            in_runtime = await self._runtime_unload(name)
            if held is None and not in_runtime:
                raise AgentError(f"The lora adapter '{name}' cannot be found.", code="lora_not_found")
            if held is not None:
                del self.held[name]
                self.problems.pop(name, None)
                self._save()
                shutil.rmtree(self.dir / name, ignore_errors=True)
        log.info("unloaded adapter %s", name)

    async def models(self) -> dict[str, Any]:
        """The runtime's models as the operator reads them: an adapter the agent holds is listed, with its
        store URI as `root` and its digest, only while the runtime has it loaded."""
        cards = await self.runtime_models()
        data = []
        for name, card in cards.items():
            held = self.held.get(name)
            if held is not None:
                card = {**card, "root": held.source, "sha256": held.sha256, "rank": held.rank, "task": held.task,
                        "path": held.path}
            data.append(card)
        return {"object": "list", "data": data}

    async def resync(self) -> list[str]:
        """Load into the runtime every held adapter it lacks (it restarted); returns the names reloaded."""
        try:
            present = await self.runtime_models()
        except AgentError:
            return []  # the runtime is down or starting: the next pass will see it
        reloaded = []
        for name in [n for n in self.held if n not in present]:
            async with self._lock(name):
                held = self.held.get(name)
                if held is None:
                    continue
                try:
                    if weights_sha256(Path(held.path)) != held.sha256:
                        raise AgentError(f"the copy of {name} in {held.path} changed on disk", code="sha256_mismatch")
                    await self._runtime_load(held, replace=False)
                except (AgentError, OSError) as error:
                    message = error.message if isinstance(error, AgentError) else type(error).__name__
                    if self.problems.get(name) != message:
                        log.error("reloading adapter %s after a runtime restart failed: %s", name, message)
                    self.problems[name] = message
                    continue
                self.problems.pop(name, None)
                reloaded.append(name)
        if reloaded:
            log.info("runtime restarted: reloaded %s", ", ".join(reloaded))
        return reloaded

    async def resync_forever(self, seconds: float) -> None:
        while True:
            try:
                await self.resync()
            except Exception:  # one bad pass must not end the loop that brings adapters back
                log.exception("checking the runtime's adapters failed; retrying in %.0fs", seconds)
            await asyncio.sleep(seconds)

    def status(self) -> dict[str, Any]:
        return {"runtime": self.runtime.kind, "adapters": [
            {"name": h.name, "source": h.source, "sha256": h.sha256, "rank": h.rank, "path": h.path,
             "problem": self.problems.get(h.name, "")} for h in self.held.values()]}
