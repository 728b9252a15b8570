"""Tessera's Argo pipelines as code: the `tessera-finetune` WorkflowTemplate and its interface."""

from tessera_pipelines.finetune import (
    DEFAULT_GPU_RESOURCE,
    DEFAULT_IMAGE,
    DEFAULT_STORE_SECRET,
    JOB_FILE,
    LAUNCHERS,
    PARAMETERS,
    SERVICE_ACCOUNT,
    TEMPLATE_NAME,
    build_workflow_template,
    json_parameter,
    render_training_objects,
    render_yaml,
)

__all__ = [
    "DEFAULT_GPU_RESOURCE",
    "DEFAULT_IMAGE",
    "DEFAULT_STORE_SECRET",
    "JOB_FILE",
    "LAUNCHERS",
    "PARAMETERS",
    "SERVICE_ACCOUNT",
    "TEMPLATE_NAME",
    "build_workflow_template",
    "json_parameter",
    "render_training_objects",
    "render_yaml",
]
