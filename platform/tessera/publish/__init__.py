"""`tessera publish`: the job's adapter into the registry, `adapters/<ns>/<name>/<version>/`, atomically.

The directory is a standard PEFT adapter (vLLM, LoRAX and `PeftModel.from_pretrained` load it as
is) plus `model-card.json`: base model and its digest, dataset digest, hyperparameters, metrics,
trained tokens, device hours, cost, created time. It goes up with `Store.publish_dir`, so a reader
sees all of it or nothing, and a failure leaves no half adapter behind. `published.json` in the
job's prefix is written after it; a rerun of a published job returns that record and writes nothing.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tessera.api import FineTuneJob, paths
from tessera.api.adapter_dir import CONFIG_FILE, MODEL_CARD_FILE, WEIGHTS_FILE, CardBaseModel, ModelCard
from tessera.api.records import EvaluationReport, PublishedBaseModel, PublishedRecord
from tessera.errors import TesseraError
from tessera.job_artifacts import JobArtifacts
from tessera.scratch import scratch_dir
from tessera.store import local_manifest, manifest_digest, open_store
from tessera.train.checkpoint import ADAPTER_DIR, load_state

log = logging.getLogger(__name__)

# PEFT writes a README with a templated card that names the trainer's scratch path; ours replaces it.
_DROPPED_FILES = ("README.md",)


class PublishError(TesseraError):
    """The job has nothing publishable yet (no checkpoint, no evaluation report)."""


def default_version(now: datetime) -> str:
    """`v` + UTC timestamp: sorts in time order and fits the version pattern of the API."""
    return now.astimezone(timezone.utc).strftime("v%Y%m%d-%H%M%S")


def numeric_metrics(scores: dict[str, Any] | None) -> dict[str, float]:
    """The flat numbers of a score section (what an Adapter's `spec.metrics` carries)."""
    return {k: float(v) for k, v in (scores or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def base_model_digest(uri: str) -> str | None:
    """One sha256 over the base model directory's files (the publish record when it has one)."""
    store, key = open_store(uri)
    try:
        return manifest_digest(store.manifest(key))
    except TesseraError as error:
        log.warning("cannot compute the digest of the base model %s: %s", uri, error)
        return None


def base_model_identity(uri: str) -> tuple[str | None, int | None]:
    """(architecture, vocabulary size) from the base's `config.json`: the server checks an adapter against them."""
    store, key = open_store(uri)
    try:
        config = store.get_json(f"{key}/config.json")
    except TesseraError as error:
        log.warning("cannot read the config of the base model %s: %s", uri, error)
        return None, None
    architectures = config.get("architectures") or [None]
    return architectures[0], config.get("vocab_size")


def model_card(
    job: FineTuneJob, *, version: str, created_at: datetime, report: EvaluationReport | None,
    checkpoint: str, state: Any, dataset_manifest: dict[str, Any], base_digest: str | None,
    base_identity: tuple[str | None, int | None] = (None, None), teacher: dict[str, Any] | None = None,
) -> ModelCard:
    spec = job.spec
    device_hours = state.device_seconds / 3600
    architecture, vocab_size = base_identity
    return ModelCard(
        name=job.adapter_name,
        version=version,
        created_at=created_at.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        task=spec.dataset.task,
        base_model=CardBaseModel(name=spec.base_model.name, uri=spec.base_model.uri, sha256=base_digest),
        architecture=architecture,
        vocab_size=vocab_size,
        dataset={
            "uri": spec.dataset.uri,
            "sha256": dataset_manifest.get("datasetSha256"),
            "preparedFiles": dataset_manifest.get("files", {}),
            "examples": dataset_manifest.get("examples"),
        },
        lineage={
            "job": f"{job.metadata.namespace}/{job.metadata.name}",
            "uid": job.metadata.uid,
            "checkpoint": checkpoint,
            **({"teacher": teacher} if teacher else {}),
        },
        hyperparameters={
            "quantization": spec.base_model.quantization.model_dump(mode="json", by_alias=True),
            "computeDtype": spec.base_model.compute_dtype,
            "lora": spec.lora.model_dump(mode="json", by_alias=True),
            "training": spec.training.model_dump(mode="json", by_alias=True),
            "distribution": spec.distribution.model_dump(mode="json", by_alias=True),
        },
        metrics=None if report is None else {
            "metric": report.metric,
            "samples": report.samples,
            "adapter": report.adapter,
            "base": report.base,
            "majority": report.majority.to_json() if report.majority else None,
            **({"distillation": report.distillation} if report.distillation else {}),
        },
        training={
            "steps": state.step,
            "trainLoss": state.history[-1]["loss"] if state.history else None,
            "trainedTokens": state.trained_tokens,
            "deviceHours": device_hours,
        },
        cost={
            "amount": round(device_hours * spec.cost.price_per_device_hour, 6),
            "currency": spec.cost.currency,
            "pricePerDeviceHour": spec.cost.price_per_device_hour,
        },
    )


def teacher_lineage(job: FineTuneJob) -> dict[str, Any] | None:
    """Who labelled the training rows (spec.dataset.teacher): host, model, prompt hash, labelled-set digest."""
    if job.spec.dataset.teacher is None:
        return None
    from tessera.label import labelled_manifest

    manifest = labelled_manifest(job)
    if manifest is None:
        raise PublishError("the job's rows were labelled by a teacher but the label step's manifest is gone; "
                           "rerun `tessera label`")
    return {**manifest["teacher"], "labelledSha256": manifest["dataSha256"], "counts": manifest["counts"],
            "tokens": manifest["tokens"], "cost": manifest["cost"], "wallSeconds": manifest["wallSeconds"]}


def _stage_adapter(artifacts: JobArtifacts, checkpoint: str, job: FineTuneJob, target: Path) -> None:
    artifacts.store.get_dir(artifacts.key(f"{checkpoint}/{ADAPTER_DIR}"), target)
    for name in _DROPPED_FILES:
        (target / name).unlink(missing_ok=True)
    config_path = target / CONFIG_FILE
    config = json.loads(config_path.read_text())
    # The trainer saw the base in a scratch directory; loaders want its real name or URI.
    config["base_model_name_or_path"] = job.spec.base_model.name or job.spec.base_model.uri
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _own_published_version(
    artifacts: JobArtifacts, job: FineTuneJob, checkpoint: str, weights_sha: str
) -> tuple[str, ModelCard] | None:
    """(version, model card) of a complete publish of this job's `checkpoint` with these weights, if any.

    Only complete publishes are listed (an interrupted one is invisible and gets published over)."""
    store = artifacts.store
    root = artifacts.key(paths.adapter_prefix(job.metadata.namespace, job.adapter_name, ""))
    lineage = {"job": f"{job.metadata.namespace}/{job.metadata.name}", "uid": job.metadata.uid,
               "checkpoint": checkpoint}
    versions = [job.spec.output.version] if job.spec.output.version else [
        entry.rstrip("/").rsplit("/", 1)[-1] for entry in store.list(root, recursive=False) if entry.endswith("/")]
    for version in versions:
        prefix = f"{root}/{version}"
        if not store.is_published(prefix):
            continue
        card = ModelCard.read(store.get_json(f"{prefix}/{MODEL_CARD_FILE}"))
        # Lineage may say more (a teacher): the job, its uid and the checkpoint identify the publish.
        own = {key: (card.lineage or {}).get(key) for key in lineage}
        if own == lineage and store.manifest(prefix).get(WEIGHTS_FILE) == weights_sha:
            return version, card
    return None


def publish_job(job: FineTuneJob, *, now: datetime | None = None) -> PublishedRecord:
    """Publish the evaluated adapter of `job`; returns the `published.json` record."""
    from tessera.data import load_prepared

    artifacts = JobArtifacts.open(job)
    store = artifacts.store
    record_key = artifacts.key(paths.published_key(job))
    if store.exists(record_key):
        record = PublishedRecord.read(store.get_json(record_key), store.uri(record_key))
        published_prefix = paths.adapter_prefix(job.metadata.namespace, record.name, record.version)
        if store.is_published(artifacts.key(published_prefix)):
            log.info("%s is already published as %s", job.metadata.name, record.uri)
            return record

    steps = artifacts.checkpoint_steps()
    if not steps:
        raise PublishError(f"nothing to publish: no checkpoint under "
                           f"{artifacts.uri(paths.checkpoints_prefix(job))}; run `tessera train` first")
    report_key = artifacts.key(paths.eval_report_key(job))
    report = EvaluationReport.read(store.get_json(report_key), store.uri(report_key)) if store.exists(report_key) \
        else None
    if report is None and job.spec.evaluation.enabled:
        raise PublishError(f"no evaluation report at {store.uri(report_key)}: run `tessera evaluate` first "
                           "(or set spec.evaluation.enabled: false)")
    checkpoint = (report.checkpoint if report else None) or artifacts.checkpoint(steps[-1])
    # Tokens, hours and cost are those of the whole run, whichever checkpoint was chosen.
    state = load_state(artifacts, steps[-1])
    dataset_manifest = load_prepared(job, store).manifest

    now = now or datetime.now(timezone.utc)
    with scratch_dir("publish") as scratch:
        staged = scratch / "adapter"
        _stage_adapter(artifacts, checkpoint, job, staged)
        weights_sha = local_manifest(staged)[WEIGHTS_FILE]
        # A rerun after a publish whose record was lost (killed between the two writes) finds its
        # own version and records it, instead of refusing ("already published") or publishing twice.
        adopted = _own_published_version(artifacts, job, checkpoint, weights_sha)
        if adopted is not None:
            version, card = adopted
            prefix = paths.adapter_prefix(job.metadata.namespace, job.adapter_name, version)
            log.info("%s was already published as %s; recording it", job.metadata.name, artifacts.uri(prefix))
        else:
            version = job.spec.output.version or default_version(now)
            prefix = paths.adapter_prefix(job.metadata.namespace, job.adapter_name, version)
            card = model_card(job, version=version, created_at=now, report=report, checkpoint=checkpoint,
                              state=state, dataset_manifest=dataset_manifest,
                              base_digest=base_model_digest(job.spec.base_model.uri),
                              base_identity=base_model_identity(job.spec.base_model.uri),
                              teacher=teacher_lineage(job))
            (staged / MODEL_CARD_FILE).write_text(json.dumps(card.to_json(), indent=2))
            store.publish_dir(staged, artifacts.key(prefix))

    record = PublishedRecord(
        name=job.adapter_name,
        version=version,
        uri=artifacts.uri(prefix),
        sha256=weights_sha,
        base_model=PublishedBaseModel(uri=job.spec.base_model.uri, name=job.spec.base_model.name),
        task=job.spec.dataset.task,
        rank=job.spec.lora.rank,
        metrics=numeric_metrics(report.adapter if report else None),
        dataset_sha256=dataset_manifest.get("datasetSha256"),
        checkpoint=checkpoint,
        trained_tokens=state.trained_tokens,
        device_hours=card.training["deviceHours"],
        cost=card.cost,
    )
    store.put_json(record_key, record.to_json())
    return record
