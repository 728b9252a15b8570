"""The `tessera-finetune` WorkflowTemplate's interface: its name, its parameters and their defaults.

The operator and the CLI need these to fill a Workflow's arguments; they import this module, not
the Hera authoring in `finetune.py`.
"""

from __future__ import annotations

import json
from typing import Any

from tessera import __version__
from tessera.api.finetunejob import LAUNCHERS, DistributionSpec

TEMPLATE_NAME = "tessera-finetune"
DEFAULT_IMAGE = f"ghcr.io/tessera-ml/tessera-trainer:{__version__}"
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_STORE_SECRET = "tessera-store"  # noqa: S105 (the name of a Secret, not a credential)
DEFAULT_TEACHER_SECRET = "tessera-teacher"  # noqa: S105 (a Secret's name; optional: a teacher may need no key)
SERVICE_ACCOUNT = "tessera-pipeline"
JOB_FILE = "/config/job.yaml"
TEACHER_KEY_ENV = "TEACHER_API_KEY"  # noqa: S105 (a variable's name): what tessera.label reads

# The template's interface: every parameter the operator passes, with the default the template uses.
PARAMETERS: dict[str, str] = {
    "job-name": "",
    "image": DEFAULT_IMAGE,
    "store-secret": DEFAULT_STORE_SECRET,
    "launcher": LAUNCHERS[0],
    "training-job-name": "",
    "num-nodes": "1",
    "worker-replicas": "0",
    "nproc-per-node": "1",
    "gpus-per-worker": "0",
    "gpu-resource": DEFAULT_GPU_RESOURCE,
    "restart-limit": str(DistributionSpec.model_fields["max_restarts"].default),  # one worker's
    "node-selector": "{}",
    "tolerations": "[]",
    "priority-class-name": "",
    "eval-pod-spec-patch": "{}",
    # spec.dataset.teacher: "true" runs the label step first; the Secret holds TEACHER_API_KEY.
    "teacher": "false",
    "teacher-secret": DEFAULT_TEACHER_SECRET,
}


def json_parameter(value: Any) -> str:
    """A JSON value on one line, as the raw parameters (node selector, tolerations) expect."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True)
