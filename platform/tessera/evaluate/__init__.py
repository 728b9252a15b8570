"""Evaluation: metrics (`metrics`), the base-vs-adapter runner (`runner.evaluate_job`) and its report.

Kept free of heavy imports: tasks import `tessera.evaluate.metrics` in processes without torch.
"""
