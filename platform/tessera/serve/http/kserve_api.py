"""KServe's v1 and v2 protocols: classification by the base model or an adapter, health, model lists.

Every name the server answers to is a `kserve.Model` in a KServe `ModelRepository` that is a view
of the server's one adapter registry, and the routes and request decoding are KServe's
(`register_v1_endpoints`, `register_v2_endpoints`), mounted on the server's FastAPI app; errors
take KServe's `{"error": ...}` shape through the server's one error mapper. A predict request carries texts
(or records of the task's fields); the answer is the task's label, parsed from a greedy
generation with the prompt format the adapter was trained with (`tessera.data.template`).
"""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import FastAPI
from kserve import InferOutput, InferRequest, InferResponse, Model
from kserve.errors import InvalidInput, ModelNotFound
from kserve.model_repository import ModelRepository
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.model_repository_extension import ModelRepositoryExtension
from kserve.protocol.rest.v1_endpoints import register_v1_endpoints
from kserve.protocol.rest.v2_endpoints import register_v2_endpoints

from tessera.serve import metrics
from tessera.serve.errors import ServeError
from tessera.serve.runtime.sampling import SamplingParams
from tessera.serve.runtime.service import ModelService, Usage

if TYPE_CHECKING:
    from tessera.tasks import Task

CLASSIFY_MAX_TOKENS = 16


def _records(payload: dict[str, Any] | InferRequest | bytes) -> list[dict[str, Any]]:
    """Task records from a v1 body (`instances`: texts or records) or a v2 request (BYTES inputs).

    A v1 body sent without a JSON content type (curl's `-d` default) arrives as bytes: it is JSON all the same.
    """
    if isinstance(payload, bytes | bytearray):
        try:
            payload = orjson.loads(payload)
        except orjson.JSONDecodeError as error:
            raise InvalidInput(f"the request body is not valid JSON: {error}") from None
    if isinstance(payload, InferRequest):
        columns: dict[str, list[str]] = {}
        for tensor in payload.inputs:
            if tensor.datatype != "BYTES":
                raise InvalidInput(f"input {tensor.name!r} must be BYTES (text), not {tensor.datatype}")
            values = tensor.data if isinstance(tensor.data, list) else list(tensor.data)
            if math.prod(tensor.shape) != len(values):
                raise InvalidInput(f"input {tensor.name!r} has shape {list(tensor.shape)} "
                                   f"({math.prod(tensor.shape)} elements) but {len(values)} data elements")
            try:
                columns[tensor.name] = [v.decode() if isinstance(v, bytes) else str(v) for v in values]
            except UnicodeDecodeError:
                raise InvalidInput(f"input {tensor.name!r} is not UTF-8 text") from None
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

    def _check(self, record: dict[str, Any]) -> None:
        for field, value in record.items():
            if isinstance(value, str):
                self.service.check_text(value, field)

    def _prompt_ids(self, record: dict[str, Any], task: Task | None) -> list[int]:
        """Runs on the tokenizer thread."""
        tokenizer = self.service.tokenizer
        if task is None:
            return tokenizer(str(record.get("text", ""))).input_ids
        from tessera.data.template import encode_prompt
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

    async def predict(self, payload: dict[str, Any] | InferRequest | bytes, headers: dict[str, str] | None = None):
        adapter = None if self.name == self.service.kserve_name else self.name
        record = self.service.registry.get(adapter) if adapter else None
        if adapter and record is None:
            raise ModelNotFound(self.name)
        if record is not None and not record.task:
            raise ServeError(
                f"adapter {self.name!r} has no task (no model-card.json in its directory and none given when it "
                'was loaded), so its answers cannot be parsed into labels: load it with a task, e.g. '
                '{"task": "sentiment"}, or ask it through the OpenAI routes', status=409, code="no_task")
        task = None
        if record is not None:
            from tessera.tasks import get_task

            task = get_task(record.task)
        label = adapter or metrics.BASE_LABEL
        records = _records(payload)
        most = self.service.limits.max_prompts
        if len(records) > most:
            raise InvalidInput(f"at most {most} instances in one request (got {len(records)})")
        for item in records:
            self._check(item)
        prompts = await self.service.tokenize(lambda: [self._prompt_ids(item, task) for item in records])
        params = SamplingParams(max_tokens=CLASSIFY_MAX_TOKENS, temperature=0.0)
        usage = Usage()
        try:
            # All records at once: the engine batches them into the same forward passes.
            choices = await asyncio.gather(*(self.service.complete(p, adapter, params, 1, usage) for p in prompts))
        except ServeError as error:
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


class RegistryView(ModelRepository):
    """KServe's model repository as a view of the server's one adapter registry: the names KServe
    answers to are exactly those the OpenAI routes serve, whichever protocol loaded or unloaded them."""

    def __init__(self, service: ModelService) -> None:
        super().__init__()
        self.service = service

    def get_model(self, name: str) -> ServedModel | None:
        if name != self.service.kserve_name and self.service.registry.get(name) is None:
            self.models.pop(name, None)
            return None
        model = self.models.get(name)
        if model is None:
            model = self.models[name] = ServedModel(name, self.service)
        return model

    def get_models(self) -> dict[str, ServedModel]:
        return {name: self.get_model(name) for name in self.service.kserve_names()}


class RegistryExtension(ModelRepositoryExtension):
    """KServe's repository load/unload on the registry: unload stops an adapter on every route; load
    serves again one that was unloaded, from where it came."""

    def __init__(self, view: RegistryView) -> None:
        super().__init__(model_registry=view)
        self.service = view.service

    async def load(self, model_name: str) -> None:
        if model_name != self.service.kserve_name:
            await self.service.registry.reload(model_name)

    async def unload(self, model_name: str) -> None:
        if model_name == self.service.kserve_name:
            raise ServeError(f"{model_name} is the base model: it cannot be unloaded", code="base_model")
        if self.service.registry.get(model_name) is None:
            raise ModelNotFound(model_name)
        await self.service.registry.unload(model_name)


class TesseraDataPlane(DataPlane):
    """KServe's data plane, ready only once the server's start-up adapters are in."""

    def __init__(self, model_registry: ModelRepository, service: ModelService) -> None:
        super().__init__(model_registry)
        self.service = service

    async def ready(self) -> bool:
        return self.service.ready


def mount_kserve(app: FastAPI, service: ModelService) -> None:
    """Add KServe's v1/v2 routes over the registry; errors go through `tessera.serve.http.errors`."""
    view = RegistryView(service)
    dataplane = TesseraDataPlane(view, service)
    app.add_api_route("/", dataplane.live, methods=["GET"])
    extension = RegistryExtension(view)
    register_v1_endpoints(app, dataplane, extension)
    register_v2_endpoints(app, dataplane, extension)
