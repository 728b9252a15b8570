"""Evaluation: the base-vs-adapter runner (`runner.evaluate_job`) and its report.

The metrics themselves live with the tasks (`tessera.tasks.metrics`), below this package.
"""
