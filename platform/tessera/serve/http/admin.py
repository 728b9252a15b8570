"""vLLM's adapter API: `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter`, same bodies and answers.

Clients and the operator drive either runtime (vLLM or Tessera's) with it unchanged. Refusals are
`ServeError`s answered in OpenAI's error shape by `tessera.serve.http.errors`.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from tessera.serve.errors import ServeError
from tessera.serve.http.openai_api import Text
from tessera.serve.runtime.service import ModelService


class LoadLoraRequest(BaseModel):
    """vLLM's body, plus Tessera's optional sha256 and task."""

    model_config = ConfigDict(extra="ignore")

    lora_name: Text
    lora_path: Text
    load_inplace: bool = False
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    task: Text | None = None


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: Text | None = None
    lora_int_id: int | None = None


class AdminRoutes:
    def __init__(self, service: ModelService) -> None:
        self.service = service

    async def load_lora_adapter(self, body: LoadLoraRequest) -> PlainTextResponse:
        """vLLM's answers: plain text on success; 400 for a name already served unless `load_inplace`."""
        if not body.lora_name or not body.lora_path:
            raise ServeError("Both 'lora_name' and 'lora_path' must be provided.", param="lora_name",
                             type="InvalidUserInput")
        if body.lora_name in (self.service.served_name, self.service.kserve_name):
            raise ServeError(f"The lora adapter name '{body.lora_name}' conflicts with the served base model.",
                             param="lora_name", code="invalid_name", type="InvalidUserInput")
        record = await self.service.registry.load(body.lora_name, body.lora_path, body.sha256, body.task,
                                                  inplace=body.load_inplace)
        return PlainTextResponse(f"Success: LoRA adapter '{record.name}' added successfully.")

    async def unload_lora_adapter(self, body: UnloadLoraRequest) -> PlainTextResponse:
        name = self.service.registry.named(body.lora_name or None, body.lora_int_id)
        await self.service.registry.unload(name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


def admin_router(service: ModelService) -> APIRouter:
    routes = AdminRoutes(service)
    router = APIRouter()
    for prefix in ("/v1", "/openai/v1"):
        router.add_api_route(f"{prefix}/load_lora_adapter", routes.load_lora_adapter, methods=["POST"],
                             response_model=None)
        router.add_api_route(f"{prefix}/unload_lora_adapter", routes.unload_lora_adapter, methods=["POST"],
                             response_model=None)
    return router
