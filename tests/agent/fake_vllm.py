"""A stand-in for vLLM's adapter API, which cannot run here (CUDA only, too large to carry).

It answers exactly as vLLM's `OpenAIServingModels` does (vllm/entrypoints/openai/models/serving.py,
vLLM 0.2x–0.3x, with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True):
- load 200 with a plain-text body "Success: LoRA adapter 'x' added successfully.";
- load 400 `{"error": {"message": "The lora adapter 'x' has already been loaded. ..."}}` when the name
  is loaded and `load_inplace` is false;
- load 404 when nothing is at `lora_path` (LoRAAdapterNotFoundError);
- load 500 (InternalServerError) for an adapter whose rank exceeds --max-lora-rank, the engine's
  ValueError passed through;
- unload 200 plain text, 404 "The lora adapter 'x' cannot be found.";
- GET /v1/models: the base (`root` its path) and one card per adapter (`root` its lora_path).
It reads only `adapter_config.json` (`r`) from the path, as much as its answers depend on.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

from aiohttp import web


def _error(message: str, kind: str, status: int) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": None, "code": status}},
                             status=status)


class FakeVllm:
    def __init__(self, port: int, max_lora_rank: int, served_model: str = "/mnt/models") -> None:
        self.port, self.max_lora_rank, self.served_model = port, max_lora_rank, served_model
        self.loras: dict[str, str] = {}
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def load(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(("load", body))
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            return _error("Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput", 400)
        if not body.get("load_inplace") and name in self.loras:
            return _error(f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in "
                          "place, set 'load_inplace' to True.", "InvalidUserInput", 400)
        config = Path(path) / "adapter_config.json"
        if not config.is_file():
            return _error(f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError", 404)
        rank = json.loads(config.read_text()).get("r", 8)
        if rank > self.max_lora_rank:
            return _error(f"LoRA rank {rank} is greater than max_lora_rank {self.max_lora_rank}.",
                          "InternalServerError", 500)
        self.loras[name] = path
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(("unload", body))
        name = body.get("lora_name")
        if name not in self.loras:
            return _error(f"The lora adapter '{name}' cannot be found.", "NotFoundError", 404)
        del self.loras[name]
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def models(self, request: web.Request) -> web.Response:
        cards = [{"id": self.served_model, "object": "model", "root": self.served_model, "parent": None}]
        cards += [{"id": n, "object": "model", "root": p, "parent": self.served_model} for n, p in self.loras.items()]
        return web.json_response({"object": "list", "data": cards})

    def start(self) -> FakeVllm:
        app = web.Application()
        app.router.add_post("/v1/load_lora_adapter", self.load)
        app.router.add_post("/v1/unload_lora_adapter", self.unload)
        app.router.add_get("/v1/models", self.models)
        self._thread.start()

        async def serve() -> None:
            self._runner = web.AppRunner(app)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)
        return self

    def restart(self) -> None:
        """vLLM restarted: it comes back holding no adapter."""
        self.loras.clear()

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
