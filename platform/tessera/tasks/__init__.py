"""Financial tasks: one module per task, each a prompt template, answer parsing and metrics (`metrics`).

    >>> from tessera.tasks import get_task
    >>> task = get_task("sentiment")
    >>> example = task.to_example({"text": "Profit rose 20%.", "label": "positive"})
    >>> task.parse("The sentiment is Positive.")
    'positive'
"""

from __future__ import annotations

from tessera.errors import InvalidSpecError
from tessera.tasks.base import ClassificationTask, Example, GenerativeTask, RowError, Task
from tessera.tasks.chat import ChatTask
from tessera.tasks.forecast import ForecastTask
from tessera.tasks.headline import HeadlineTask
from tessera.tasks.ner import NerTask
from tessera.tasks.recommendation import RecommendationTask
from tessera.tasks.sentiment import SentimentTask
from tessera.tasks.text import TextTask
from tessera.tasks.xbrl_tags import XbrlTagsTask
from tessera.tasks.xbrl_values import XbrlValuesTask

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        SentimentTask(), HeadlineTask(), NerTask(), XbrlTagsTask(), XbrlValuesTask(),
        RecommendationTask(), ForecastTask(), TextTask(), ChatTask(),
    )
}


def get_task(name: str) -> Task:
    """The task called `name` (as in `spec.dataset.task`)."""
    try:
        return TASKS[name]
    except KeyError:
        raise InvalidSpecError([f"spec.dataset.task: unknown task {name!r}; one of {', '.join(TASKS)}"]) from None


__all__ = ["TASKS", "ClassificationTask", "Example", "GenerativeTask", "RowError", "Task", "get_task"]
