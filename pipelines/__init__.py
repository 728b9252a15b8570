"""Tessera's Argo pipelines as code: the `tessera-finetune` WorkflowTemplate (`finetune`, authored with Hera)
and its interface (`interface`: names and parameters, without Hera)."""
