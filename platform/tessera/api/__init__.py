"""FineTuneJob and Adapter: types, defaults, validation, CRDs and artifact paths."""

from tessera.api.adapter import Adapter, AdapterSpec, AdapterStatus, ReplicaStatus
from tessera.api.base import API_VERSION, GROUP, VERSION
from tessera.api.experiment import Experiment, ExperimentSpec, ExperimentStatus
from tessera.api.finetunejob import TERMINAL_PHASES, FineTuneJob, FineTuneJobSpec, FineTuneJobStatus
from tessera.api.loader import (
    apply_overrides,
    load_experiment,
    load_job,
    load_resource,
    load_resources,
    parse_resource,
)

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "TERMINAL_PHASES",
    "Adapter",
    "Experiment",
    "ExperimentSpec",
    "ExperimentStatus",
    "AdapterSpec",
    "AdapterStatus",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "ReplicaStatus",
    "apply_overrides",
    "load_experiment",
    "load_job",
    "load_resource",
    "load_resources",
    "parse_resource",
]
