"""`python -m tessera_pipelines > pipelines/workflowtemplate.yaml` renders the WorkflowTemplate."""

from tessera_pipelines.finetune import render_yaml

print(render_yaml(), end="")
