"""KServe's v1 and v2 protocols: classification by the base model or an adapter, health, model lists.

Every name the server answers to is a `kserve.Model` in a KServe `ModelRepository` that is a view
of the server's one adapter registry, and the routes and request decoding are KServe's
(`register_v1_endpoints`, `register_v2_endpoints`), mounted on the server's FastAPI app; errors
take KServe's `{"error": ...}` shape through the server's one error mapper. A predict request carries texts
(or records of the task's fields); the answer is the task's label, parsed from a greedy
generation with the prompt format the adapter was trained with (`tessera.data.template`).
`ServedModel` uses KServe's own hooks: `preprocess` parses, tokenizes and checks the request's
budget, `predict` generates, `postprocess` labels and shapes the answer. A request KServe's
decoding cannot read (a malformed binary body, a bad header) is an `InvalidInput` (400), never a 500.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import FastAPI
from kserve import InferOutput, InferRequest, InferResponse, Model
from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady
from kserve.model_repository import ModelRepository
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.model_repository_extension import ModelRepositoryExtension
from kserve.protocol.rest.v1_endpoints import register_v1_endpoints
from kserve.protocol.rest.v2_endpoints import register_v2_endpoints

from tessera.serve.errors import ServeError
from tessera.serve.runtime.sampling import SamplingParams
from tessera.serve.runtime.service import ModelService, RequestCost, Usage, check_budget

if TYPE_CHECKING:
    from tessera.tasks import Task

CLASSIFY_MAX_TOKENS = 16


def _records(payload: dict[str, Any] | InferRequest | bytes) -> list[dict[str, Any]]:
    """Task records from a v1 body (`instances`: texts or records) or a v2 request (BYTES inputs);
    whatever cannot be read is an `InvalidInput`."""
    try:
        return _read_records(payload)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
        raise InvalidInput(f"the request's inputs cannot be read: {error}") from None


def _read_records(payload: dict[str, Any] | InferRequest | bytes) -> list[dict[str, Any]]:
    """A v1 body sent without a JSON content type (curl's `-d` default) arrives as bytes: it is JSON all the same."""
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
            if any(not isinstance(d, int) or d < 0 for d in tensor.shape) or math.prod(tensor.shape) != len(values):
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


@dataclass
class Classification:
    """One KServe request between the hooks: what `preprocess` read, what `predict` generated."""

    payload: dict[str, Any] | InferRequest
    adapter: str | None
    task: Task | None
    prompts: list[list[int]]
    texts: list[str] = field(default_factory=list)


class ServedModel(Model):
    """One name of the server (the base model or an adapter) as a KServe model."""

    def __init__(self, name: str, service: ModelService) -> None:
        super().__init__(name)
        self.service = service
        self.ready = True

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

    def _task(self, adapter: str | None) -> Task | None:
        record = self.service.registry.get(adapter) if adapter else None
        if adapter and record is None:
            raise ModelNotFound(self.name)
        if record is None:
            return None
        if not record.task:
            raise ServeError(
                f"adapter {self.name!r} has no task (no model-card.json in its directory and none given when it "
                'was loaded), so its answers cannot be parsed into labels: load it with a task, e.g. '
                '{"task": "sentiment"}, or ask it through the OpenAI routes', status=409, code="no_task")
        from tessera.tasks import get_task

        return get_task(record.task)

    async def preprocess(self, payload: dict[str, Any] | InferRequest | bytes,
                         headers: dict[str, str] | None = None) -> Classification:
        """Parse the records and tokenize their prompts, within the request's budget."""
        adapter = None if self.name == self.service.kserve_name else self.name
        task = self._task(adapter)
        records = _records(payload)
        most = self.service.limits.max_prompts
        if len(records) > most:
            raise InvalidInput(f"at most {most} instances in one request (got {len(records)}; "
                               "tessera serve --max-prompts)")
        for item in records:
            for name, value in item.items():
                if isinstance(value, str):
                    self.service.check_text(value, name)
        self.service.check_prompt_texts([v for item in records for v in item.values() if isinstance(v, str)],
                                        "instances")
        prompts = await self.service.encode_each(
            [lambda item=item: self._prompt_ids(item, task) for item in records], "instances")
        check_budget(self.service.limits, RequestCost(
            prompts=len(prompts), prompt_tokens=sum(map(len, prompts)), n=1, max_tokens=CLASSIFY_MAX_TOKENS))
        return Classification(payload if not isinstance(payload, bytes | bytearray) else {}, adapter, task, prompts)

    async def predict(self, request: Classification, headers: dict[str, str] | None = None) -> Classification:
        """A greedy answer for every record, all at once: the engine batches them into the same steps."""
        params = SamplingParams(max_tokens=CLASSIFY_MAX_TOKENS, temperature=0.0)
        usage = Usage()
        try:
            choices = await asyncio.gather(
                *(self.service.complete(p, request.adapter, params, 1, usage) for p in request.prompts))
        except ServeError as error:
            if error.status == 404:
                raise ModelNotFound(self.name) from None
            raise
        request.texts = [choice.text for (choice,) in choices]
        return request

    def postprocess(self, result: Classification, headers: dict[str, str] | None = None):
        """The task's label of each answer, in the protocol the request came in."""
        task = result.task
        labels = [task.parse(text) if task else text.strip() for text in result.texts]
        if isinstance(result.payload, InferRequest):
            outputs = [
                InferOutput(name="label", shape=[len(labels)], datatype="BYTES", data=[lb or "" for lb in labels]),
                InferOutput(name="text", shape=[len(result.texts)], datatype="BYTES", data=result.texts),
            ]
            return InferResponse(response_id=result.payload.id or "", model_name=self.name, infer_outputs=outputs)
        return {"predictions": labels, "texts": result.texts}


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

    def decode(self, body, headers, *args, **kwargs):
        """KServe's decoding, with every request it cannot read (a bad binary length prefix, truncated
        data, a non-integer `inference-header-content-length`, no `inputs`...) refused as 400."""
        try:
            return super().decode(body, headers, *args, **kwargs)
        except (InvalidInput, ModelNotFound, ModelNotReady):
            raise
        except Exception as error:  # noqa: BLE001 - any failure to decode is the request's
            raise InvalidInput(f"the request cannot be decoded: {type(error).__name__}: {error}") from None


async def _no_versions(model_name: str, model_version: str) -> None:
    raise InvalidInput(f"model versions are not supported: ask /v2/models/{model_name} without /versions/")


def mount_kserve(app: FastAPI, service: ModelService) -> None:
    """Add KServe's v1/v2 routes over the registry; errors go through `tessera.serve.http.errors`."""
    view = RegistryView(service)
    dataplane = TesseraDataPlane(view, service)
    app.add_api_route("/", dataplane.live, methods=["GET"])
    # Before KServe's own, which answer a version with NotImplementedError (a 500).
    for suffix, method in (("", "GET"), ("/ready", "GET"), ("/infer", "POST")):
        app.add_api_route(f"/v2/models/{{model_name}}/versions/{{model_version}}{suffix}", _no_versions,
                          methods=[method])
    extension = RegistryExtension(view)
    register_v1_endpoints(app, dataplane, extension)
    register_v2_endpoints(app, dataplane, extension)
