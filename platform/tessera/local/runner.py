"""The embedded runner: a FineTuneJob end to end on one machine, no cluster.

The Kubeflow SDK's idea of a local backend: the same steps the Argo Workflow runs in pods
([label ->] prepare -> train -> evaluate -> publish), with the same code and the same store layout, run
one after the other here. A job with `distribution.workers > 1` trains under torchrun with that
many local processes, as a PyTorchJob would spread it over pods.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import yaml

from tessera.api import FineTuneJob, paths
from tessera.api.records import RunOutcome, TrainingOutcome
from tessera.errors import TesseraError
from tessera.scratch import scratch_dir

log = logging.getLogger(__name__)


class TrainingProcessError(TesseraError):
    """The torchrun training processes failed (their output says why)."""


def ensure_base_model(job: FineTuneJob) -> None:
    """Build the tiny base model where the job expects it, if it names it and it is not there yet."""
    from tessera.model import TINY_MODEL_NAME, init_tiny

    uri = job.spec.base_model.uri
    if job.spec.base_model.name != TINY_MODEL_NAME or uri.startswith("s3://"):
        return
    path = Path(uri.removeprefix("file://")).expanduser()
    if not (path / "config.json").is_file():
        log.info("building the tiny base model in %s", path)
        init_tiny(path)


def start_over(job: FineTuneJob) -> None:
    """Forget the job's earlier run: prepared data, checkpoints, logs, report (adapters stay)."""
    from tessera.job_artifacts import JobArtifacts

    artifacts = JobArtifacts.open(job)
    artifacts.store.delete(artifacts.key(paths.job_prefix(job)), recursive=True, missing_ok=True)


def torchrun_command(job_file: Path, processes: int, result_file: Path) -> list[str]:
    """`tessera train` under torchrun with `processes` local ranks (what a PyTorchJob's pods run)."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
        "-m", "tessera", "train", "-f", str(job_file), "--result", str(result_file),
    ]


def _train(job: FineTuneJob, show_progress: bool) -> TrainingOutcome:
    from tessera.train.trainer import train_job

    workers = job.spec.distribution.workers
    if workers == 1:
        return train_job(job, show_progress=show_progress)
    with scratch_dir("run") as scratch:
        job_file = Path(scratch) / "job.yaml"
        job_file.write_text(yaml.safe_dump(job.to_manifest(), sort_keys=False))
        result_file = Path(scratch) / "result.json"
        completed = subprocess.run(torchrun_command(job_file, workers, result_file), check=False)
        if completed.returncode != 0:
            raise TrainingProcessError(f"training under torchrun with {workers} processes failed "
                                       f"(exit code {completed.returncode}); see its output above")
        return TrainingOutcome.read(json.loads(result_file.read_text()), str(result_file))


def run_job(job: FineTuneJob, *, fresh: bool = False, show_progress: bool = True) -> RunOutcome:
    """[label ->] prepare -> train -> evaluate -> publish; returns the adapter URI and every step's result."""
    from tessera.data import prepare
    from tessera.evaluate.report import format_table
    from tessera.evaluate.runner import evaluate_job
    from tessera.publish import publish_job

    ensure_base_model(job)
    if fresh:
        start_over(job)
    if job.spec.dataset.teacher is not None:
        from tessera.label import label_job

        log.info("[0/4] label %s with teacher %s", job.spec.dataset.uri, job.spec.dataset.teacher.model)
        label_job(job, show_progress=show_progress)
    log.info("[1/4] prepare %s", job.spec.dataset.uri)
    prepared = prepare(job)
    log.info("      %d training and %d evaluation examples", len(prepared.train), len(prepared.eval))
    log.info("[2/4] train")
    training = _train(job, show_progress)
    log.info("      %d steps, loss %s, %d tokens, %.4f device hours", training.step, training.train_loss,
             training.trained_tokens, training.device_hours)
    report = None
    if job.spec.evaluation.enabled:
        log.info("[3/4] evaluate")
        report = evaluate_job(job, show_progress=show_progress)
        log.info("%s", format_table(report))
    else:
        log.info("[3/4] evaluate: skipped (spec.evaluation.enabled is false)")
    log.info("[4/4] publish")
    published = publish_job(job)
    log.info("      %s", published.uri)
    return RunOutcome(job=f"{job.metadata.namespace}/{job.metadata.name}", adapter_uri=published.uri,
                      published=published, training=training, evaluation=report)
