"""KServe's v1 and v2 protocols: classification by the base model or an adapter, health, model lists.

Every name the server answers to is a `kserve.Model` in KServe's own `ModelRepository`, and the
routes, request decoding and error handling are KServe's (`register_v1_endpoints`,
`register_v2_endpoints`), mounted on the server's FastAPI app. A predict request carries texts
(or records of the task's fields); the answer is the task's label, parsed from a greedy
generation with the prompt format the adapter was trained with (`tessera.data.render`).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from kserve import InferOutput, InferRequest, InferResponse, Model
from kserve.errors import (
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    ServerNotLive,
    ServerNotReady,
    invalid_input_handler,
    model_not_found_handler,
    model_not_ready_handler,
    server_not_live_handler,
    server_not_ready_handler,
)
from kserve.model_repository import ModelRepository
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.model_repository_extension import ModelRepositoryExtension
from kserve.protocol.rest.v1_endpoints import register_v1_endpoints
from kserve.protocol.rest.v2_endpoints import register_v2_endpoints

from tessera.serve import metrics
from tessera.serve.engine import EngineError
from tessera.serve.sampling import SamplingParams
from tessera.serve.service import ModelService, Usage

if TYPE_CHECKING:
    from tessera.tasks import Task

CLASSIFY_MAX_TOKENS = 16


def _records(payload: dict[str, Any] | InferRequest) -> list[dict[str, Any]]:
    """Task records from a v1 body (`instances`: texts or records) or a v2 request (BYTES inputs)."""
    if isinstance(payload, InferRequest):
        columns: dict[str, list[str]] = {}
        for tensor in payload.inputs:
            if tensor.datatype != "BYTES":
                raise InvalidInput(f"input {tensor.name!r} must be BYTES (text), not {tensor.datatype}")
            values = tensor.data if isinstance(tensor.data, list) else list(tensor.data)
            columns[tensor.name] = [v.decode() if isinstance(v, bytes) else str(v) for v in values]
        if not columns:
            raise InvalidInput("the request has no inputs")
        sizes = {len(v) for v in columns.values()}
        if len(sizes) != 1:
            raise InvalidInput("all inputs must have the same number of elements")
        names = list(columns)
        if len(names) == 1 and names[0] in ("input", "inputs", "text_input", "prompt"):
            columns = {"text": columns[names[0]]}
        return [dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)]
    instances = payload.get("instances", payload.get("inputs")) if isinstance(payload, dict) else None
    if not isinstance(instances, list) or not instances:
        raise InvalidInput('expected {"instances": [text or record, ...]}')
    records = []
    for position, instance in enumerate(instances):
        if isinstance(instance, str):
            records.append({"text": instance})
        elif isinstance(instance, dict):
            records.append(instance)
        else:
            raise InvalidInput(f"instances[{position}]: expected a text or an object of the task's fields")
    return records


class ServedModel(Model):
    """One name of the server (the base model or an adapter) as a KServe model."""

    def __init__(self, name: str, service: ModelService) -> None:
        super().__init__(name)
        self.service = service
        self.ready = True

    def _prompt_ids(self, record: dict[str, Any], task: Task | None) -> list[int]:
        tokenizer = self.service.tokenizer
        if task is None:
            return tokenizer(str(record.get("text", ""))).input_ids
        from tessera.data.render import encode_prompt
        from tessera.tasks import RowError

        filled = dict(record)
        if task.label_field and task.label_field not in filled:
            # The prompt never depends on the answer; a placeholder lets the task build the example.
            filled[task.label_field] = task.labels[0] if task.labels else "-"
        try:
            example = task.to_example(filled)
        except RowError as error:
            raise InvalidInput(f"{error.field or 'record'}: {error.reason}") from None
        return encode_prompt(example, tokenizer)

    async def predict(self, payload: dict[str, Any] | InferRequest, headers: dict[str, str] | None = None):
        adapter = None if self.name == self.service.served_name else self.name
        record = self.service.registry.get(adapter) if adapter else None
        if adapter and record is None:
            raise ModelNotFound(self.name)
        task = None
        if record is not None and record.task:
            from tessera.tasks import get_task

            task = get_task(record.task)
        label = adapter or metrics.BASE_LABEL
        prompts = [self._prompt_ids(item, task) for item in _records(payload)]
        params = SamplingParams(max_tokens=CLASSIFY_MAX_TOKENS, temperature=0.0)
        usage = Usage()
        try:
            # All records at once: the engine batches them into the same forward passes.
            choices = await asyncio.gather(*(self.service.complete(p, adapter, params, 1, usage) for p in prompts))
        except EngineError as error:
            metrics.REQUESTS.labels(label, "predict", str(error.status)).inc()
            if error.status == 404:
                raise ModelNotFound(self.name) from None
            raise
        metrics.REQUESTS.labels(label, "predict", "200").inc()
        texts = [choice.text for (choice,) in choices]
        labels = [task.parse(text) if task else text.strip() for text in texts]
        if isinstance(payload, InferRequest):
            outputs = [
                InferOutput(name="label", shape=[len(labels)], datatype="BYTES", data=[lb or "" for lb in labels]),
                InferOutput(name="text", shape=[len(texts)], datatype="BYTES", data=texts),
            ]
            return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=outputs)
        return {"predictions": labels, "texts": texts}


class TesseraDataPlane(DataPlane):
    """KServe's data plane, ready only once the server's start-up adapters are in."""

    def __init__(self, model_registry: ModelRepository, service: ModelService) -> None:
        super().__init__(model_registry)
        self.service = service

    async def ready(self) -> bool:
        return self.service.ready


def mount_kserve(app: FastAPI, service: ModelService) -> ModelRepository:
    """Add KServe's v1/v2 routes and error handlers; returns the repository to keep in sync."""
    repository = ModelRepository()
    repository.update(ServedModel(service.served_name, service))
    dataplane = TesseraDataPlane(repository, service)
    extension = ModelRepositoryExtension(model_registry=repository)
    app.add_api_route("/", dataplane.live, methods=["GET"])
    register_v1_endpoints(app, dataplane, extension)
    register_v2_endpoints(app, dataplane, extension)
    app.add_exception_handler(InvalidInput, invalid_input_handler)
    app.add_exception_handler(ModelNotFound, model_not_found_handler)
    app.add_exception_handler(ModelNotReady, model_not_ready_handler)
    app.add_exception_handler(ServerNotLive, server_not_live_handler)
    app.add_exception_handler(ServerNotReady, server_not_ready_handler)
    return repository


def sync_repository(repository: ModelRepository, service: ModelService, name: str, loaded: bool) -> None:
    if loaded:
        repository.update(ServedModel(name, service))
    elif repository.get_model(name) is not None:
        repository.unload(name)
